"""Teacher scenarios that need megatron-core in a process of their own (run under torchrun, 1 process).

    torchrun --nproc_per_node=1 tests/dist/teacher_worker.py checkpoint OUT.json CASE_JSON

"checkpoint": writes a complete checkpoint of a freshly initialised tiny MoE
(configs/rl_tiny_cpu.toml with the case's overrides: config.toml,
tokenizer.json, weights) into case["run_dir"] — the teacher and the student of
the end-to-end tests — then loads it as a teacher (rl/teacher) and compares
its log-probs, for both payloads, with a direct forward pass of the model
that was saved, one unpadded sample at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_ernie import config as C
from megatron_ernie.rl.protocol import Sample, ScoredSample
from megatron_ernie.rl.rollout.engine import SamplingParams
from megatron_ernie.rl.task_tokenizer import tokenizer_for
from megatron_ernie.rl.tasks import get_task
from megatron_ernie.rl.teacher.engine import load_scorer
from untrained import save_untrained_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def save_checkpoint(cfg, groups, run_dir: Path):
    tokenizer = tokenizer_for(cfg)
    engine, path = save_untrained_checkpoint(cfg, groups, tokenizer, run_dir)
    return engine, tokenizer, path


def samples_to_score(engine, tokenizer, cfg) -> list[ScoredSample]:
    """Generated samples of the run's task, plus hand-made ones of other lengths (including empty)."""
    task = get_task("arithmetic")
    examples = task.examples(0, 0, 6, {"digits": 1, "ops": "-"})
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    params = SamplingParams.from_config(cfg.rl.sampling, tokenizer.eod_id, 2)
    out = [(p, g.response_tokens) for p, g in zip(prompts, engine.generate(prompts, params))]
    rng = np.random.default_rng(0)
    for length in (0, 1, 5, 11):
        prompt = prompts[length % len(prompts)][: 4 - length % 3]
        out.append((prompt, rng.integers(0, tokenizer.vocab_size, length)))
    return [ScoredSample(Sample(f"{i}:arithmetic", 0, "arithmetic", np.asarray(p, np.int32),
                                np.asarray(r, np.int32), np.zeros(len(r), np.float32), 0), 0.0, "wrong")
            for i, (p, r) in enumerate(out)]


@torch.no_grad()
def direct_rows(model, scored: ScoredSample, vocab: int) -> torch.Tensor:
    """Log-softmax rows of one sample's response tokens from its own unpadded forward pass."""
    s = scored.sample
    tokens = torch.as_tensor(np.concatenate([s.prompt_tokens, s.response_tokens]), dtype=torch.long)[None]
    logits = model(tokens, torch.arange(tokens.shape[1])[None], None)[0, :, :vocab].float()
    p = len(s.prompt_tokens)
    return torch.log_softmax(logits, -1)[p - 1: p - 1 + len(s.response_tokens)]


def _max_abs(diff: torch.Tensor) -> float:
    return float(diff.abs().max()) if diff.numel() else 0.0


def compare_payload(engine, tokenizer, ckpt: Path, samples, payload: str, groups) -> dict:
    scorer, teacher_tokenizer, _ = load_scorer(ckpt, "t", payload, "fp32", batch_samples=4, groups=groups)
    scored, _ = scorer.score(samples)
    full_diff = sampled_diff = 0.0
    shapes_ok = True
    for got in scored:
        rows = direct_rows(engine.model, got, tokenizer.vocab_size)
        picked = rows.gather(1, torch.as_tensor(got.sample.response_tokens, dtype=torch.long)[:, None])[:, 0]
        sampled_diff = max(sampled_diff, _max_abs(picked - torch.from_numpy(got.teacher_logprobs.copy())))
        if payload == "full":
            shapes_ok &= got.teacher_full.shape == (len(got.sample.response_tokens), tokenizer.vocab_size)
            full_diff = max(full_diff, _max_abs(rows - torch.from_numpy(got.teacher_full.copy())))
        else:
            shapes_ok &= got.teacher_full is None
    sums = [float(np.exp(s.teacher_full).sum(-1).max(initial=1)) for s in scored] if payload == "full" else []
    return {"sampled_max_diff": sampled_diff, "full_max_diff": full_diff, "shapes_ok": bool(shapes_ok),
            "teachers": sorted({s.teacher for s in scored}), "count": len(scored),
            "order_ok": [s.sample.prompt_id for s in scored] == [s.sample.prompt_id for s in samples],
            "row_sum_max_dev": max([abs(x - 1) for x in sums], default=0.0),
            "vocab": tokenizer.vocab_size, "teacher_vocab": teacher_tokenizer.vocab_size}


def scenario_checkpoint(case: dict, _tmp: Path) -> dict:
    from megatron_ernie.runtime import groups as G
    from megatron_ernie.runtime.dims import ParallelDims

    run_dir = Path(case["run_dir"])
    cfg = C.load(ROOT / "configs" / "rl_tiny_cpu.toml", [f'run.dir="{run_dir}"', *case.get("overrides", [])])
    groups = G.build_groups(ParallelDims(world=1))
    G.model_parallel_seed(cfg.run.seed)
    engine, tokenizer, ckpt = save_checkpoint(cfg, groups, run_dir)
    samples = samples_to_score(engine, tokenizer, cfg)
    return {"checkpoint": str(ckpt), "lengths": [len(s.sample.response_tokens) for s in samples],
            **{payload: compare_payload(engine, tokenizer, ckpt, samples, payload, groups)
               for payload in ("sampled", "full")}}


SCENARIOS = {"checkpoint": scenario_checkpoint}


if __name__ == "__main__":
    import runner

    runner.run(SCENARIOS)
