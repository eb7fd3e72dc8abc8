"""Multi-process scenarios for the distributed tests (run under torchrun).

    torchrun --nproc_per_node=N tests/dist/worker.py SCENARIO OUT.json [CASE_JSON]

Each scenario runs several cases inside one launch (process start-up, ~5 s of
importing megatron per process, dominates on CPU) and rank 0 writes the
results as JSON for the pytest side to assert on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ernie import config as C
from megatron_ernie.checkpoint import store
from megatron_ernie.cli import pretrain_objective
from megatron_ernie.train import loop
from megatron_ernie.train import step as S

BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=128", "model.seq_length=32", "moe.num_experts=4", "moe.router_topk=2",
    "moe.expert_ffn_hidden_size=64", "moe.router_pre_softmax=true", "data.vocab_size=512", "train.global_batch_size=8",
    "train.micro_batch_size=2", "train.eval_interval=0", "train.eval_iters=2", "checkpoint.save_interval=0",
    "checkpoint.save_on_exit=false", "checkpoint.resume=none", "log.tensorboard=false", "log.level=\"WARNING\"",
    "schedule.warmup_iters=0",
]


def make_cfg(run_dir: str, overrides) -> C.ErnieConfig:
    return C.load(None, BASE + [f"run.dir=\"{run_dir}\""] + list(overrides))


def param_fingerprint(model_chunks) -> list[float]:
    """Per-rank float64 sum and sum of squares of every local parameter."""
    vals = []
    for chunk in model_chunks:
        for p in chunk.parameters():
            vals += [p.double().sum().item(), p.double().pow(2).sum().item()]
    return vals


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def setup(cfg: C.ErnieConfig) -> loop.Run:
    """A run with the objective `ernie pretrain` would pick (the elastic sandwich for a supernet)."""
    return loop.setup(cfg, pretrain_objective(cfg))


def run_case(run_dir: str, overrides) -> loop.Run:
    run = setup(make_cfg(run_dir, overrides))
    loop.train(run)
    return run


def scenario_equivalence(case: dict, tmp: Path) -> dict:
    """Same seed and data at several layouts: loss curves must agree."""
    results = {}
    for name, overrides in case["layouts"].items():
        run = run_case(str(tmp / name), overrides + [f"train.iters={case['iters']}"])
        results[name] = run.progress.losses
        if case.get("save_from") == name:
            loop.save_checkpoint(run)
            results["saved_eval"] = loop.evaluate(run)
        run.experts.remove()
    if case.get("load_into"):
        name, overrides = case["load_into"]
        src = tmp / case["save_from"] / "checkpoints" / "latest"
        path = src.parent / src.read_text().strip()
        run = setup(make_cfg(str(tmp / name), overrides + [f"checkpoint.load=\"{path}\""]))
        results["loaded_eval"] = loop.evaluate(run)
    return results


def resume_variant(n: int, over: list, tmp: Path) -> dict:
    straight = run_case(str(tmp / "straight"), over + [f"train.iters={2 * n}"])
    first = run_case(str(tmp / "split"), over + [f"train.iters={2 * n}", f"train.exit_interval={n}",
                                                 "checkpoint.save_on_exit=true"])
    second = run_case(str(tmp / "split"), over + [f"train.iters={2 * n}", "checkpoint.resume=\"auto\""])
    return {"straight": straight.progress.losses, "first": first.progress.losses,
            "second": second.progress.losses, "resumed_at": first.progress.iteration,
            "fp_straight": gather(param_fingerprint(straight.model)),
            "fp_split": gather(param_fingerprint(second.model))}


def scenario_resume(case: dict, tmp: Path) -> dict:
    """2N iterations straight vs N, stop, resume, N: identical losses and weights."""
    return {name: resume_variant(case["n"], over, tmp / name) for name, over in case["variants"].items()}


ELASTIC = ["elastic.enabled=true", "elastic.depth=[2, 3]", "elastic.ffn=[0.5]", "elastic.experts=[2]",
           "elastic.topk=[1]", "elastic.sandwich_random=1", "elastic.distill_weight=0.5", "elastic.eval_subnets=0"]
PROBE_SUBNETS = ["depth=2,ffn=0.5,experts=2,topk=1", "depth=3,ffn=1,experts=4,topk=1",
                 "depth=4,ffn=0.5,experts=4,topk=2", "depth=4,ffn=1,experts=2,topk=2", ""]


def eval_subnets(run, texts) -> dict:
    from megatron_ernie.elastic.search import evaluate
    from megatron_ernie.elastic.subnet import parse_subnet

    subnets = [parse_subnet(t, run.cfg.model, run.cfg.moe) for t in texts]
    return {str(s): r["valid_loss"] for s, r in zip(subnets, evaluate(run, subnets))}


def scenario_elastic(case: dict, tmp: Path) -> dict:
    """Elastic training at several layouts: same sandwich losses, same sub-network losses; then the
    recipe options (case["recipe"]: targets, gate, ramp, open_after) at their own layouts."""
    results = {}
    for name, overrides in case["layouts"].items():
        run = run_case(str(tmp / name), ELASTIC + overrides + [f"train.iters={case['iters']}"])
        results[name] = {"losses": run.progress.losses, "subnets": eval_subnets(run, PROBE_SUBNETS)}
        if case.get("save_from") == name:
            loop.save_checkpoint(run)
        run.experts.remove()
    recipe = case.get("recipe", {})
    for name, overrides in recipe.get("layouts", {}).items():
        over = ELASTIC + recipe["options"] + overrides + [f"train.iters={case['iters']}"]
        run, scalars = train_recording(str(tmp / name), over)
        results[name] = {"losses": run.progress.losses, "scalars": scalars,
                         "subnets": eval_subnets(run, PROBE_SUBNETS[:1] + recipe.get("probe", []))}
        run.experts.remove()
    return results


def train_recording(run_dir: str, overrides) -> tuple[loop.Run, list[dict]]:
    """Train, keeping every step's elastic/* scalars (what the objective logs)."""
    run = setup(make_cfg(run_dir, overrides))
    scalars, step = [], run.objective.step

    def recording(r, batches):
        result, extra = step(r, batches)
        scalars.append({k: v for k, v in extra.items() if k.startswith("elastic/")})
        return result, extra

    run.objective.step = recording
    loop.train(run)
    return run, scalars


