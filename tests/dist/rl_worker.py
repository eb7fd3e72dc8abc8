"""RL scenarios that need megatron-core in a process of their own (run under torchrun).

    torchrun --nproc_per_node=1 tests/dist/rl_worker.py SCENARIO OUT.json [CASE_JSON]

One launch runs every check of a scenario (importing megatron costs ~5 s per
process on CPU); rank 0 writes the results as JSON for the pytest side.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ernie import config as C
from megatron_ernie.rl.batch import build_batch
from megatron_ernie.rl.policy import PolicyTrainer, rollout_k3
from megatron_ernie.rl.protocol import Sample, ScoredSample
from megatron_ernie.rl.rollout.engine import SamplingParams
from megatron_ernie.rl.rollout.megatron_engine import MegatronEngine
from megatron_ernie.rl.task_tokenizer import tokenizer_for
from megatron_ernie.rl.tasks import get_task
from megatron_ernie.rl.weight_sync import (GroupAddress, connect_group, gather_global, plan_buckets,
                                           receive_weights, send_weights)
from megatron_ernie.rl.protocol import WeightsReady

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.seq_length=32", "moe.num_experts=8", "moe.router_topk=2",
        "moe.expert_ffn_hidden_size=64", "moe.first_dense_layers=0", "rl.sampling.n_per_prompt=4",
        "log.tensorboard=false"]


def setup(overrides):
    from megatron_ernie.runtime import groups as G
    from megatron_ernie.runtime.dims import dims_from_config

    cfg = C.load(None, TINY + list(overrides))
    groups = G.build_groups(dims_from_config(cfg.parallel, dist.get_world_size()))
    G.model_parallel_seed(cfg.run.seed)
    return cfg, groups


def batch_from(generations, prompts, references, n: int, tokenizer, cfg):
    groups = []
    for g in range(len(prompts) // n):
        group = []
        for j in range(n):
            i = g * n + j
            gen = generations[i]
            sample = Sample(f"p{g}", j, "arithmetic", prompts[i], gen.response_tokens, gen.logprobs, 0,
                            gen.routed_experts, response_text=tokenizer.decode(gen.response_tokens),
                            reference=references[i], finish_reason=gen.finish_reason)
            group.append(ScoredSample(sample, float(j % 2), "ok"))
        groups.append(group)
    return build_batch(groups, cfg.rl.algorithm, cfg.model.seq_length)


def check_contract(generations, prompts, params) -> dict:
    """Lengths, finish reasons, stop tokens and routed-expert rows of a generation batch."""
    bad = []
    for prompt, gen in zip(prompts, generations):
        r = len(gen.response_tokens)
        if not 1 <= r <= params.max_new_tokens or len(gen.logprobs) != r:
            bad.append(f"length {r}")
        stopped_on = int(gen.response_tokens[-1]) in params.stop_token_ids or any(
            tuple(gen.response_tokens[-len(s):].tolist()) == s for s in params.stop_sequences)
        length_ok = gen.finish_reason != "length" or r == params.max_new_tokens
        if (gen.finish_reason == "stop") != stopped_on or not length_ok:
            bad.append(f"finish {gen.finish_reason} with {gen.response_tokens.tolist()}")
        routes = gen.routed_experts
        if routes.shape[0] != len(prompt) + r or (routes[:-1] < 0).any():
            bad.append(f"routes {routes.shape} / {(routes[:-1] < 0).sum()} unrouted rows before the last")
        if (routes[:-1] >= 8).any() or not (gen.logprobs <= 0).all():
            bad.append("expert id or log-prob out of range")
    return {"contract_errors": bad[:5], "n_stop": sum(g.finish_reason == "stop" for g in generations),
            "n_length": sum(g.finish_reason == "length" for g in generations)}


def used_route_mismatch(trainer, batch) -> tuple[int, int]:
    """Rows where the experts the trainer actually used differ from the rollout's (after a replay pass)."""
    recorded = trainer.routing.take_recorded()
    mismatched = compared = 0
    for layer, per_row in recorded.items():
        for row, used in enumerate(per_row):
            target = batch.routes[row, :, layer]  # [s, k]
            valid = (target >= 0).all(-1)
            same = (used.sort(-1).values == target.sort(-1).values).all(-1)
            mismatched += int((~same & valid).sum())
            compared += int(valid.sum())
    return mismatched, compared


