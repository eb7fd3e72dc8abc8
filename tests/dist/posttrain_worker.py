"""Post-training scenarios in one process (tests/test_posttrain_eval.py).

    torchrun --nproc_per_node=1 tests/dist/posttrain_worker.py engines OUT.json CASE_JSON

"engines": for each checkpoint, the engine from `engine_from_checkpoint`
against the pretraining trainer's model (build_model, DDP-wrapped as in
training, loaded with store.load from a different random init): full-sequence
logits, and the KV-cached greedy generation's log-probs against the model's
full forward over prompt + response. Then the broken checkpoints of the case
must each raise CheckpointError; their messages are returned.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import run  # noqa: E402


def _reference_model(cfg, groups, vocab_size: int):
    """The pretraining model of the checkpoint's config at TP1, fp32, loaded by the trainer's loader."""
    from megatron.core.utils import unwrap_model

    from megatron_ernie.config.schema import ParallelConfig
    from megatron_ernie.model.build import build_model

    model_cfg = dataclasses.replace(cfg.model, dtype="fp32")
    _, chunks = build_model(model_cfg, cfg.moe, ParallelConfig(), groups, vocab_size, seed=4242)
    return chunks, unwrap_model(chunks[0]).eval()


def _forward(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None).float()


def _generation_gap(engine, reference, vocab: int, prompts) -> float:
    """max |log-prob of each generated token (KV cache) - the reference's full-sequence log-prob|."""
    from megatron_ernie.rl.rollout.engine import SamplingParams

    params = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=6, stop_token_ids=())
    gap = 0.0
    for prompt, gen in zip(prompts, engine.generate(prompts, params)):
        full = torch.tensor([prompt + gen.response_tokens.tolist()])
        logprobs = F.log_softmax(_forward(reference, full)[0, :, :vocab], dim=-1)
        p = len(prompt)
        want = logprobs[p - 1:p - 1 + len(gen.response_tokens)].gather(
            -1, torch.as_tensor(gen.response_tokens, dtype=torch.long).unsqueeze(-1)).squeeze(-1)
        gap = max(gap, float((want - torch.as_tensor(gen.logprobs)).abs().max()))
    return gap


def _compare(path: str) -> dict:
    from megatron_ernie.checkpoint import store
    from megatron_ernie.rl.rollout.checkpoint_engine import engine_from_checkpoint, resolve_checkpoint
    from megatron_ernie.runtime import groups as G
    from megatron_ernie.runtime.dims import ParallelDims

    engine, tokenizer, cfg = engine_from_checkpoint(path, dtype="fp32", seed=0)
    vocab = tokenizer.vocab_size
    chunks, reference = _reference_model(cfg, G.build_groups(ParallelDims(world=1)), vocab)
    gen = torch.Generator().manual_seed(0)
    length = min(24, cfg.model.seq_length)
    tokens = torch.randint(2, vocab, (3, length), generator=gen)
    untrained_gap = float((_forward(reference, tokens) - _forward(engine.model, tokens)).abs().max())
    store.load(resolve_checkpoint(path), chunks, None, restore_rng=False)
    want, got = _forward(reference, tokens), _forward(engine.model, tokens)
    prompts = [tokens[i, : 3 + i].tolist() for i in range(3)]
    return {"iteration": engine.policy_version, "vocab": vocab, "tokenizer": type(tokenizer).__name__,
            "max_abs_logit_diff": float((want - got).abs().max()), "logit_scale": float(want.abs().max()),
            "untrained_gap": untrained_gap,
            "generation_logprob_gap": _generation_gap(engine, reference, vocab, prompts)}


def _error_of(path: str) -> str:
    from megatron_ernie.checkpoint.store import CheckpointError
    from megatron_ernie.rl.rollout.checkpoint_engine import engine_from_checkpoint

    try:
        engine_from_checkpoint(path)
    except CheckpointError as err:
        return str(err)
    return "loaded"


def scenario_engines(case: dict, tmp: Path) -> dict:
    return {"engines": {name: _compare(path) for name, path in case["checkpoints"].items()},
            "errors": {name: _error_of(path) for name, path in case.get("broken", {}).items()}}


if __name__ == "__main__":
    run({"engines": scenario_engines})
