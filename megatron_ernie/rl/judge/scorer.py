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
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import torch

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.rl.judge.data import SEPARATOR, VERDICT_NO, VERDICT_YES, judge_text
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


def judge_input_ids(tokenizer, prompt_tokens, response_tokens, max_length: int) -> list[int]:
    """Token ids of judge_text(prompt, response), the response cut at its end-of-text, at most max_length."""
    response = [int(t) for t in response_tokens]
    if tokenizer.eod_id in response:
        response = response[: response.index(tokenizer.eod_id)]
    prompt_text, response_text = tokenizer.decode(prompt_tokens), tokenizer.decode(response)
    ids = tokenizer.encode(judge_text(prompt_text, response_text))
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
    """A frozen judge model giving ScoredSamples reward = p("y"), `batch_samples` per forward pass."""

    alias = JUDGE_ALIAS

    def __init__(self, model, tokenizer, max_seq_length: int, batch_samples: int = 32):
        self.model, self.tokenizer, self.max_seq_length = model, tokenizer, max_seq_length
        self.batch_samples = batch_samples
        self.yes_id = verdict_id(tokenizer, VERDICT_YES, "rl.judge.checkpoint")
        verdict_id(tokenizer, VERDICT_NO, "rl.judge.checkpoint")
        self.model.eval()

    def probabilities(self, samples: Sequence[ScoredSample]) -> list[float]:
        inputs = [judge_input_ids(self.tokenizer, s.sample.prompt_tokens, s.sample.response_tokens,
                                  self.max_seq_length) for s in samples]
        return yes_probabilities(self.model, inputs, self.yes_id, self.tokenizer.vocab_size,
                                 self.tokenizer.pad_id).tolist()

    def score(self, samples: Sequence[ScoredSample]) -> tuple[list[ScoredSample], float]:
        """The samples with reward = judge score and rubric_reward = their reward, and the forward seconds."""
        start, out = time.perf_counter(), []
        for i in range(0, len(samples), self.batch_samples):
            chunk = samples[i:i + self.batch_samples]
            out += [_judged(s, p) for s, p in zip(chunk, self.probabilities(chunk))]
        return out, time.perf_counter() - start


def _judged(scored: ScoredSample, probability: float) -> ScoredSample:
    score = float(np.clip(probability, 0.0, 1.0))
    return dataclasses.replace(scored, reward=score, rubric_reward=scored.reward,
                               detail=f"judge p(y) {score:.4f}; rubric {scored.reward:.4f}: {scored.detail}"[:2000])


def load_judge(checkpoint, dtype: str = "fp32", batch_samples: int = 32, seed: int = 0, groups=None):
    """(JudgeScorer, tokenizer, the checkpoint's config) from a judge checkpoint directory."""
    from megatron_ernie.rl.rollout.checkpoint_engine import engine_from_checkpoint

    engine, tokenizer, judge_cfg = engine_from_checkpoint(checkpoint, dtype=dtype, seed=seed, groups=groups,
                                                          field="rl.judge.checkpoint")
    return JudgeScorer(engine.model, tokenizer, judge_cfg.model.seq_length, batch_samples), tokenizer, judge_cfg