def router_grad_under_replay(trainer, batch) -> float:
    model = trainer.model[0].module
    mb = batch.rows(slice(0, 2))
    trainer.routing.set_mode("replay")
    trainer.routing.set_targets(mb["routes"])
    logits = model(mb["tokens"], mb["position_ids"], None)
    logits[..., : trainer.vocab_size].float().log_softmax(-1).mean().backward()
    routers = [m.weight for n, m in model.named_modules() if n.endswith("router")]
    grads = [getattr(w, "main_grad", None) if getattr(w, "main_grad", None) is not None else w.grad for w in routers]
    trainer.routing.set_mode("off")
    norm = float(sum(g.norm() for g in grads if g is not None))
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # a bare backward set it 0-d; schedules expect [1]
    return norm


def train_steps(cfg, groups, tokenizer, batch) -> dict:
    """Two RL steps with a frozen reference (kl_coef > 0): metrics, and whether the weights moved."""
    from dataclasses import replace

    cfg = replace(cfg, rl=replace(cfg.rl, algorithm=replace(cfg.rl.algorithm, kl_coef=0.1)),
                  train=replace(cfg.train, micro_batch_size=8), schedule=replace(cfg.schedule, warmup_iters=0))
    trainer = PolicyTrainer(cfg, groups, tokenizer.vocab_size, routing_replay=True)
    before = [p.detach().clone() for p in trainer.model[0].parameters()]
    first, second = trainer.train_step(batch), trainer.train_step(batch)
    moved = sum(not torch.equal(a, b) for a, b in zip(before, trainer.model[0].parameters()))
    return {"first": first, "second": second, "params_moved": moved, "params": len(before),
            "version": trainer.version}


