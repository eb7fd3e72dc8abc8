"""Distillation from a frozen teacher (`ernie pretrain --teacher`), every multi-process case in one launch.

    torchrun --nproc_per_node=2 tests/dist/distill_worker.py OUT.json CASE_JSON

Writes the teachers (a differently sized model trained a few steps, the
student's own initial weights, a model of another vocabulary and a checkpoint
whose tokenizer does not match its weights), then trains the student without
a teacher, with the trained teacher at weight 0 and 0.5 at several layouts,
and with its own initial weights as the teacher; the first step's KL is also
computed by hand from the two models' full softmaxes. Rank 0 writes the
results as JSON (and the student's config, for the CLI refusal tests).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ernie import config as C
from megatron_ernie.checkpoint import verify
from megatron_ernie.cli import pretrain_objective
from megatron_ernie.data.loader import BatchLayout, iter_global_batches
from megatron_ernie.train import loop

sys.path.insert(0, str(Path(__file__).parent))
from worker import BASE  # noqa: E402  (the distributed tests' tiny MoE, elastic off)

TEACHER = ["model.num_layers=2", "model.hidden_size=48", "model.ffn_hidden_size=96", "run.seed=7"]
SUPERNET = ["elastic.enabled=true", "elastic.depth=[2, 4]", "elastic.ffn=[0.5, 1.0]", "elastic.experts=[2, 4]",
            "elastic.topk=[1, 2]"]
LAYOUTS = {"dp2": [], "tp2": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pipeline=2"], "ep2": ["parallel.expert=2"]}


def make_cfg(run_dir: Path, overrides) -> C.ErnieConfig:
    """A config of the tiny MoE; also forgets megatron-core's per-layer aux-loss log, which is sized by the
    first model that trained in this process (the 2-layer teacher) and would not fit the 4-layer student."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
    return C.load(None, BASE + [f"run.dir=\"{run_dir}\""] + list(overrides))


def saved(run: loop.Run) -> str:
    path = loop.save_checkpoint(run)
    run.experts.remove()
    return str(path)


def write_teachers(tmp: Path, iters: int) -> dict:
    """The teachers: trained (another size), the student's initial weights, another vocabulary."""
    trained = loop.setup(make_cfg(tmp / "teacher", TEACHER + [f"train.iters={iters}"]), None)
    loop.train(trained)
    out = {"trained": saved(trained)}
    out["initial"] = saved(loop.setup(make_cfg(tmp / "initial", []), None))
    out["other_vocab"] = saved(loop.setup(make_cfg(tmp / "vocab384", ["data.vocab_size=384"]), None))
    supernet = make_cfg(tmp / "supernet", SUPERNET)  # the student's model as an (untrained) elastic supernet
    out["supernet"] = saved(loop.setup(supernet, pretrain_objective(supernet)))
    if dist.get_rank() == 0:  # the 384-token model under the student's tokenizer: weights of the wrong width
        wrong = tmp / "wrong_width"
        shutil.copytree(out["other_vocab"], wrong)
        shutil.copyfile(Path(out["initial"]) / "tokenizer.json", wrong / "tokenizer.json")
        (wrong / verify.MANIFEST).unlink()
        verify.write_manifest(wrong)
        out["wrong_width"] = str(wrong)
    dist.barrier()
    out["wrong_width"] = str(tmp / "wrong_width")
    return out


def train_student(tmp: Path, name: str, iters: int, overrides) -> dict:
    """A student run of `iters` steps: its CE losses and the logged KL per step."""
    run = loop.setup(make_cfg(tmp / name, [f"train.iters={iters}", *overrides]),
                     pretrain_objective(make_cfg(tmp / name, overrides)))
    kls, objective_step = [], run.objective.step

    def step(r, batches):  # records the step's logged scalars
        result, extra = objective_step(r, batches)
        kls.append(extra.get("train/distill_kl"))
        return result, extra

    run.objective.step = step
    loop.train(run)
    run.writer.close()
    run.experts.remove()
    return {"losses": run.progress.losses, "kl": kls}


