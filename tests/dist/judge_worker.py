"""Judge scenarios that need megatron-core in a process of their own (run under torchrun, 1 process).

    torchrun --nproc_per_node=1 tests/dist/judge_worker.py checkpoint OUT.json CASE_JSON

"checkpoint": writes a complete checkpoint of a freshly initialised tiny MoE
(configs/rl_tiny_cpu.toml with the case's overrides, tasks open_ended and
arithmetic, a character tokenizer that also writes the judge's separator)
into case["run_dir"], loads it as a judge (rl/judge) and compares its scores
with p("y") from a direct, unpadded fp32 forward pass of the saved model over
the judge's text, one sample at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_ernie import config as C
from megatron_ernie.data.char_tokenizer import CharTokenizer
from megatron_ernie.rl.judge.data import SEPARATOR, judge_text
from megatron_ernie.rl.judge.scorer import JudgeScorer, load_judge
from megatron_ernie.rl.protocol import Sample, ScoredSample
from megatron_ernie.rl.task_tokenizer import task_texts
from untrained import save_untrained_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def save_checkpoint(cfg, groups, run_dir: Path):
    tokenizer = CharTokenizer.train(task_texts(cfg.rl.tasks) + [SEPARATOR])
    engine, path = save_untrained_checkpoint(cfg, groups, tokenizer, run_dir)
    return engine, tokenizer, path


def samples_to_score(tokenizer) -> list[ScoredSample]:
    """Open-ended prompts with responses of several lengths: empty, right, wrong, one cut at an end-of-text."""
    texts = [("three fruit:", "fig,plum,pear"), ("three tool:", ""), ("three color:", "red,red"),
             ("three animal:", "cat,dog,cow,pig,fox,owl,bat"), ("three body:", "arm")]
    out = []
    for i, (prompt, response) in enumerate(texts):
        ids = tokenizer.encode(response) + ([tokenizer.eod_id] + tokenizer.encode("leg") if i == 4 else [])
        sample = Sample(f"{i}:open_ended", 0, "open_ended", np.asarray(tokenizer.encode(prompt), np.int32),
                        np.asarray(ids, np.int32), np.zeros(len(ids), np.float32), 0)
        out.append(ScoredSample(sample, i / 4, "ok" if i else "wrong"))
    return out


def sample_text(tokenizer, scored: ScoredSample) -> tuple[str, str]:
    s = scored.sample
    response = list(s.response_tokens)
    response = response[: response.index(0)] if 0 in response else response
    return tokenizer.decode(s.prompt_tokens), tokenizer.decode(response)


@torch.no_grad()
def direct_text_yes(model, tokenizer, text: str, max_length: int) -> float:
    ids = tokenizer.encode(text)
    if len(ids) > max_length:  # the judge keeps the start and its separator
        ids = ids[: max_length - 1] + ids[-1:]
    tokens = torch.as_tensor(ids, dtype=torch.long)[None]
    logits = model(tokens, torch.arange(tokens.shape[1])[None], None)[0, -1, : tokenizer.vocab_size].float()
    return float(torch.softmax(logits, -1)[tokenizer.encode("y")[0]])


def direct_yes(model, tokenizer, scored: ScoredSample, max_length: int) -> float:
    return direct_text_yes(model, tokenizer, judge_text(*sample_text(tokenizer, scored)), max_length)


def direct_items(model, tokenizer, scored: ScoredSample, max_length: int) -> dict:
    """A per-item judge by hand: p("y") of "CATEGORY:ITEM\n" for each distinct item, one at a time, and
    the rubric's count rule over them: min(sum, count) / max(count, items listed)."""
    prompt, response = sample_text(tokenizer, scored)
    count = ("", "one", "two", "three", "four", "five").index(prompt.split(" ")[0])
    items = [item.strip() for item in response.split("\n")[0].split(",") if item.strip()]
    category = prompt.split(" ")[1]  # "fruit:"
    ps = [direct_text_yes(model, tokenizer, category + item + SEPARATOR, max_length) for item in dict.fromkeys(items)]
    return {"score": min(sum(ps), count) / max(count, len(items)) if items else 0.0, "questions": len(ps)}


def scenario_checkpoint(case: dict, _tmp: Path) -> dict:
    from megatron_ernie.runtime import groups as G
    from megatron_ernie.runtime.dims import ParallelDims

    run_dir = Path(case["run_dir"])
    cfg = C.load(ROOT / "configs" / "rl_tiny_cpu.toml", [f'run.dir="{run_dir}"', *case.get("overrides", [])])
    groups = G.build_groups(ParallelDims(world=1))
    G.model_parallel_seed(cfg.run.seed)
    engine, tokenizer, ckpt = save_checkpoint(cfg, groups, run_dir)
    samples = samples_to_score(tokenizer)
    scorer, _, _ = load_judge(ckpt, "fp32", batch_samples=3, groups=groups)
    judged, _ = scorer.score(samples)
    direct = [direct_yes(engine.model, tokenizer, s, cfg.model.seq_length) for s in samples]
    items = JudgeScorer(scorer.model, tokenizer, cfg.model.seq_length, batch_samples=2, verdicts="items")
    judged_items, _ = items.score(samples)
    by_hand = [direct_items(engine.model, tokenizer, s, cfg.model.seq_length) for s in samples]
    lengths = [len(s.sample.prompt_tokens) + len(s.sample.response_tokens) + 1 for s in samples]
    return {"checkpoint": str(ckpt), "scores": [s.reward for s in judged], "direct": direct,
            "rubric": [s.rubric_reward for s in judged], "given": [s.reward for s in samples],
            "order_ok": [s.sample.prompt_id for s in judged] == [s.sample.prompt_id for s in samples],
            "statuses": [s.status for s in judged], "lengths": lengths,
            "max_length": cfg.model.seq_length, "item_scores": [s.reward for s in judged_items],
            "item_direct": [d["score"] for d in by_hand], "item_questions": [d["questions"] for d in by_hand],
            "item_rubric": [s.rubric_reward for s in judged_items]}


SCENARIOS = {"checkpoint": scenario_checkpoint}


if __name__ == "__main__":
    import runner

    runner.run(SCENARIOS)
