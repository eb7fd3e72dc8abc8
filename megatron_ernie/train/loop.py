"""The training loop: setup, iterate, evaluate, checkpoint.

Build order (torchtitan-style, one named step each): distributed init ->
config checks -> process groups -> seeds -> data -> model -> optimizer and
schedule -> resume -> observers.  ``pretrain`` is the whole job.

The loop is objective-agnostic: what one optimizer step computes comes from
an ``Objective`` (train/objective.py) and the data from a data source, both
chosen by the caller at setup (the CLI: plain LM, the elastic sandwich, SFT).
It imports no feature package.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psutil
import torch

from megatron_ernie import config as C
from megatron_ernie.checkpoint import store, verify
from megatron_ernie.data.loader import BatchLayout, iter_global_batches
from megatron_ernie.data.pipeline import setup_data
from megatron_ernie.model.build import build_model
from megatron_ernie.model.extensions import extensions_for
from megatron_ernie.observe.console import IterationStats, StepTimer, format_iteration, setup_logging
from megatron_ernie.observe.expert_load import ExpertLoadTracker
from megatron_ernie.observe.tensorboard import NullWriter, make_writer
from megatron_ernie.runtime import distributed, groups as G
from megatron_ernie.runtime.dims import dims_from_config
from megatron_ernie.train import continuation, step as S
from megatron_ernie.train.objective import LMObjective, Objective
from megatron_ernie.train.optim import build_optimizer, build_scheduler
from megatron_ernie.train.signals import EXIT_PREEMPTED, StopFlag

log = logging.getLogger("megatron_ernie")


@dataclass
class Progress:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    losses: list = field(default_factory=list)
    eval_losses: list = field(default_factory=list)


@dataclass
class Run:
    cfg: C.ErnieConfig
    groups: G.Groups
    data: object
    tconfig: object
    model: list
    optimizer: object
    scheduler: object
    progress: Progress
    writer: object
    experts: ExpertLoadTracker
    stop: StopFlag
    objective: Objective = field(default_factory=LMObjective)

    @property
    def ckpt_root(self) -> Path:
        return Path(self.cfg.run.dir) / "checkpoints"

    @property
    def shape(self) -> tuple[int, int, int]:
        t = self.cfg.train
        n = self.groups.dims.num_microbatches(t.global_batch_size, t.micro_batch_size)
        return n, self.cfg.model.seq_length, t.micro_batch_size


def _num_samples(train, start: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    """(train, valid, test) sample counts. A run starting at ``start`` = (iteration, consumed samples)
    reads up to ``consumed + (iters - iteration) * G``: more than ``iters * G`` for a continuation,
    which starts at its supernet's data position (train/continuation.py)."""
    evals = train.eval_iters * train.global_batch_size
    iteration, consumed = start
    n_train = max(train.iters * train.global_batch_size,
                  consumed + max(train.iters - iteration, 0) * train.global_batch_size)
    return n_train, max(evals, 1), max(evals, 1)


def planned_start(cfg: C.ErnieConfig, path: Path | None, record: dict | None) -> tuple[int, int]:
    """(iteration, consumed samples) the run will start at, known before data and model are built
    (``resume`` then sets exactly this): a continuation at its source's data position, a resume
    at its checkpoint's, a fresh run, an import or an SFT base model at (0, 0)."""
    ck = cfg.checkpoint
    if record is not None:
        return 0, continuation.data_start(record, ck, cfg.train.global_batch_size)
    if path is None or (ck.load_weights_only and path == Path(ck.load)):
        return 0, 0
    meta = verify.read_meta_dict(path)
    if meta.get("extra", {}).get("weights_only"):
        return 0, 0
    return meta["iteration"], meta["consumed_samples"]


def pretraining_data(cfg: C.ErnieConfig):
    """The default data source: the pretraining corpus of ``[data]`` (data/pipeline.py)."""
    return partial(setup_data, cfg.data)


def setup(cfg: C.ErnieConfig, objective: Objective | None = None, data_source=None) -> Run:
    """Build a run. ``objective``: what a step computes (default: plain LM); ``data_source``:
    ``(seq_length, (n_train, n_valid, n_test)) -> Data`` (default: the pretraining corpus).

    Nothing is written into the run directory until every input has been checked and the
    checkpoint (if any) has loaded: a failed resume leaves the run exactly as it was."""
    objective = objective or LMObjective()
    stop = StopFlag()  # first: a scheduler signal during start-up must not kill the task
    check_resume_source(cfg)  # before any process group: a bad checkpoint fails in seconds, on every rank alike
    world = distributed.init_distributed()
    try:
        return _build(cfg, objective, data_source, stop, world)
    except BaseException:
        distributed.shutdown()  # a clean exit: no process group left behind to abort at teardown
        raise