def broadcast_roundtrip(tensors: dict, bucket_mb: float) -> dict:
    """Trainer (rank 0) and one rollout (rank 1) as two threads with their own gloo group over TCP."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    ready = WeightsReady(3, tuple(plan_buckets(shapes, "fp32", bucket_mb)))
    out = {}

    def member(rank):
        group = connect_group(GroupAddress("127.0.0.1", store.port, 1, rank, 2), 60)
        if rank == 0:
            out["send"] = send_weights(group, ready, tensors)
        else:
            out["received"], out["recv"] = receive_weights(group, ready, shapes)

    threads = [threading.Thread(target=member, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    equal = all(torch.equal(out["received"][k], tensors[k]) for k in tensors)
    return {"buckets": len(ready.buckets), "nbytes": out["send"].nbytes, "equal": equal,
            "send_bytes_per_s": out["send"].bytes_per_s, "recv_bytes_per_s": out["recv"].bytes_per_s}


def scenario_rollout(case: dict, tmp: Path) -> dict:
    cfg, groups = setup(case.get("overrides", []))
    tokenizer = tokenizer_for(cfg)
    trainer = PolicyTrainer(cfg, groups, tokenizer.vocab_size, routing_replay=True)
    weights = gather_global(trainer.views)
    n = cfg.rl.sampling.n_per_prompt
    examples = get_task("arithmetic").examples(0, 0, case.get("prompts", 8), {})
    prompts = [tokenizer.encode(e.prompt) for e in examples for _ in range(n)]
    references = [e.reference for e in examples for _ in range(n)]
    results = {}
    stop = tuple(tokenizer.encode("="))
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(tokenizer.eod_id,), stop_sequences=(stop,))
    for dtype in ("fp32", "bf16"):
        engine = MegatronEngine(cfg.model, cfg.moe, groups, tokenizer.vocab_size, dtype=dtype, seed=11)
        engine.load_weights(weights, 0)
        start = time.perf_counter()
        generations = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        batch = batch_from(generations, prompts, references, n, tokenizer, cfg)
        r = {**check_contract(generations, prompts, params), "generate_s": seconds,
             "tokens": int(batch.response_lengths.sum())}
        for mode in ("compare", "replay"):
            logprobs, mismatch = trainer.sequence_logprobs(batch, mode)
            used = used_route_mismatch(trainer, batch)
            mask = batch.loss_mask.bool()
            r[mode] = {"k3": rollout_k3(logprobs, batch), "own_route_mismatch": mismatch,
                       "used_route_mismatch": used[0] / max(used[1], 1), "used_rows": used[1],
                       "max_abs_logprob_diff": float((logprobs - batch.rollout_logprobs)[mask].abs().max())}
        results[dtype] = r
    results["router_grad_norm_replay"] = router_grad_under_replay(trainer, batch)
    results["train_step"] = train_steps(cfg, groups, tokenizer, batch)
    results["sync"] = broadcast_roundtrip(weights, bucket_mb=0.05)
    return results


def fp8_scales_at(layout: list) -> dict:
    """Unified-FP8 trainer at `layout`: forward fixed tokens, gather the forward scales before/after commit."""
    from megatron_ernie.precision.model import commit_step_scaling
    from megatron_ernie.precision.sharing import gather_scales, scaling_holders

    cfg, groups = setup(["fp8.recipe=\"delayed\"", "fp8.backend=\"emulate\"", "model.init_method_std=0.1",
                         *layout])
    trainer = PolicyTrainer(cfg, groups, 40, fp8_per_step=True)
    holders = scaling_holders(trainer.model)
    tokens = torch.randint(0, 40, (8, 32), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(32).expand(8, 32)
    with torch.no_grad():
        trainer.model[0](tokens, positions, None)
    before = gather_scales(holders)
    commit_step_scaling(trainer.model)
    after = gather_scales(holders)
    if dist.get_rank() != 0:
        return {}
    return {"before": {k: float(v) for k, v in before.items()}, "after": {k: float(v) for k, v in after.items()}}


def scenario_fp8_scales(case: dict, tmp: Path) -> dict:
    """One launch, several trainer layouts (the same tokens on every rank)."""
    return {name: fp8_scales_at(layout) for name, layout in case["layouts"].items()}


def synthetic_batch(cfg, vocab: int, prompts: int = 4):
    """Fixed random prompts/responses (same on every rank), rewards alternating within each group."""
    import numpy as np

    rng = np.random.default_rng(3)
    n, groups = cfg.rl.sampling.n_per_prompt, []
    for g in range(prompts):
        prompt = rng.integers(3, vocab, size=int(rng.integers(4, 9))).astype(np.int32)
        group = []
        for j in range(n):
            response = rng.integers(3, vocab, size=int(rng.integers(2, 7))).astype(np.int32)
            logprobs = -rng.uniform(1.0, 4.0, size=len(response)).astype(np.float32)
            sample = Sample(f"p{g}", j, "arithmetic", prompt, response, logprobs, 0, None, response_text="x",
                            reference="x", finish_reason="length")
            group.append(ScoredSample(sample, float(j % 2), "ok"))
        groups.append(group)
    return build_batch(groups, cfg.rl.algorithm, cfg.model.seq_length)


def scenario_reference_layouts(case: dict, tmp: Path) -> dict:
    """RL steps with a frozen reference (kl_coef > 0) at several layouts: metrics per step."""
    results = {}
    for name, layout in case["layouts"].items():
        cfg, groups = setup(["rl.algorithm.kl_coef=0.1", "train.micro_batch_size=4", "schedule.warmup_iters=0",
                             "optimizer.lr=1e-2", *layout])
        trainer = PolicyTrainer(cfg, groups, 40, routing_replay=False)
        batch = synthetic_batch(cfg, 40)
        results[name] = [trainer.train_step(batch) for _ in range(case.get("steps", 3))]
        results[f"gather:{name}"] = gather_check(trainer)
    for name, layout in case.get("gather_layouts", {}).items():
        cfg, groups = setup(list(layout))
        results[f"gather:{name}"] = gather_check(PolicyTrainer(cfg, groups, 40, routing_replay=False))
    if "anchor" in case:
        results["anchor"] = reference_anchor(case["layouts"][case["anchor"]], tmp)
    return results


def gather_check(trainer) -> dict:
    """gather_global's global tensors (rank 0), sent back to every rank: each rank's own shards must
    equal their slice of them, so every element of every tensor is checked by the rank that holds it."""
    box = [gather_global(trainer.views)]
    dist.broadcast_object_list(box, src=0)
    full, counts = box[0], torch.zeros(2, dtype=torch.int64)
    for key, shards in trainer.views.items():
        for sh in shards:
            region = full[key][sh.global_slice()].reshape(sh.data.shape)
            counts += torch.tensor([int(not torch.equal(region, sh.data.detach().float())), 1])
    dist.all_reduce(counts)
    return {"mismatched": int(counts[0]), "shards": int(counts[1]), "keys": len(full),
            "dtypes": sorted({str(t.dtype) for t in full.values()})}


def reference_anchor(layout: list, tmp: Path) -> dict:
    """The KL reference of a run started from a checkpoint, and of the same run resumed from its own.

    A checkpoint `start` (weights moved by two steps) is loaded as the trainer
    role loads checkpoint.load; the run trains a step, saves version 1, trains
    one more; a third trainer resumes that version 1 and trains the same step.
    """
    from megatron_ernie.checkpoint import store
    from megatron_ernie.rl.trainer import restore_policy

    overrides = ["rl.algorithm.kl_coef=0.1", "train.micro_batch_size=4", "schedule.warmup_iters=0",
                 "optimizer.lr=1e-2", *layout]

    def fresh(seed: int):
        cfg, groups = setup([*overrides, f"run.seed={seed}"])
        return cfg, PolicyTrainer(cfg, groups, 40, routing_replay=False)

    def save(trainer, root: Path, version: int) -> Path:
        meta = store.Meta(iteration=version, consumed_samples=0, consumed_tokens=0, layout={},
                          extra={"scheduler": trainer.scheduler.state_dict()})
        return store.save(root, meta, trainer.model, trainer.optimizer, 2, {})

    cfg, mover = fresh(7)
    batch = synthetic_batch(cfg, 40)
    mover.train_step(batch), mover.train_step(batch)
    start = save(mover, tmp / "start", 2)
    _, run = fresh(8)
    restore_policy(run, tmp / "run", -1, start)
    first = run.train_step(batch)
    save(run, tmp / "run", 1)
    second = run.train_step(batch)
    _, resumed = fresh(9)
    restore_policy(resumed, tmp / "run", 1, start)
    again = resumed.train_step(batch)
    return {"first": first, "second": second, "resumed": again}


class RecordingEngine:
    """A follower's engine that keeps what each generate() returned, to compare with the leader's."""

    def __init__(self, engine):
        self.engine, self.outputs = engine, []

    def weight_shapes(self):
        return self.engine.weight_shapes()

    def load_weights(self, tensors, version):
        self.engine.load_weights(tensors, version)

    def generate(self, prompts, params):
        self.outputs.append(self.engine.generate(prompts, params))
        return self.outputs[-1]


def summarize(generations) -> list:
    return [[g.response_tokens.tolist(), g.logprobs.tolist(), g.routed_experts.tolist(), g.finish_reason]
            for g in generations]


def scenario_rollout_replica(case: dict, tmp: Path) -> dict:
    """Generation by a TP2 rollout replica (leader + follower) against the whole model on one rank."""
    from megatron_ernie.rl.rollout.replica import ReplicaEngine, init_replica_world, serve_replica
    from megatron_ernie.rl.system import SystemConfig
    from megatron_ernie.runtime import groups as G
    from megatron_ernie.runtime.dims import ParallelDims

    cfg = C.load(None, TINY + ["model.init_method_std=0.1"])
    tokenizer = tokenizer_for(cfg)
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(tokenizer.eod_id,),
                            stop_sequences=(tuple(tokenizer.encode("=")),))
    examples = get_task("arithmetic").examples(0, 0, 4, {})
    calls = [[tokenizer.encode(e.prompt) for e in examples for _ in range(4)],
             [tokenizer.encode(e.prompt) for e in examples[:2]]]  # a second call: the samplers stay in step
    groups = G.build_groups(ParallelDims(world=2))
    G.model_parallel_seed(cfg.run.seed)
    whole = MegatronEngine(cfg.model, cfg.moe, groups, tokenizer.vocab_size, dtype="fp32", seed=11)
    weights = gather_global(whole.views)  # rank 0: the global tensors (the leader's role)
    if weights is not None:
        whole.load_weights(weights, 0)
    reference = [summarize(whole.generate(prompts, params)) for prompts in calls]
    whole_numel = sum(p.numel() for p in whole.model.parameters())
    groups, control = init_replica_world(SystemConfig(rollout_workers=2, rollout_tensor=2), cfg.run.seed)
    shard = MegatronEngine(cfg.model, cfg.moe, groups, tokenizer.vocab_size, dtype="fp32", seed=11, tensor=2)
    if dist.get_rank() == 0:
        leader = ReplicaEngine(shard, control, wire_dtype="fp32", bucket_mb=0.05)  # several buckets
        leader.load_weights(weights, 3)
        outputs = [summarize(leader.generate(prompts, params)) for prompts in calls]
        leader.close()
    else:
        follower = RecordingEngine(shard)
        serve_replica(follower, control)
        outputs = [summarize(generations) for generations in follower.outputs]
    mine = {"outputs": outputs, "version": shard.policy_version,
            "numel": sum(p.numel() for p in shard.model.parameters())}
    members = [None, None]
    dist.all_gather_object(members, mine)
    return {"reference": reference, "leader": members[0], "follower": members[1], "whole_numel": whole_numel}


# ------------------------------------------------------------------ on-policy distillation

OPD = ['rl.algorithm.advantage="opd"', 'rl.distill.teachers={coder="/c", math="/m"}',
       'rl.tasks=[{name="arithmetic"}, {name="code"}]', 'rl.distill.routes={arithmetic="math", code="coder"}',
       "moe.num_experts=0", "model.num_layers=4", "train.micro_batch_size=4", "schedule.warmup_iters=0",
       "optimizer.lr=1e-3"]
OPD_VOCAB = 100  # padded to 128: at TP2 the second shard holds 36 real columns and 28 padding columns


def random_teacher_rows(prompt, response, vocab: int):
    """A fixed random teacher: log-softmax rows drawn from the sample's tokens as seed (same on every rank)."""
    import numpy as np

    rng = np.random.default_rng([int(t) for t in prompt] + [int(t) for t in response])
    logits = 2.0 * rng.normal(size=(len(response), vocab))
    return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)


