"""Train/rollout mismatch (K3) of each FP8 pairing of the RL trainer and the rollout engine.

    python benchmarks/fp8_rollout_kl.py [--prompts 16] [--json OUT] [--set key=value ...]

ERNIE 5.1 runs rollout and training through one FP8 operator path, to shrink
the gap between the policy that generates and the policy that learns. This
measures that gap on CPU, in one process: the trainer's megatron-core model
(PolicyTrainer, bf16, the `[fp8]` emulation where the pairing says FP8) and a
rollout engine (MegatronEngine, bf16, KV cache) start from the same weights;
the engine samples responses to arithmetic prompts, and the trainer scores the
same tokens with a full-sequence forward. Reported per pairing: the masked
mean K3 (r = pi_rollout / pi_train, rl/algorithms.py) with routing replay on
(the RL default) and off, the largest |log-prob difference|, and the share of
(token, MoE layer) rows whose top-k the trainer would route differently.

Pairings: bf16 / bf16; FP8 rollout / bf16 train; FP8 / FP8 unified with
delayed scaling (the rollout quantises with the trainer's scales, shipped with
the weights: precision/sharing.py); FP8 / FP8 with delayed scaling but each
side keeping its own amax history; FP8 / FP8 with the stateless current and
blockwise recipes. Delayed-scaling states are first warmed on a separate
calibration batch (the trainer by scoring it, an engine with its own state by
generating it), as they would be a few steps into a run; the trainer's state is
restored after each measurement, so the pairings do not influence each other.

The model is the tiny MoE of the RL tests (2 layers, 8 experts, top-2) with
init_method_std = 0.1, so that its next-token distributions are far from
uniform. Expected: unified FP8 has a far lower K3 than an FP8 rollout against
a bf16 trainer, and sharing the delayed-scaling state matters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.seq_length=32", "model.dtype=\"bf16\"", "model.init_method_std=0.1",
        "moe.num_experts=8", "moe.router_topk=2", "moe.expert_ffn_hidden_size=64", "moe.first_dense_layers=0",
        "rl.sampling.n_per_prompt=4", "log.tensorboard=false", "fp8.backend=\"emulate\""]

# name, trainer recipe, rollout recipe, rollout uses the trainer's delayed-scaling scales
PAIRINGS = (
    ("bf16 / bf16", "off", "off", False),
    ("FP8 rollout / bf16 train", "off", "delayed", False),
    ("FP8 / FP8 unified (delayed, shared scales)", "delayed", "delayed", True),
    ("FP8 / FP8 delayed, separate scaling state", "delayed", "delayed", False),
    ("FP8 / FP8 unified (current)", "current", "current", False),
    ("FP8 / FP8 unified (blockwise)", "blockwise", "blockwise", False),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16, help="evaluation prompts (x n_per_prompt samples)")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--pairings", default="", help="comma-separated PAIRINGS indices to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    return p.parse_args(argv)


class Setup:
    """Config, solo process group, tokenizer, prompts and one trainer per recipe (same weights)."""

    def __init__(self, args):
        from megatron_ernie import config as C
        from megatron_ernie.rl.rollout.worker import init_solo_world
        from megatron_ernie.rl.task_tokenizer import tokenizer_for
        from megatron_ernie.rl.tasks import get_task

        self.cfg = C.load(None, BASE + list(args.overrides))
        self.groups = init_solo_world(self.cfg.run.seed)
        self.tokenizer = tokenizer_for(self.cfg)
        n = self.cfg.rl.sampling.n_per_prompt
        examples = get_task("arithmetic").examples(self.cfg.run.seed, 0, 2 * args.prompts, {"digits": 2})
        self.calibration = [e for e in examples[: args.prompts] for _ in range(n)]
        self.evaluation = [e for e in examples[args.prompts:] for _ in range(n)]
        self.max_new_tokens = args.max_new_tokens
        self._trainers: dict[str, object] = {}

    def fp8(self, recipe: str):
        return dataclasses.replace(self.cfg.fp8, recipe=recipe)

    def trainer(self, recipe: str, per_step: bool):
        """The PolicyTrainer with `recipe` (built once; a delayed one is calibrated on the first use).

        per_step: the unified trainer's scaling (amaxes enter the history once per step,
        here once after the calibration batch); otherwise TE's update after every forward.
        """
        key = (recipe, per_step)
        if key not in self._trainers:
            from megatron_ernie.precision.model import commit_step_scaling
            from megatron_ernie.rl.policy import PolicyTrainer

            trainer = PolicyTrainer(self.cfg, self.groups, self.tokenizer.vocab_size, routing_replay=True,
                                    fp8=self.fp8(recipe), fp8_per_step=per_step)
            self._trainers[key] = trainer
            if recipe == "delayed":
                batch = self.batch(self.engine("off", False, trainer), self.calibration)
                trainer.sequence_logprobs(batch, "replay")
                commit_step_scaling(trainer.model)
        return self._trainers[key]

    def engine(self, recipe: str, share: bool, trainer):
        """A bf16 rollout engine with `recipe`, loaded with the trainer's weights (and scales)."""
        from megatron_ernie.model.extensions import extensions_for
        from megatron_ernie.precision.sharing import gather_scales, scaling_holders
        from megatron_ernie.rl.rollout.megatron_engine import MegatronEngine
        from megatron_ernie.rl.weight_sync import gather_global

        cfg = self.cfg
        engine = MegatronEngine(cfg.model, cfg.moe, self.groups, self.tokenizer.vocab_size, dtype="bf16",
                                seed=cfg.run.seed, ext=extensions_for(cfg.model, cfg.moe, fp8=self.fp8(recipe)),
                                share_fp8_scales=share)
        tensors = gather_global(trainer.views)
        if share:
            tensors.update(gather_scales(scaling_holders(trainer.model)))
        engine.load_weights(tensors, 0)
        if recipe == "delayed" and not share:  # an engine's own history, warmed like the trainer's
            self.generate(engine, self.calibration)
        return engine

    def generate(self, engine, examples):
        from megatron_ernie.rl.rollout.engine import SamplingParams

        engine.generator.manual_seed(self.cfg.run.seed)
        params = SamplingParams(max_new_tokens=self.max_new_tokens, stop_token_ids=(self.tokenizer.eod_id,))
        return engine.generate([self.tokenizer.encode(e.prompt) for e in examples], params)

    def batch(self, engine, examples):
        """The engine's responses to `examples` as the trainer's PolicyBatch."""
        from megatron_ernie.rl.batch import build_batch
        from megatron_ernie.rl.protocol import Sample, ScoredSample

        generations = self.generate(engine, examples)
        n = self.cfg.rl.sampling.n_per_prompt
        groups = []
        for g in range(len(examples) // n):
            group = []
            for j in range(n):
                e, gen = examples[g * n + j], generations[g * n + j]
                sample = Sample(f"p{g}", j, "arithmetic", self.tokenizer.encode(e.prompt), gen.response_tokens,
                                gen.logprobs, 0, gen.routed_experts, reference=e.reference,
                                finish_reason=gen.finish_reason)
                group.append(ScoredSample(sample, float(j % 2), "ok"))
            groups.append(group)
        return build_batch(groups, self.cfg.rl.algorithm, self.cfg.model.seq_length)


def restore_scaling(trainer, saved: dict) -> None:
    from megatron_ernie.precision.model import fp8_linears

    for name, layer in fp8_linears(trainer.model[0]).items():
        if name in saved:
            layer.fp8_state.load_state_dict(saved[name])


def scales_match(engine, trainer) -> bool:
    """Whether the engine quantises with exactly the trainer's forward scales."""
    from megatron_ernie.precision.sharing import local_scales, scaling_holders

    mine = local_scales(engine.scale_holders)
    return bool(mine) and mine == local_scales(scaling_holders(trainer.model))


def measure(setup: Setup, name: str, trainer_recipe: str, rollout_recipe: str, share: bool) -> dict:
    from megatron_ernie.precision.model import fp8_scaling_state
    from megatron_ernie.rl.policy import rollout_k3

    trainer = setup.trainer(trainer_recipe, per_step=share)
    engine = setup.engine(rollout_recipe, share, trainer)
    saved = fp8_scaling_state(trainer.model[0])  # copies: state_dict() clones
    start = time.perf_counter()
    batch = setup.batch(engine, setup.evaluation)
    generate_s = time.perf_counter() - start
    row = {"pairing": name, "trainer": trainer_recipe, "rollout": rollout_recipe, "shared_scales": share,
           "tokens": int(batch.loss_mask.sum()), "generate_s": generate_s,
           "scales_match": scales_match(engine, trainer) if share else None}
    mask = batch.loss_mask.bool()
    for mode in ("replay", "compare"):
        restore_scaling(trainer, saved)
        logprobs, mismatch = trainer.sequence_logprobs(batch, mode)
        row[f"k3_{mode}"] = rollout_k3(logprobs, batch)
        row[f"max_abs_dlogp_{mode}"] = float((logprobs - batch.rollout_logprobs)[mask].abs().max())
        if mode == "compare":
            row["route_mismatch"] = mismatch
    restore_scaling(trainer, saved)
    return row


def print_table(rows: list[dict]) -> None:
    head = f"{'pairing (rollout / train)':<44} {'K3 replay':>10} {'K3 no-replay':>12} {'max|dlogp|':>10} " \
           f"{'route diff':>10} {'tokens':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['pairing']:<44} {r['k3_replay']:>10.2e} {r['k3_compare']:>12.2e} "
              f"{r['max_abs_dlogp_replay']:>10.2e} {r['route_mismatch']:>10.4f} {r['tokens']:>6}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setup = Setup(args)
    chosen = [PAIRINGS[int(i)] for i in args.pairings.split(",")] if args.pairings else PAIRINGS
    rows = [measure(setup, *pairing) for pairing in chosen]
    print_table(rows)
    k3 = {r["pairing"]: r["k3_replay"] for r in rows}
    if PAIRINGS[1][0] in k3 and PAIRINGS[2][0] in k3:
        mixed, unified = k3[PAIRINGS[1][0]], k3[PAIRINGS[2][0]]
        ratio = f"{mixed / unified:.1f}x lower" if unified > 0 else "0: the two sides compute identical log-probs"
        print(f"\nK3 of unified FP8 (delayed, shared scales) vs FP8 rollout / bf16 train ({mixed:.2e}): {ratio}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