def _build(cfg: C.ErnieConfig, objective: Objective, data_source, stop: StopFlag, world: int) -> Run:
    C.validate(cfg, world)
    objective.check(cfg)
    groups = G.build_groups(dims_from_config(cfg.parallel, world))
    setup_logging(cfg.log.level, groups.is_logging_rank)
    torch.manual_seed(cfg.run.seed)
    G.model_parallel_seed(cfg.run.seed)
    ext = extensions_for(cfg.model, cfg.moe, fp8=cfg.fp8, elastic=cfg.elastic)  # refuses FP8 it cannot run
    source = resume_source(cfg.checkpoint, Path(cfg.run.dir) / "checkpoints")
    record = continuation.record_of(cfg.checkpoint, source)
    start = planned_start(cfg, source, record)
    data = (data_source or pretraining_data(cfg))(cfg.model.seq_length, _num_samples(cfg.train, start))
    tconfig, model = build_model(cfg.model, cfg.moe, cfg.parallel, groups, data.tokenizer.vocab_size,
                                 cfg.run.seed, ext)
    optim_cfg, schedule_cfg = continuation.schedule(cfg, record)
    optimizer = build_optimizer(optim_cfg, cfg.parallel, model, groups.pgs, bf16=cfg.model.dtype == "bf16")
    scheduler = build_scheduler(optimizer, optim_cfg, schedule_cfg, cfg.train.iters)
    run = Run(cfg, groups, data, tconfig, model, optimizer, scheduler, Progress(), NullWriter(),
              ExpertLoadTracker(model), stop, objective)
    resume(run, start)
    objective.prepare(run)  # e.g. load a distillation teacher: refusals still come before any file is written
    # A resumed run's event log continues at its checkpoint: steps a killed run logged after it
    # are purged (TensorBoard's purge_step, as Megatron-LM does), so no step appears twice.
    run.writer = make_writer(cfg.log.tensorboard, groups.is_logging_rank, Path(cfg.run.dir) / "tensorboard",
                             purge_step=run.progress.iteration + 1 if run.progress.iteration else None)
    _write_run_files(run)
    return run


def _write_run_files(run: Run) -> None:
    if G.global_rank() == 0:
        C.save_resolved(run.cfg, run.cfg.run.dir)
        run.data.tokenizer.save(str(Path(run.cfg.run.dir) / "tokenizer.json"))


def resume_source(ck, ckpt_root: Path) -> Path | None:
    """The checkpoint a run starts from: its own latest (resume=auto), else checkpoint.load, else None."""
    path = store.find_latest(ckpt_root) if ck.resume == "auto" else None
    return path or (Path(ck.load) if ck.load else None)


def check_resume_source(cfg: C.ErnieConfig) -> None:
    """The checkpoint to start from exists, is whole (meta.json, index, shard sizes) and has this model's
    shape; its checksums are verified while loading, split over the ranks (checkpoint/verify.py)."""
    ck = cfg.checkpoint
    path = resume_source(ck, Path(cfg.run.dir) / "checkpoints")
    if path is None:
        return
    if not path.is_dir():
        raise C.ConfigError("checkpoint.load", ck.load, "no such directory; give an iter_* checkpoint directory")
    meta = verify.check_structure(path)
    verify.check_model_fits(meta, cfg.model, cfg.moe, path)


def resume(run: Run, start: tuple[int, int] = (0, 0)) -> None:
    """Continue from <run>/checkpoints/latest (resume=auto) or else from checkpoint.load.

    With checkpoint.load_weights_only (SFT from a base model) checkpoint.load gives only the
    weights: optimizer, schedule, data position and RNG start fresh; a later --resume auto of
    the same run continues from its own latest checkpoint in full. A weights-only checkpoint
    (an import, an extracted sub-network) starts at iteration 0 and at ``start``'s data position
    (an extracted sub-network's: where its supernet stopped, see train/continuation.py)."""
    ck = run.cfg.checkpoint
    path = resume_source(ck, run.ckpt_root)
    if path is None:
        return
    from_base = ck.load_weights_only and path == Path(ck.load)
    bounds = continuation.lr_bounds(run.optimizer)
    meta = store.load(path, run.model, run.optimizer if ck.load_optimizer and not from_base else None,
                      restore_rng=not from_base)
    if meta.extra.get("weights_only") or from_base:
        continuation.restore_lr_bounds(run.optimizer, bounds)  # carried moments bring their groups' LRs
        run.progress = Progress(0, start[1], 0)
        moments = "carried Adam moments" if meta.extra.get(store.OPTIMIZER_STATE) and ck.load_optimizer \
            and not from_base else "fresh optimizer"
        log.info(f"initialised weights from {path} ({meta.extra.get('source', 'weights only')}); {moments}; "
                 f"data from sample {start[1]}; LR warms up to {run.scheduler.max_lr:.3g}")
        return
    run.scheduler.load_state_dict(meta.extra["scheduler"])
    run.progress = Progress(meta.iteration, meta.consumed_samples, meta.consumed_tokens)
    log.info(f"resumed from {path} at iteration {meta.iteration} "
             f"({meta.consumed_tokens} tokens, saved at layout {meta.layout})")