def opd_batch(cfg, vocab: int, teacher_rows, prompts: int = 4):
    """Synthetic groups of two tasks routed to two teachers, scored by teacher_rows(prompt, response)."""
    import numpy as np

    rng = np.random.default_rng(3)
    n, groups = cfg.rl.sampling.n_per_prompt, []
    for g in range(prompts):
        task, alias = ("arithmetic", "math") if g % 2 == 0 else ("code", "coder")
        prompt = rng.integers(3, vocab, size=int(rng.integers(4, 9))).astype(np.int32)
        group = []
        for j in range(n):
            response = rng.integers(3, vocab, size=int(rng.integers(2, 7))).astype(np.int32)
            logprobs = -rng.uniform(1.0, 4.0, size=len(response)).astype(np.float32)
            sample = Sample(f"p{g}", j, task, prompt, response, logprobs, 0, None, finish_reason="length")
            rows = teacher_rows(prompt, response)
            sampled = rows[np.arange(len(response)), response]
            group.append(ScoredSample(sample, float(j % 2), "ok", teacher=alias, teacher_logprobs=sampled,
                                      teacher_full=rows))
        groups.append(group)
    return build_batch(groups, cfg.rl.algorithm, cfg.model.seq_length, distill=cfg.rl.distill)


def student_rows(trainer, vocab: int):
    """teacher_rows that return the (TP1, PP1) trainer's own log-softmax rows: self-distillation."""
    import numpy as np

    cache = {}

    def rows(prompt, response):
        key = (tuple(prompt.tolist()), tuple(response.tolist()))
        if key not in cache:
            tokens = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))[None]
            with torch.no_grad():
                logits = trainer.model[0](tokens, torch.arange(tokens.shape[1])[None], None)
            logp = torch.log_softmax(logits[0, :, :vocab].float(), -1)
            cache[key] = logp[len(prompt) - 1: len(prompt) + len(response) - 1].numpy().astype(np.float32)
        return cache[key]

    return rows


