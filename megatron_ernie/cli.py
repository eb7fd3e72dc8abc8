"""`ernie`: the command-line entry point.

Parses arguments, loads the config, dispatches to a package function; nothing
else.  Run distributed subcommands under ``torchrun`` or ``srun``::

    torchrun --nproc_per_node=2 -m megatron_ernie.cli pretrain --config configs/tiny_cpu.toml
    torchrun --nproc_per_node=2 -m megatron_ernie.cli sft --config configs/sft_tiny_cpu.toml
    ernie show-config --config configs/tiny_cpu.toml --set train.iters=100
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_ernie import config as C


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file (defaults apply where it is silent)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.iters=100 (repeatable)")


def _load(args) -> C.ErnieConfig:
    cfg = C.load(args.config, args.overrides)
    C.validate(cfg)
    return cfg


def _load_job(args) -> C.ErnieConfig:
    """The config of a training job, validated, its data files checked, its run directory proven writable."""
    from megatron_ernie.config.outputs import check_writable_dir

    cfg = _load(args)
    cfg.data.check_files()
    check_writable_dir("run.dir", cfg.run.dir, "run directory")
    return cfg


def pretrain_objective(cfg: C.ErnieConfig):
    """What a pretraining step computes: distillation from ``distill.teacher`` when one is set (it refuses
    a supernet, which distils in place), the elastic sandwich for a supernet, else plain LM."""
    if cfg.distill.enabled:
        from megatron_ernie.train.distill import DistillObjective

        return DistillObjective()
    if cfg.elastic.enabled:
        from megatron_ernie.elastic.objective import ElasticObjective

        return ElasticObjective()
    from megatron_ernie.train.objective import LMObjective

    return LMObjective()


def sft_job(cfg: C.ErnieConfig):
    """SFT = the LM objective on the supervised-data source (response tokens only in the loss)."""
    from megatron_ernie.data.sft import sft_data_source
    from megatron_ernie.train.objective import LMObjective

    return LMObjective(), sft_data_source(cfg.sft, cfg.rl.tasks, cfg.data.tokenizer, cfg.checkpoint.load)


def _with_resume(args, first=()) -> None:
    args.overrides = [*first, *args.overrides] + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    if getattr(args, "teacher", None) is not None:  # --teacher CKPT is --set distill.teacher="CKPT"
        import json

        args.overrides.append(f"distill.teacher={json.dumps(args.teacher)}")


def cmd_pretrain(args) -> int:
    from megatron_ernie.train.loop import pretrain

    _with_resume(args)
    cfg = _load_job(args)
    return _exit(pretrain(cfg, pretrain_objective(cfg)))


def cmd_sft(args) -> int:
    from megatron_ernie.train.loop import pretrain

    # a base checkpoint (checkpoint.load) gives weights only; --set checkpoint.load_weights_only=false undoes it
    _with_resume(args, first=["checkpoint.load_weights_only=true"])
    cfg = _load_job(args)
    C.require(not cfg.distill.enabled, "distill.teacher", cfg.distill.teacher,
              "distillation from a frozen teacher is implemented for `ernie pretrain` only; set "
              "distill.teacher = \"\" for SFT (post-training distils on-policy: [rl.distill])")
    objective, source = sft_job(cfg)
    return _exit(pretrain(cfg, objective, source))


def _exit(code: int) -> int:
    from megatron_ernie.train.signals import EXIT_PREEMPTED

    if code == EXIT_PREEMPTED:
        # Exit at once after the final barrier: under srun --kill-on-bad-exit the first
        # rank to exit 75 gets slower ranks killed while Python tears down.
        import multiprocessing

        for child in multiprocessing.active_children():  # e.g. the checkpoint writer's manager
            child.terminate()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_show_config(args) -> int:
    cfg = _load(args)
    if args.world_size:
        C.validate(cfg, args.world_size)
        from megatron_ernie.plan.check import peak_memory_line

        print(peak_memory_line(cfg, args.world_size, args.gpu, args.force), file=sys.stderr)
    print(C.dumps(cfg))
    return 0


# Subcommands with their own argument parser: everything after the name is theirs.
PASSTHROUGH = {
    "preprocess": "megatron_ernie.data.preprocess",
    "submit": "megatron_ernie.launch.submit",
    "summary": "megatron_ernie.observe.summary",
    "search": "megatron_ernie.elastic.search",
    "extract": "megatron_ernie.elastic.extract",
    "reorder": "megatron_ernie.elastic.reorder",
    "rl": "megatron_ernie.rl.main",
    "convert": "megatron_ernie.convert.cli",
    "inspect": "megatron_ernie.convert.summary",
    "eval-tasks": "megatron_ernie.posttrain.evaluate",
    "pipeline": "megatron_ernie.posttrain.pipeline",
    "judge-data": "megatron_ernie.rl.judge.data",
    "plan": "megatron_ernie.plan.cli",
}
# Subcommands served by a differently named function of a module.
ENTRY = {"eval": ("megatron_ernie.elastic.search", "eval_main")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="(elastic) MoE pretraining; run under torchrun or srun")
    _add_config_args(p)
    p.add_argument("--resume", choices=["auto", "none"], help="auto: continue from <run.dir>/checkpoints/latest")
    p.add_argument("--teacher", metavar="CHECKPOINT",
                   help="distil from this frozen checkpoint (same tokenizer; sets distill.teacher, see [distill])")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("sft", help="supervised fine-tuning on (prompt, response) pairs; run under torchrun or srun")
    _add_config_args(p)
    p.add_argument("--resume", choices=["auto", "none"], help="auto: continue this SFT run from its latest checkpoint")
    p.set_defaults(func=cmd_sft)
    p = sub.add_parser("show-config", help="print the resolved config (after --set), validated")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, default=0, help="also check the layout for this many processes")
    p.add_argument("--gpu", default="h100", help="device for the memory check with --world-size (see ernie plan)")
    p.add_argument("--force", action="store_true", help="print even when the layout is predicted not to fit")
    p.set_defaults(func=cmd_show_config)
    sub.add_parser("preprocess", help="text/JSONL -> megatron indexed dataset (ernie preprocess --help)")
    sub.add_parser("submit", help="render an sbatch script from a config and submit it (ernie submit --help)")
    sub.add_parser("summary", help="what a run produced: losses, checkpoints, TensorBoard (ernie summary --help)")
    sub.add_parser("eval", help="validation loss of a supernet's sub-network (ernie eval --help)")
    sub.add_parser("search", help="best sub-network of a supernet under a budget (ernie search --help)")
    sub.add_parser("extract", help="a sub-network as a standalone checkpoint (ernie extract --help)")
    sub.add_parser("reorder", help="sort experts/channels (and layers) of a supernet by importance")
    sub.add_parser("convert", help="Hugging Face export/import, offline reshard (ernie convert --help)")
    sub.add_parser("inspect", help="a checkpoint's config, iteration, tokens, parameter counts (--json)")
    sub.add_parser("rl", help="disaggregated asynchronous RL: controller, trainer, rollout, reward (ernie rl --help)")
    sub.add_parser("eval-tasks", help="mean reward per task of a checkpoint on held-out prompts (--help)")
    sub.add_parser("plan", help="per-rank memory, communication and step time of every valid layout (--help)")
    sub.add_parser("pipeline", help="post-training: SFT -> domain experts -> OPD -> general RL (--help)")
    return parser


# Errors that describe bad input (each message names the file or field and the fix), by the
# module that defines them: an error can only come from a module that was imported.
USER_ERRORS = {"megatron_ernie.config.errors": "ConfigError", "megatron_ernie.data.corpus": "CorpusError",
               "megatron_ernie.checkpoint.errors": "CheckpointError", "megatron_ernie.convert.errors": "ConvertError",
               "megatron_ernie.launch.submit": "SubmitError", "megatron_ernie.train.step": "TrainingDiverged",
               "megatron_ernie.posttrain.pipeline": "StageFailed"}


def _is_user_error(err: BaseException) -> bool:
    kinds = tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules)
    return isinstance(err, kinds)


def _first_to_report() -> bool:
    """Under a launcher every rank fails the same way: only the first rank to fail prints.

    The ranks of a job step share a node-local marker file named after the launch (torchrun's
    run id and master port, or Slurm's job and step, and the launching agent's process id, which
    local ranks share); creating it exclusively elects the reporter.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    import tempfile

    launch = "-".join([*(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_PORT", "SLURM_JOB_ID",
                                                          "SLURM_STEP_ID")), str(os.getppid())])
    marker = Path(tempfile.gettempdir()) / f"ernie-error-{launch.replace(os.sep, '_')}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:
        return os.environ.get("RANK", "0") == "0"


def _report(command: str, err: BaseException) -> int:
    """One line on stderr for an error that escaped a subcommand; 2 for bad input, 1 for a bug."""
    if not _first_to_report():
        return 2 if _is_user_error(err) else 1
    if _is_user_error(err):
        print(f"ernie {command}: error: {err}", file=sys.stderr)
        return 2
    text = " ".join(str(err).split())[:400]
    print(f"ernie {command}: internal error: {type(err).__name__}: {text} (rerun with --debug, or set "
          f"ERNIE_DEBUG=1, for the full traceback; please report it)", file=sys.stderr)
    return 1


def _dispatch(argv: list) -> int:
    if argv and (argv[0] in PASSTHROUGH or argv[0] in ENTRY):
        import importlib

        module, func = ENTRY.get(argv[0], (PASSTHROUGH.get(argv[0]), "main"))
        return getattr(importlib.import_module(module), func)(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv=None) -> int:
    """Run one subcommand; whatever escapes it becomes one line (``--debug``: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("ERNIE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else "ernie"
    try:
        return _dispatch(argv)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as err:  # noqa: BLE001 - the one place every error ends up
        if debug:
            raise
        return _report(command, err)


if __name__ == "__main__":
    sys.exit(main())