def save_checkpoint(run: Run) -> Path:
    p = run.progress
    meta = store.Meta(iteration=p.iteration, consumed_samples=p.consumed_samples,
                      consumed_tokens=p.consumed_tokens, layout=G.current_layout(),
                      extra={"scheduler": run.scheduler.state_dict(), "config": C.loader.to_dict(run.cfg)})
    files = {"config.toml": Path(run.cfg.run.dir) / "config.toml",
             "tokenizer.json": Path(run.cfg.run.dir) / "tokenizer.json"}
    path = store.save(run.ckpt_root, meta, run.model, run.optimizer, run.cfg.checkpoint.keep_last, files)
    log.info(f"saved checkpoint {path}")
    return path


def evaluate(run: Run) -> float:
    """Validation loss of the model in the state the objective evaluates (a supernet: its full network)."""
    run.objective.before_eval(run)
    t = run.cfg.train
    layout = BatchLayout(t.global_batch_size, t.micro_batch_size, run.groups.dims.dp, run.groups.dp_rank)
    total, tokens = 0.0, 0
    for _, batches in zip(range(t.eval_iters), iter_global_batches(run.data.valid, layout, 0)):
        r = S.eval_step(run.model, batches, run.shape, run.groups)
        total, tokens = total + r.loss * r.tokens, tokens + r.tokens
    loss = total / max(tokens, 1)
    run.progress.eval_losses.append((run.progress.iteration, loss))
    run.writer.scalar("eval/loss", loss, run.progress.iteration)
    log.info(f"validation at iteration {run.progress.iteration} | loss {loss:.6f} | ppl {math.exp(min(loss, 50)):.2f}")
    return loss


def _log_iteration(run: Run, result: S.StepResult, seconds: float, extra: dict) -> None:
    p, t = run.progress, run.cfg.train
    lr = run.optimizer.param_groups[0]["lr"]
    stats = IterationStats(p.iteration, t.iters, p.consumed_tokens, result.loss, lr,
                           result.grad_norm, result.tokens / seconds, seconds * 1000)
    experts = run.experts.reduce_and_reset([run.groups.pgs.tp, run.groups.pgs.dp_cp])
    if p.iteration % run.cfg.log.interval == 0:
        shown = "".join(f" | {k.split('/')[-1].replace('_', ' ')} {extra[k]:.6f}"
                        for k in run.objective.console if k in extra)
        log.info(format_iteration(stats) + shown)
    run.writer.scalars({"train/loss": result.loss, "train/lr": stats.lr, "train/grad_norm": result.grad_norm,
                        "train/tokens_per_s": stats.tokens_per_s, "train/iteration_ms": stats.ms_per_iter,
                        "system/memory_mb": psutil.Process().memory_info().rss / 2**20, **experts, **extra},
                       p.iteration)


def _due(iteration: int, interval: int) -> bool:
    return interval > 0 and iteration % interval == 0


def train(run: Run) -> int:
    """Iterate to train.iters; returns the process exit code."""
    t, p = run.cfg.train, run.progress
    layout = BatchLayout(t.global_batch_size, t.micro_batch_size, run.groups.dims.dp, run.groups.dp_rank)
    timer = StepTimer()
    batches = iter_global_batches(run.data.train, layout, p.consumed_samples)
    last = min(t.iters, p.iteration + t.exit_interval) if t.exit_interval else t.iters
    while p.iteration < last:
        result, extra = run.objective.step(run, next(batches))
        p.iteration += 1
        p.consumed_samples += t.global_batch_size
        p.consumed_tokens += result.tokens
        p.losses.append(result.loss)
        S.check_finite(result, p.iteration)
        _log_iteration(run, result, timer.lap(), extra)
        if _due(p.iteration, t.eval_interval):
            evaluate(run)
        saved = _due(p.iteration, run.cfg.checkpoint.save_interval)
        if saved:
            save_checkpoint(run)
        if run.stop.agreed():
            log.warning(f"stop signal received: saving at iteration {p.iteration} and exiting for requeue")
            if not saved:  # never rewrite the checkpoint `latest` names inside the signal's lead time
                save_checkpoint(run)
            return EXIT_PREEMPTED
        timer.lap()  # evaluation and saving do not count towards the next iteration's time
    if run.cfg.checkpoint.save_on_exit and not _due(p.iteration, run.cfg.checkpoint.save_interval):
        save_checkpoint(run)
    run.objective.finish(run)
    return 0


def pretrain(cfg: C.ErnieConfig, objective: Objective | None = None, data_source=None) -> int:
    """The whole training job (pretraining, SFT: the caller's objective and data); returns the exit code."""
    run = setup(cfg, objective, data_source)
    try:
        code = train(run)
        run.writer.flush()
        return code
    finally:
        run.writer.close()
        distributed.shutdown()
