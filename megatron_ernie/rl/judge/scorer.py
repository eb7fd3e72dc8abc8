"""The judge's scorer: p_judge("y" | prompt + response + separator) from one forward pass.

The judge reads exactly the text it was trained on (judge/data.py: the task
prompt, the response up to its end-of-text, SEPARATOR) encoded with the
run's tokenizer, and the score is the softmax probability of the verdict
token VERDICT_YES at the last position — temperature 1, fp32, over the
tokenizer's real vocabulary (padded-vocabulary rows cut first, as the
teacher does). That is a calibrated-by-training reward in [0, 1] which,
unlike a sampled "y"/"n", carries how sure the judge is.

Several samples share one forward: right-padded to the longest, which cannot
change a real position's logits (causal attention never looks right). A
sample longer than the judge's model.seq_length keeps its prompt and the
start of its response (the rubric reads only the first line).

A judge trained on per-item verdicts (its checkpoint's sft.source is
"judge-items", judge/data.py) is asked one question per distinct listed
item instead, and the sample's score is the task's aggregate of those
p("y") (judge/data.py: ITEM_QUESTIONS, the rubric's counting rule).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import torch

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.rl.judge.data import (ITEM_QUESTIONS, SEPARATOR, VERDICT_FORMATS, VERDICT_NO, VERDICT_YES,
                                          judge_text)
from megatron_ernie.rl.judge.routing import JUDGE_ALIAS
from megatron_ernie.rl.protocol import ScoredSample


def verdict_id(tokenizer, verdict: str, field: str) -> int:
    """The single token id of a verdict character; ConfigError when the tokenizer splits or lacks it."""
    try:
        ids = tokenizer.encode(verdict)
        tokenizer.encode(SEPARATOR)
    except ValueError as exc:
        raise ConfigError(field, verdict, f"the run's tokenizer cannot write the judge's verdict: {exc}") from None
    if len(ids) != 1:
        raise ConfigError(field, verdict, f"the tokenizer writes the verdict {verdict!r} as {len(ids)} tokens; the "
                                          "judge's score is the probability of ONE token")
    return ids[0]


def sample_texts(tokenizer, prompt_tokens, response_tokens) -> tuple[str, str]:
    """(prompt, response) as text, the response cut at its end-of-text."""
    response = [int(t) for t in response_tokens]
    if tokenizer.eod_id in response:
        response = response[: response.index(tokenizer.eod_id)]
    return tokenizer.decode(prompt_tokens), tokenizer.decode(response)


def text_input_ids(tokenizer, text: str, max_length: int) -> list[int]:
    """Token ids of a judge text; one longer than max_length keeps its start and its separator."""
    ids = tokenizer.encode(text)
    if len(ids) > max_length:
        separator = tokenizer.encode(SEPARATOR)
        ids = ids[: max_length - len(separator)] + separator
    return ids


@torch.no_grad()
def yes_probabilities(model, inputs: Sequence[Sequence[int]], yes_id: int, vocab_size: int,
                      pad_id: int = 1) -> torch.Tensor:
    """fp32 [N]: softmax probability of `yes_id` after each input, one forward pass for all."""
    lengths = torch.tensor([len(ids) for ids in inputs])
    tokens = torch.full((len(inputs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, ids in enumerate(inputs):
        tokens[i, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, positions, None)
    last = logits[torch.arange(len(inputs)), lengths - 1, :vocab_size].float()
    return torch.softmax(last, dim=-1)[:, yes_id]


class JudgeScorer:
    """A frozen judge model giving ScoredSamples reward = p("y"), `batch_samples` per forward pass.

    verdicts: "response" (one question per sample) or "items" (one per listed item, aggregated by
    the task's rule); load_judge takes it from the data the judge was trained on."""

    alias = JUDGE_ALIAS

    def __init__(self, model, tokenizer, max_seq_length: int, batch_samples: int = 32, verdicts: str = "response"):
        self.model, self.tokenizer, self.max_seq_length = model, tokenizer, max_seq_length
        self.batch_samples, self.verdicts = batch_samples, verdicts
        self.yes_id = verdict_id(tokenizer, VERDICT_YES, "rl.judge.checkpoint")
        verdict_id(tokenizer, VERDICT_NO, "rl.judge.checkpoint")
        self.model.eval()

    def yes(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """p("y") after judge_text(prompt, response) for each pair, `batch_samples` per forward."""
        out = []
        for i in range(0, len(pairs), self.batch_samples):
            inputs = [text_input_ids(self.tokenizer, judge_text(p, r), self.max_seq_length)
                      for p, r in pairs[i:i + self.batch_samples]]
            out += yes_probabilities(self.model, inputs, self.yes_id, self.tokenizer.vocab_size,
                                     self.tokenizer.pad_id).tolist()
        return out

    def text_scores(self, tasks: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[float]:
        """The judge's score of each (prompt, response) text of the given tasks."""
        if self.verdicts == "response":
            return self.yes(pairs)
        decomposed = [ITEM_QUESTIONS[task](prompt, response) for task, (prompt, response) in zip(tasks, pairs)]
        answers = iter(self.yes([q for questions, _ in decomposed for q in questions]))
        return [aggregate([next(answers) for _ in questions]) for questions, aggregate in decomposed]

    def score(self, samples: Sequence[ScoredSample]) -> tuple[list[ScoredSample], float]:
        """The samples with reward = judge score and rubric_reward = their reward, and the forward seconds."""
        start = time.perf_counter()
        pairs = [sample_texts(self.tokenizer, s.sample.prompt_tokens, s.sample.response_tokens) for s in samples]
        scores = self.text_scores([s.sample.task for s in samples], pairs)
        return [_judged(s, p) for s, p in zip(samples, scores)], time.perf_counter() - start


def _judged(scored: ScoredSample, probability: float) -> ScoredSample:
    score = float(np.clip(probability, 0.0, 1.0))
    return dataclasses.replace(scored, reward=score, rubric_reward=scored.reward,
                               detail=f"judge p(y) {score:.4f}; rubric {scored.reward:.4f}: {scored.detail}"[:2000])


def load_judge(checkpoint, dtype: str = "fp32", batch_samples: int = 32, seed: int = 0, groups=None):
    """(JudgeScorer, tokenizer, the checkpoint's config) from a judge checkpoint directory."""
    from megatron_ernie.rl.rollout.checkpoint_engine import engine_from_checkpoint

    engine, tokenizer, judge_cfg = engine_from_checkpoint(checkpoint, dtype=dtype, seed=seed, groups=groups,
                                                          field="rl.judge.checkpoint")
    scorer = JudgeScorer(engine.model, tokenizer, judge_cfg.model.seq_length, batch_samples,
                         judge_verdicts(judge_cfg))
    return scorer, tokenizer, judge_cfg


def judge_verdicts(judge_cfg) -> str:
    """What a judge checkpoint was trained to answer: "items" after [sft] source = "judge-items", else
    "response" (also for a judge trained on a .jsonl of whole-answer verdicts)."""
    return VERDICT_FORMATS.get(judge_cfg.sft.source, "response")