def scenario_extract(case: dict, tmp: Path) -> dict:
    """One process: supernet sub-network loss vs the extracted model's loss."""
    from megatron_ernie.elastic import extract
    from megatron_ernie.elastic.params import subnet_size
    from megatron_ernie.elastic.session import open_supernet
    from megatron_ernie.elastic.subnet import parse_subnet
    from megatron_ernie.model.build import padded_vocab_size

    supernet = open_supernet(case["run_dir"], ["train.eval_iters=2"], single_process=True)
    out = {}
    for i, text in enumerate(case["subnets"]):
        s = parse_subnet(text, supernet.cfg.model, supernet.cfg.moe)
        super_loss = eval_subnets(supernet, [text])[str(s)]
        ckpt, n_params = extract.extract(supernet, s, tmp / f"extracted_{i}")
        sub = loop.setup(C.load(tmp / f"extracted_{i}" / "config.toml", [
            f"checkpoint.load=\"{ckpt}\"", "checkpoint.resume=\"none\"", "train.eval_iters=2",
            f"run.dir=\"{tmp / f'extracted_{i}_eval'}\"", "log.tensorboard=false"]))
        vocab = padded_vocab_size(supernet.data.tokenizer.vocab_size, 1)
        tokens = torch.arange(32).remainder(supernet.data.tokenizer.vocab_size).view(2, 16)
        with torch.no_grad():
            sub.model[0].eval()
            logits = sub.model[0](tokens, torch.arange(16).expand(2, -1), None)
        out[text] = {"tokens": tokens.tolist(), "logits": logits.tolist(),"supernet": super_loss, "extracted": loop.evaluate(sub), "params": n_params,
                     "predicted": subnet_size(supernet.cfg.model, supernet.cfg.moe, vocab, s).total,
                     "counted": sum(p.numel() for p in sub.model[0].parameters()), "checkpoint": str(ckpt),
                     "config": str(tmp / f"extracted_{i}" / "config.toml")}
    out["continuation"] = continuation_facts(supernet, ckpt, tmp / f"extracted_{i}" / "config.toml", tmp)
    out["moments"] = moment_facts(case["run_dir"], case["subnets"][0], tmp)
    return out


