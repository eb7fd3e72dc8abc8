"""Next-token sampling: temperature, top-k, top-p (nucleus), with the log-prob the trainer recomputes.

The reported log-prob is log softmax(logits / temperature) of the sampled
token, before top-k/top-p truncation: exactly the function the trainer
evaluates on the same sequence, so the rollout/trainer K3 measures numerical
and routing mismatch (and staleness), not the truncation. (Truncation makes
sampling slightly off-policy with respect to that distribution; with
top_p = 1 and top_k = 0, the defaults, it is exact.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / top-p nucleus to -inf (the most likely token always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], log-probs [B]) from float logits [B, V]."""
    scaled = logits.float() / temperature
    logprobs = F.log_softmax(scaled, dim=-1)
    probs = _truncate(scaled, top_k, top_p).softmax(dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
