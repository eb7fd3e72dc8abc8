"""Scored GRPO groups -> padded per-token tensors for the trainer's policy loss.

A sample is prompt (P tokens) + response (R tokens) as one sequence x.
Position t predicts x[t+1], so response token j (at P + j) is scored at
position P + j - 1: labels, loss mask and rollout log-probs are shifted
accordingly. Environment tokens of agent episodes keep their position but get
loss mask 0. Routed experts stay aligned with x itself (row t = the experts
token x[t] was routed to), with -1 rows for padding.
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
        return mb


def padded_length(lengths: Sequence[int], multiple: int, limit: int) -> int:
    longest = max(lengths)
    if longest > limit:
        raise ValueError(f"a sample has {longest} tokens but model.seq_length is {limit}: "
                         "lower rl.sampling.max_new_tokens or shorten the prompts")
    return min(-(-longest // multiple) * multiple, limit)


def build_batch(groups: Sequence[Sequence[ScoredSample]], algorithm, seq_limit: int,
                multiple: int = 8, pad_id: int = 1) -> PolicyBatch:
    """Flatten groups (each one prompt's n samples, contiguous) into padded tensors with GRPO advantages."""
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
    return PolicyBatch(tokens, labels, mask, rollout_lp, advantages, rewards,
                       torch.tensor([x.sample.policy_version for x in samples]),
                       torch.tensor([len(x.sample.response_tokens) for x in samples]), routes)


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