def moment_facts(run_dir: str, text: str, tmp: Path) -> dict:
    """`ernie extract --optimizer`: the continuation's Adam state after loading the extracted checkpoint
    vs the supernet's, sliced here by hand for the router and each kept expert's projections; then one
    optimizer step of the continuation vs one step of the supernet set to that sub-network, on the same
    batch at the same LR, with the supernet's load-balancing loss on (ElasticTopKRouter scales its
    coefficient by kept/all experts, so the in-supernet loss equals the extracted model's)."""
    from megatron_ernie.data.loader import BatchLayout, iter_global_batches
    from megatron_ernie.elastic import extract
    from megatron_ernie.elastic.model import apply_subnet
    from megatron_ernie.elastic.session import open_supernet
    from megatron_ernie.elastic.subnet import kept_channels, kept_layers, layer_ranking, parse_subnet

    supernet = open_supernet(run_dir, ["checkpoint.load_optimizer=true"], single_process=True)
    cfg = supernet.cfg
    s = parse_subnet(text, cfg.model, cfg.moe)
    ckpt, _ = extract.extract(supernet, s, tmp / "extracted_opt", with_optimizer=True)
    cont = loop.setup(C.load(tmp / "extracted_opt" / "config.toml", [
        f"checkpoint.load=\"{ckpt}\"", "checkpoint.resume=\"none\"", f"run.dir=\"{tmp / 'cont_opt'}\"",
        "log.tensorboard=false", "schedule.continue_warmup_fraction=0"]))
    sup = dict(supernet.model[0].module.named_parameters())
    keep = sorted(kept_layers(s.depth, layer_ranking(cfg.model.num_layers, cfg.elastic.layer_order)))
    full, width = cfg.moe.expert_ffn_hidden_size, kept_channels(s.ffn, cfg.moe.expert_ffn_hidden_size)

    def by_hand(name, tensor):
        """The supernet tensor that the extracted model's ``name`` is a slice of, sliced."""
        if ".router." in name:
            return tensor[: s.experts]
        if name.endswith("linear_fc1.weight") and ".experts." in name:
            return torch.cat([tensor[:width], tensor[full:full + width]])
        if name.endswith("linear_fc2.weight") and ".experts." in name:
            return tensor[:, :width]
        return tensor

    def source(name):
        parts = name.split(".")
        return name if parts[1] != "layers" else ".".join(parts[:2] + [str(keep[int(parts[2])])] + parts[3:])

    theirs, ours = extract.adam_states(supernet.optimizer), extract.adam_states(cont.optimizer)
    named = dict(cont.model[0].module.named_parameters())
    diffs = [(ours[p][key] - by_hand(n, theirs[sup[source(n)]][key])).abs().max().item()
             for n, p in named.items() for key in ("exp_avg", "exp_avg_sq")]
    facts = {"max_diff": max(diffs), "compared": len(diffs), "n_params": len(named),
             "steps": sorted({float(st["step"]) for st in ours.values()}),
             "supernet_step": float(next(iter(theirs.values()))["step"]),
             "nonzero": sum(float(ours[p]["exp_avg_sq"].abs().sum()) > 0 for p in named.values()),
             "lrs": [supernet.optimizer.param_groups[0]["lr"], cont.optimizer.param_groups[0]["lr"]],
             "aux_loss_coeffs": [cfg.moe.aux_loss_coeff, cont.cfg.moe.aux_loss_coeff],
             "experts": [cfg.moe.num_experts, cont.cfg.moe.num_experts]}
    t = cont.cfg.train
    batch = next(iter_global_batches(cont.data.train, BatchLayout(t.global_batch_size, t.micro_batch_size),
                                     cont.progress.consumed_samples))
    for chunk in supernet.model:
        apply_subnet(chunk, s)
    before = {n: p.detach().clone() for n, p in named.items()}
    r_sup = S.train_step(supernet.model, supernet.optimizer, supernet.scheduler, batch, supernet.shape,
                         supernet.groups)
    r_sub = S.train_step(cont.model, cont.optimizer, cont.scheduler, batch, cont.shape, cont.groups)
    moved = [(p.detach() - before[n]).abs().max().item() for n, p in named.items()]
    step_diffs = [(p.detach() - by_hand(n, sup[source(n)].detach())).abs().max().item() for n, p in named.items()]
    return {**facts, "losses": [r_sup.loss, r_sub.loss], "grad_norms": [r_sup.grad_norm, r_sub.grad_norm],
            "step_max_diff": max(step_diffs), "step_max_update": max(moved)}