def chunk_grad_norms(trainer) -> list:
    """L2 norm of the accumulated gradient of each model chunk on this rank (after a step)."""
    norms = []
    for chunk in trainer.model:
        grads = [p.main_grad for p in chunk.parameters() if getattr(p, "main_grad", None) is not None]
        norms.append(float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0)
    return norms


def opd_run(layout: list, payload: str, teacher_rows, steps: int, alpha: float = 0.0) -> dict:
    cfg, groups = setup(OPD + [f'rl.distill.payload="{payload}"', f"rl.distill.alpha={alpha}", *layout])
    cfg.rl.validate("rl")
    trainer = PolicyTrainer(cfg, groups, OPD_VOCAB, routing_replay=False)
    batch = opd_batch(cfg, OPD_VOCAB, teacher_rows)
    metrics, grads = [], []
    for _ in range(steps):
        metrics.append(trainer.train_step(batch))
        grads.append(chunk_grad_norms(trainer))
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, grads)
    return {"metrics": metrics, "grad_norms": per_rank}


def sharded_reverse_kl(vocab: int) -> dict:
    """The vocabulary-parallel reverse KL on two TP shards (padding cut) against one device's full computation."""
    from megatron_ernie.model.vocab_parallel import vocab_parallel_reverse_kl
    from megatron_ernie.runtime import groups as G
    from megatron_ernie.runtime.dims import ParallelDims

    groups = G.build_groups(ParallelDims(world=2, tp=2))
    g = torch.Generator().manual_seed(vocab)
    padded = 128
    logits = (3 * torch.randn(3, 5, padded, generator=g))
    teacher = torch.log_softmax(2 * torch.randn(3, 5, vocab, generator=g), -1)
    full = logits[..., :vocab].clone().requires_grad_()
    expected = vocab_parallel_reverse_kl(full, teacher, None)
    expected.sum().backward()
    local = padded // 2
    start = groups.tp_rank * local
    width = max(min(start + local, vocab) - start, 0)
    shard = logits[..., start: start + local].clone().requires_grad_()
    got = vocab_parallel_reverse_kl(shard[..., :width], teacher[..., start: start + width], groups.pgs.tp)
    got.sum().backward()
    want_grad = torch.zeros(3, 5, local)
    want_grad[..., :width] = full.grad[..., start: start + width]
    return {"value_err": float((got - expected).abs().max()), "kl_mean": float(expected.mean()),
            "grad_err": float((shard.grad - want_grad).abs().max()), "grad_norm": float(shard.grad.norm()),
            "width": width}


