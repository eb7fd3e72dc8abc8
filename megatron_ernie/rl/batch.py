"""Scored GRPO groups -> padded per-token tensors for the trainer's policy loss.

A sample is prompt (P tokens) + response (R tokens) as one sequence x.
Position t predicts x[t+1], so response token j (at P + j) is scored at
position P + j - 1: labels, loss mask and rollout log-probs are shifted
accordingly. Environment tokens of agent episodes keep their position but get
loss mask 0. Routed experts stay aligned with x itself (row t = the experts
token x[t] was routed to), with -1 rows for padding.

On-policy distillation: a teacher's log-prob of response token j (and its full
log-prob row, payload "full") sits at position P + j - 1 like the rollout
log-probs; teacher_index says which teacher (index into the sorted aliases).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megatron_ernie.rl.algorithms import group_advantages
from megatron_ernie.rl.protocol import ScoredSample


@dataclass
class PolicyBatch:
    tokens: torch.Tensor            # long [N, S]
    labels: torch.Tensor            # long [N, S]
    loss_mask: torch.Tensor         # float [N, S]
    rollout_logprobs: torch.Tensor  # float [N, S]
    advantages: torch.Tensor        # float [N]
    rewards: torch.Tensor           # float [N]
    versions: torch.Tensor          # long [N]: policy version that generated each sample
    response_lengths: torch.Tensor  # long [N]
    routes: torch.Tensor | None     # long [N, S, moe_layers, k], -1 = none
    teacher_logprobs: torch.Tensor | None = None  # float [N, S]: log pi_T of the sampled tokens
    teacher_full: torch.Tensor | None = None      # float [N, S, V]: the teacher's log-prob rows (payload "full")
    teacher_index: torch.Tensor | None = None     # long [N]: index into teacher_aliases, -1 = none
    teacher_aliases: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def rows(self, index: slice) -> dict:
        """One micro-batch as the forward step consumes it."""
        s = self.seq_length
        mb = {"tokens": self.tokens[index], "labels": self.labels[index], "loss_mask": self.loss_mask[index],
              "rollout_logprobs": self.rollout_logprobs[index],
              "advantages": self.advantages[index].unsqueeze(-1).expand(-1, s).contiguous(),
              "position_ids": torch.arange(s).unsqueeze(0).expand(self.tokens[index].shape[0], s)}
        if self.routes is not None:
            mb["routes"] = self.routes[index]
        for name in ("teacher_logprobs", "teacher_full", "teacher_index"):
            if getattr(self, name) is not None:
                mb[name] = getattr(self, name)[index]
        return mb


def padded_length(lengths: Sequence[int], multiple: int, limit: int) -> int:
    longest = max(lengths)
    if longest > limit:
        raise ValueError(f"a sample has {longest} tokens but model.seq_length is {limit}: "
                         "lower rl.sampling.max_new_tokens or shorten the prompts")
    return min(-(-longest // multiple) * multiple, limit)


def build_batch(groups: Sequence[Sequence[ScoredSample]], algorithm, seq_limit: int,
                multiple: int = 8, pad_id: int = 1, distill=None) -> PolicyBatch:
    """Flatten groups (each one prompt's n samples, contiguous) into padded tensors with GRPO advantages.

    distill: the DistillConfig; with algorithm.advantage = "opd" every sample must
    carry its teacher's log-probs (and full rows for payload "full").
    """
    samples = [s for group in groups for s in group]
    lengths = [len(s.sample.prompt_tokens) + len(s.sample.response_tokens) for s in samples]
    n, s = len(samples), padded_length(lengths, multiple, seq_limit)
    tokens = torch.full((n, s), pad_id, dtype=torch.long)
    labels = torch.full((n, s), pad_id, dtype=torch.long)
    mask, rollout_lp = torch.zeros((n, s)), torch.zeros((n, s))
    routes = _route_buffer(samples, n, s)
    for i, scored in enumerate(samples):
        _fill_row(i, scored.sample, tokens, labels, mask, rollout_lp, routes)
    rewards = torch.tensor([x.reward for x in samples], dtype=torch.float32)
    advantages = group_advantages(rewards, len(groups[0]), algorithm.normalize_std, algorithm.eps)
    batch = PolicyBatch(tokens, labels, mask, rollout_lp, advantages, rewards,
                        torch.tensor([x.sample.policy_version for x in samples]),
                        torch.tensor([len(x.sample.response_tokens) for x in samples]), routes,
                        teacher_index=torch.full((n,), -1, dtype=torch.long))
    if algorithm.advantage == "opd":
        if distill is None or not distill.enabled:
            raise ValueError("advantage = \"opd\" needs the [rl.distill] config: pass distill= to build_batch")
        _fill_teachers(batch, samples, distill)
    return batch


def _fill_teachers(batch: PolicyBatch, samples, distill) -> None:
    """Teacher log-probs (and full rows for payload "full") of every sample, aligned like the rollout's."""
    n, s = batch.size, batch.seq_length
    aliases = distill.aliases
    full = distill.payload == "full"
    batch.teacher_aliases = aliases
    batch.teacher_logprobs = torch.zeros((n, s))
    if full:
        batch.teacher_full = torch.zeros((n, s, _teacher_vocab(samples)))
    for i, scored in enumerate(samples):
        _check_teacher(scored, aliases, full)
        p, r = len(scored.sample.prompt_tokens), len(scored.sample.response_tokens)
        batch.teacher_index[i] = aliases.index(scored.teacher)
        batch.teacher_logprobs[i, p - 1: p + r - 1] = torch.from_numpy(_sampled_teacher_logprobs(scored))
        if full:
            batch.teacher_full[i, p - 1: p + r - 1] = torch.tensor(scored.teacher_full)  # a copy: messages are read-only


def _check_teacher(scored: ScoredSample, aliases, full: bool) -> None:
    s = scored.sample
    where = f"sample {s.prompt_id}/{s.sample_index} of task {s.task!r}"
    if scored.teacher not in aliases:
        raise ValueError(f"{where} was scored by teacher {scored.teacher!r}, not one of rl.distill.teachers "
                         f"{list(aliases)}: every sample must be scored by its task's routed teacher before training")
    if scored.teacher_logprobs is None and scored.teacher_full is None:
        raise ValueError(f"{where} has no teacher log-probs from {scored.teacher!r}")
    if full and scored.teacher_full is None:
        raise ValueError(f"{where} has no full teacher rows but rl.distill.payload = \"full\": "
                         "the teacher must send teacher_full")


def _teacher_vocab(samples) -> int:
    widths = {x.teacher_full.shape[1] for x in samples if x.teacher_full is not None}
    if len(widths) > 1:
        raise ValueError(f"teacher rows of one batch have different vocabulary sizes {sorted(widths)}: "
                         "all teachers must share the student's tokenizer")
    return widths.pop() if widths else 0


def _sampled_teacher_logprobs(scored: ScoredSample) -> np.ndarray:
    """log pi_T of each sampled response token: sent by the teacher, or read from its full rows."""
    if scored.teacher_logprobs is not None:
        return np.array(scored.teacher_logprobs, dtype=np.float32)  # a writable copy
    rows = np.asarray(scored.teacher_full)
    return rows[np.arange(len(rows)), scored.sample.response_tokens].astype(np.float32)


def _route_buffer(samples, n: int, s: int) -> torch.Tensor | None:
    present = [x.sample.routed_experts is not None for x in samples]
    if not any(present):
        return None
    if not all(present):
        raise ValueError("some samples carry routed experts and some do not: every rollout engine of a run "
                         "must record routing (or none)")
    _, layers, k = samples[0].sample.routed_experts.shape
    return torch.full((n, s, layers, k), -1, dtype=torch.long)


def _fill_row(i: int, sample, tokens, labels, mask, rollout_lp, routes) -> None:
    seq = np.concatenate([sample.prompt_tokens, sample.response_tokens]).astype(np.int64)
    p, r = len(sample.prompt_tokens), len(sample.response_tokens)
    tokens[i, : p + r] = torch.from_numpy(seq)
    labels[i, : p + r - 1] = torch.from_numpy(seq[1:])
    mask[i, p - 1: p + r - 1] = torch.from_numpy(sample.loss_mask())
    rollout_lp[i, p - 1: p + r - 1] = torch.from_numpy(sample.rollout_logprobs.astype(np.float32))
    if routes is not None:
        routes[i, : p + r] = torch.from_numpy(sample.routed_experts.astype(np.int64))
