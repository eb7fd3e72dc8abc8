"""The teacher's scorer: one teacher-forced forward pass, log-softmax at temperature 1.

For a sample x = prompt (P tokens) + response (R tokens), position t of a
causal forward pass predicts x[t+1], so response token j is scored at
position P + j - 1 from prompt + response[:j] — the same alignment as the
trainer's (rl/batch.py). Several samples share one forward: they are
right-padded to the longest, which cannot change a real position's logits
(causal attention never looks right, and MoE routing is per token).

Temperature 1 by construction: the scorer has no temperature parameter, and
log-softmax runs in fp32 over the tokenizer's real vocabulary V (the rows of
the padded vocabulary, lcm(128, TP) multiples, are cut first, so they take no
probability mass). Payload "sampled" returns log pi_T(y_j | c_j) of each
response token; "full" also returns the whole [R, V] rows, for the trainer's
exact reverse KL.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import torch

from megatron_ernie.rl.protocol import ScoredSample


@torch.no_grad()
def response_logprob_rows(model, pairs: Sequence[tuple[np.ndarray, np.ndarray]], vocab_size: int,
                          pad_id: int = 1) -> list[torch.Tensor]:
    """[R_i, V] fp32 log-softmax rows (temperature 1) of each (prompt, response) pair, from one forward pass."""
    lengths = [len(p) + len(r) for p, r in pairs]
    tokens = torch.full((len(pairs), max(lengths)), pad_id, dtype=torch.long)
    for i, (prompt, response) in enumerate(pairs):
        tokens[i, : lengths[i]] = torch.as_tensor(np.concatenate([prompt, response]), dtype=torch.long)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, positions, None)
    logprobs = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
    return [logprobs[i, len(p) - 1: len(p) - 1 + len(r)] for i, (p, r) in enumerate(pairs)]


class TeacherScorer:
    """A frozen model scoring ScoredSamples for one alias, `batch_samples` per forward pass."""

    def __init__(self, model, vocab_size: int, max_seq_length: int, alias: str, payload: str,
                 batch_samples: int = 32):
        self.model, self.vocab_size, self.max_seq_length = model, vocab_size, max_seq_length
        self.alias, self.payload, self.batch_samples = alias, payload, batch_samples
        self.model.eval()

    def score(self, samples: Sequence[ScoredSample]) -> tuple[list[ScoredSample], float]:
        """The samples with teacher fields, in order, and the seconds the forward passes took."""
        start, out = time.perf_counter(), []
        for i in range(0, len(samples), self.batch_samples):
            out += self._score_chunk(samples[i:i + self.batch_samples])
        return out, time.perf_counter() - start

    def _score_chunk(self, chunk: Sequence[ScoredSample]) -> list[ScoredSample]:
        pairs = [(s.sample.prompt_tokens, s.sample.response_tokens) for s in chunk]
        for scored, (prompt, response) in zip(chunk, pairs):
            if len(prompt) + len(response) > self.max_seq_length:
                raise ValueError(f"sample {scored.sample.prompt_id}/{scored.sample.sample_index} has "
                                 f"{len(prompt) + len(response)} tokens; teacher {self.alias!r} holds at most "
                                 f"{self.max_seq_length} (its model.seq_length)")
        rows = response_logprob_rows(self.model, pairs, self.vocab_size)
        return [self._with_teacher(s, r) for s, r in zip(chunk, rows)]

    def _with_teacher(self, scored: ScoredSample, rows: torch.Tensor) -> ScoredSample:
        response = torch.as_tensor(scored.sample.response_tokens, dtype=torch.long)
        sampled = rows.gather(1, response.unsqueeze(1)).squeeze(1) if len(response) else rows.new_zeros(0)
        full = rows.numpy().astype(np.float32) if self.payload == "full" else None
        return dataclasses.replace(scored, teacher=self.alias, teacher_logprobs=sampled.numpy().astype(np.float32),
                                   teacher_full=full)


def load_scorer(checkpoint, alias: str, payload: str, dtype: str, batch_samples: int, seed: int = 0, groups=None):
    """(TeacherScorer, tokenizer, the checkpoint's config) from a checked teacher checkpoint.

    groups: megatron-core groups of a whole-model process (default: this process alone).
    """
    from megatron_ernie.rl.rollout.checkpoint_engine import engine_from_checkpoint

    engine, tokenizer, teacher_cfg = engine_from_checkpoint(checkpoint, dtype=dtype, seed=seed, groups=groups,
                                                            field=f"rl.distill.teachers.{alias}")
    scorer = TeacherScorer(engine.model, tokenizer.vocab_size, teacher_cfg.model.seq_length, alias, payload,
                           batch_samples)
    return scorer, tokenizer, teacher_cfg