def scenario_opd(case: dict, tmp: Path) -> dict:
    """One 2-process launch: sharded KL, layout invariance (both payloads), gradients per rank, self-distillation."""
    results = {"sharded_kl": {}}
    for vocab in (40, 100):
        mine = sharded_reverse_kl(vocab)
        both = [None, None]
        dist.all_gather_object(both, mine)
        results["sharded_kl"][str(vocab)] = both
    random_teacher = partial_rows(random_teacher_rows, OPD_VOCAB)
    steps = case.get("steps", 3)
    for payload, alpha in (("sampled", 0.0), ("full", 0.5)):  # full: the exact KL + alpha * GRPO advantage
        for name, layout in case["layouts"].items():
            results[f"{payload}/{name}"] = opd_run(layout, payload, random_teacher, steps, alpha)
    cfg, groups = setup(OPD + case["layouts"]["dp2"])
    reference = PolicyTrainer(cfg, groups, OPD_VOCAB, routing_replay=False)  # the same initial weights at any layout
    itself = student_rows(reference, OPD_VOCAB)
    opd_batch(cfg, OPD_VOCAB, itself)  # score every sample now, before other layouts rebuild the groups
    for payload in ("sampled", "full"):
        for name in case["self_layouts"]:
            results[f"self/{payload}/{name}"] = opd_run(case["layouts"][name], payload, itself, 1)
    return results


def partial_rows(fn, vocab: int):
    return lambda prompt, response: fn(prompt, response, vocab)


SCENARIOS = {"rollout": scenario_rollout, "fp8_scales": scenario_fp8_scales,
             "reference_layouts": scenario_reference_layouts, "rollout_replica": scenario_rollout_replica,
             "opd": scenario_opd}


if __name__ == "__main__":
    import runner

    runner.run(SCENARIOS)