def continuation_facts(supernet, ckpt, config: Path, tmp: Path) -> dict:
    """What a continuation of an extracted checkpoint starts with: its data position (and whether its
    first batch holds any sample the supernet trained on), its LRs, and the opt-outs' positions."""
    from megatron_ernie.data.loader import BatchLayout, iter_global_batches

    def open_continuation(name, extra=()):
        return loop.setup(C.load(config, [f"checkpoint.load=\"{ckpt}\"", "checkpoint.resume=\"none\"",
                                          "train.iters=20", f"run.dir=\"{tmp / name}\"", "log.tensorboard=false",
                                          *extra]))

    def samples(data, start, count):
        return [tuple(data[k]["tokens"].tolist()) for k in range(start, start + count)]

    cont = open_continuation("cont")
    t = cont.cfg.train
    seen = set(samples(supernet.data.train, 0, supernet.progress.consumed_samples))
    first = next(iter_global_batches(cont.data.train, BatchLayout(t.global_batch_size, t.micro_batch_size),
                                     cont.progress.consumed_samples))
    first_samples = [tuple(row.tolist()) for mb in first for row in mb["tokens"]]
    lrs = []
    for _ in range(t.iters):  # the LR each continuation step uses (train_step steps the scheduler after it)
        lrs.append(cont.optimizer.param_groups[0]["lr"])
        cont.scheduler.step(increment=1)
    return {"supernet_consumed": supernet.progress.consumed_samples, "supernet_final_lr": supernet.optimizer.param_groups[0]["lr"],
            "supernet_peak_lr": supernet.cfg.optimizer.lr, "record": store.read_meta(ckpt).extra["continuation"],
            "start": cont.progress.consumed_samples, "iteration": cont.progress.iteration,
            "first_batch_size": len(first_samples), "first_batch_seen": sum(x in seen for x in first_samples),
            "supernet_first_batch_seen": sum(x in seen for x in samples(supernet.data.train, 0, t.global_batch_size)),
            "lrs": lrs, "opt_out_start": open_continuation("cont_restart", ["checkpoint.load_data_position=false"]).progress.consumed_samples,
            "sft_start": open_continuation("cont_sft", ["checkpoint.load_weights_only=true"]).progress.consumed_samples}


def _full_step(run, batches) -> float:
    from megatron_ernie.elastic.objective import use_full_model

    use_full_model(run)
    return S.train_step(run.model, run.optimizer, run.scheduler, batches, run.shape, run.groups).loss


def scenario_reorder(case: dict, tmp: Path) -> dict:
    """Reordering experts/channels (weights and Adam moments) leaves the full model unchanged."""
    from megatron_ernie.data.loader import BatchLayout, iter_global_batches
    from megatron_ernie.elastic import reorder
    from megatron_ernie.elastic.session import open_supernet

    out = {}
    for name in ("plain", "reordered"):
        run = open_supernet(case["run_dir"], ["checkpoint.load_optimizer=true"], single_process=True)
        before = loop.evaluate(run)
        moved = reorder.reorder(run) if name == "reordered" else {}
        t = run.cfg.train
        batches = list(zip(range(2), iter_global_batches(run.data.train, BatchLayout(t.global_batch_size, t.micro_batch_size), 64)))
        out[name] = {"eval_before": before, "eval_after": loop.evaluate(run), "moved": moved,
                     "steps": [_full_step(run, b) for _, b in batches], "eval_trained": loop.evaluate(run)}
    return out


SCENARIOS = {"equivalence": scenario_equivalence, "resume": scenario_resume, "elastic": scenario_elastic,
             "extract": scenario_extract, "reorder": scenario_reorder}


if __name__ == "__main__":
    import runner

    runner.run(SCENARIOS)