@torch.no_grad()
def model_logits(run: loop.Run, batch) -> torch.Tensor:
    return run.model[0](batch["tokens"], batch["position_ids"], None).float()


def hand_kl(tmp: Path, teacher: str, temperatures=(1.0, 2.0)) -> dict:
    """Mean over the first global batch's tokens of T^2 KL(softmax(z_t/T) || softmax(z_s/T)), computed in
    float64 from full-vocabulary logits of two plainly loaded models (DP2: whole logits on each rank)."""
    student = loop.setup(make_cfg(tmp / "hand_student", []), None)
    taught = loop.setup(make_cfg(tmp / "hand_teacher", TEACHER + [f"checkpoint.load=\"{teacher}\""]), None)
    t = student.cfg.train
    layout = BatchLayout(t.global_batch_size, t.micro_batch_size, student.groups.dims.dp, student.groups.dp_rank)
    total = torch.zeros(len(temperatures), 2, dtype=torch.float64)
    for batch in next(iter_global_batches(student.data.train, layout, 0)):
        z_s, z_t = model_logits(student, batch).double(), model_logits(taught, batch).double()
        mask = batch["loss_mask"].double()
        for i, temp in enumerate(temperatures):
            log_s, log_t = torch.log_softmax(z_s / temp, -1), torch.log_softmax(z_t / temp, -1)
            kl = temp ** 2 * (log_t.exp() * (log_t - log_s)).sum(-1)
            total[i] += torch.stack([(kl * mask).sum(), mask.sum()])
    dist.all_reduce(total)
    for run in (student, taught):
        run.experts.remove()
    return {str(temp): float(total[i, 0] / total[i, 1]) for i, temp in enumerate(temperatures)}


def refusal(tmp: Path, name: str, overrides) -> dict | None:
    """The ConfigError a student setup raises (field and message), or None."""
    try:
        loop.setup(make_cfg(tmp / name, overrides), pretrain_objective(make_cfg(tmp / name, overrides)))
    except C.ConfigError as err:
        return {"field": err.field, "message": str(err)}
    return None


def main(out: Path, case: dict) -> None:
    tmp = out.parent / "distill"
    iters = case["iters"]
    teachers = write_teachers(tmp, case["teacher_iters"])
    res = {"teachers": teachers, "plain": train_student(tmp, "plain", iters, [])}
    trained = f"distill.teacher=\"{teachers['trained']}\""
    res["weight0"] = train_student(tmp, "weight0", iters, [trained, "distill.weight=0.0"])
    own = [f"distill.teacher=\"{teachers['initial']}\"", "distill.weight=0.5"]
    res["self"] = train_student(tmp, "self", iters, own)
    vpp = ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]
    res["self_vpp"] = train_student(tmp, "self_vpp", iters, own + vpp)
    for name, over in LAYOUTS.items():
        res[name] = train_student(tmp, name, iters, [trained, "distill.weight=0.5", *over])
    res["hot"] = train_student(tmp, "hot", 2, [trained, "distill.weight=0.5", "distill.temperature=2.0",
                                               "log.tensorboard=true"])
    # a supernet teacher is its whole network (= its largest sub-network): same initial weights, KL 0
    res["from_supernet"] = train_student(tmp, "from_supernet", 1, [f"distill.teacher=\"{teachers['supernet']}\""])
    res["hand_kl"] = hand_kl(tmp, teachers["trained"])
    rank = dist.get_rank()
    # last: a refused setup shuts the process group down (as `ernie pretrain` exits)
    res["misfit"] = refusal(tmp, "misfit", [trained, "parallel.pipeline=2", "parallel.virtual_pipeline=2"])
    if rank == 0:
        (out.parent / "student.toml").write_text(C.dumps(make_cfg(tmp / "cli", [])))
        out.write_text(json.dumps(res))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
