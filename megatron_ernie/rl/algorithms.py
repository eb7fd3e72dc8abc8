"""Policy-gradient building blocks for RL post-training: pure tensor functions.

No process groups, no model, no config objects except in `rl_loss`: every
function maps tensors to tensors so it can be checked against numbers worked
out by hand. Shapes: B sequences, T response tokens, V vocabulary. Per-token
inputs are [B, T] with a loss mask [B, T] (1 = a token the policy produced,
0 = padding or an environment/tool token). Log-probabilities are natural logs.

Three policies appear in asynchronous RL, and the names say which is which:
  logprobs            pi_theta, the trainer's current weights (carries grad)
  train_old_logprobs  pi_old, the trainer's weights when this step began
                      (recomputed by the trainer, no grad)
  rollout_logprobs    pi_rollout, what the rollout engine reported while
                      sampling: possibly an older policy version (staleness)
                      and a different numerical stack (kernels, precision)
  teacher_logprobs    pi_T, a frozen teacher scoring the same tokens (on-policy
                      distillation), at temperature 1
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from megatron_ernie.model.vocab_parallel import vocab_parallel_reverse_kl

LOSS_AGGREGATIONS = ("token-mean", "seq-mean")
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps exp() finite for wildly off-policy tokens


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-token tensors must have one shape, got {shapes}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where mask is 1; 0 (with grad) when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: each reward minus the mean of its group, optionally / (group std + eps).

    Group Relative Policy Optimization (Shao et al., DeepSeekMath, arXiv:2402.03300,
    Sec. 4.1.2, outcome supervision) replaces PPO's value network with the mean
    reward of the G samples drawn for the same prompt. The std is Bessel-corrected
    (torch.std, as TRL and verl do); normalize_std=False gives the
    unbiased "Dr. GRPO" variant (Liu et al., arXiv:2503.20783).

    rewards: [num_groups * group_size] with each group contiguous, or [num_groups, group_size].
    Returns advantages with the shape of `rewards`.
    """
    if group_size < 2:
        raise ValueError(f"group_size = {group_size}: GRPO compares samples of one prompt, use >= 2")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}: "
                         "send whole groups (sampling.n_per_prompt samples per prompt)")
    grouped = rewards.reshape(-1, group_size).to(torch.float32)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(rewards.shape)


def aggregate_token_loss(token_loss: torch.Tensor, loss_mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    "token-mean": sum over all unmasked tokens of the batch / their count, so every
      token weighs the same and long answers are not down-weighted (DAPO,
      arXiv:2503.14476, Sec. 3.3).
    "seq-mean": mean over each sequence's tokens, then mean over sequences with at
      least one token (the original GRPO objective, Eq. 3 of DeepSeekMath).
    """
    mask = loss_mask.to(token_loss.dtype)
    if agg == "token-mean":
        return masked_mean(token_loss, mask)
    if agg == "seq-mean":
        per_seq = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return masked_mean(per_seq, (mask.sum(-1) > 0).to(token_loss.dtype))
    raise ValueError(f"agg = {agg!r}: choose one of {LOSS_AGGREGATIONS}")


class PolicyLoss(NamedTuple):
    loss: torch.Tensor           # scalar, differentiable w.r.t. logprobs
    clip_fraction: torch.Tensor  # share of unmasked tokens whose gradient the clip removed
    ratio_mean: torch.Tensor     # masked mean of pi_theta / pi_old (detached)


def clipped_policy_loss(logprobs: torch.Tensor, train_old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        loss_mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                        agg: str = "token-mean", importance_weights: torch.Tensor | None = None) -> PolicyLoss:
    """PPO's clipped surrogate, per token, negated to a loss (Schulman et al., arXiv:1707.06347, Eq. 7).

    ratio = exp(logprobs - train_old_logprobs); per token
        loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)),
    optionally times detached importance weights (see truncated_importance_weights),
    then aggregated with `agg`. clip_high > clip_low is DAPO's clip-higher.
    advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
    """
    _same_shape(logprobs=logprobs, train_old_logprobs=train_old_logprobs, loss_mask=loss_mask)
    adv = advantages.unsqueeze(-1) if advantages.dim() == logprobs.dim() - 1 else advantages
    ratio = torch.exp((logprobs - train_old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped)
    if importance_weights is not None:
        _same_shape(logprobs=logprobs, importance_weights=importance_weights)
        token_loss = token_loss * importance_weights.detach()
    loss = aggregate_token_loss(token_loss, loss_mask, agg)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), loss_mask)
        ratio_mean = masked_mean(ratio, loss_mask)
    return PolicyLoss(loss, clip_fraction, ratio_mean)


def truncated_importance_weights(train_old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS): w = min(pi_old / pi_rollout, C) per token, detached.

    The tokens were sampled from pi_rollout, which differs from the trainer's
    pi_old because the sample is stale (generated by an older policy version,
    bounded by buffer.max_policy_lag) and because inference kernels and
    precision differ. Weighting the PPO loss by pi_old / pi_rollout makes the
    gradient on-policy again; truncating at C bounds the variance (Yao et al.,
    "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
    2025; the truncation follows IMPALA's V-trace, Espeholt et al., arXiv:1802.01561).
    """
    if cap <= 0:
        raise ValueError(f"cap = {cap}: the truncation C must be > 0 (typically 2)")
    _same_shape(train_old_logprobs=train_old_logprobs, rollout_logprobs=rollout_logprobs)
    log_w = (train_old_logprobs - rollout_logprobs).detach().clamp(max=_MAX_LOG_RATIO)
    return torch.exp(log_w).clamp(max=cap)


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """Schulman's K3 estimator of KL per sample: (r - 1) - log r, with log r given.

    From "Approximating KL Divergence" (J. Schulman, 2020): for x ~ q and
    r = p(x) / q(x), k3 is non-negative for every x and unbiased for KL(q || p),
    with much lower variance than -log r. log r is clamped to +-20 so exp stays finite.
    """
    log_r = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_r) - 1.0 - log_r


def rollout_kl_k3(train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token K3 between trainer and rollout engine, with r = pi_rollout / pi_train.

    This is the direction the issue defines (rollout in the numerator), the same
    form as the reference KL in GRPO (r = pi_ref / pi_theta). With tokens drawn
    from pi_rollout, it is an unbiased estimate of KL(pi_train || pi_rollout)
    only when tokens come from pi_train; as a mismatch monitor it is zero iff the
    two agree on the sampled token and grows with the gap in either direction.
    """
    _same_shape(train_logprobs=train_logprobs, rollout_logprobs=rollout_logprobs)
    return k3(rollout_logprobs - train_logprobs)


# columns of rollout_k3_sums: K3 split by whether the sample came from the trainer's own weights version
K3_SPLIT_COLUMNS = ("same_version_k3", "same_version_tokens", "stale_k3", "stale_tokens")


def rollout_k3_sums(train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                    same_version: torch.Tensor) -> torch.Tensor:
    """Token sums [4] of the rollout K3, split into numerics and staleness (K3_SPLIT_COLUMNS).

    The rollout K3 mixes two causes: the rollout engine's numerics (kernels,
    precision, KV cache, routing) and staleness (a sample generated by an older
    policy version than the trainer holds). For a sample generated by the SAME
    version the trainer holds (same_version[b] True), pi_train and pi_rollout
    have identical weights, so its K3 is the numerics mismatch alone; the other
    samples' K3 adds the policy change since their version. Sums, not means, so
    micro-batches and data-parallel ranks add up exactly.
    """
    _same_shape(train_logprobs=train_logprobs, rollout_logprobs=rollout_logprobs, loss_mask=loss_mask)
    per_token = rollout_kl_k3(train_logprobs.detach().float(), rollout_logprobs.float())
    mask = loss_mask.float()
    same = same_version.to(mask.dtype)  # [B]
    k3_sum, tokens = (per_token * mask).sum(-1), mask.sum(-1)  # per sequence
    return torch.stack([(k3_sum * same).sum(), (tokens * same).sum(),
                        (k3_sum * (1 - same)).sum(), (tokens * (1 - same)).sum()])


def rollout_k3_split_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Means from rollout_k3_sums added over a step; a bucket without tokens has no K3 entry (not 0).

    rollout_kl_k3_numerics: K3 over samples of the trainer's own version (rollout engine vs trainer);
    rollout_kl_k3_stale: K3 over older samples (staleness + numerics); stale_token_share: their share.
    """
    same_k3, same_tokens, stale_k3, stale_tokens = (float(x) for x in sums)
    out = {"stale_token_share": stale_tokens / max(same_tokens + stale_tokens, 1.0)}
    if same_tokens > 0:
        out["rollout_kl_k3_numerics"] = same_k3 / same_tokens
    if stale_tokens > 0:
        out["rollout_kl_k3_stale"] = stale_k3 / stale_tokens
    return out


def reference_kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token K3 penalty to a frozen reference policy, r = pi_ref / pi_theta.

    DeepSeekMath Eq. 4: D_KL(pi_theta || pi_ref) ~ pi_ref/pi_theta - log(pi_ref/pi_theta) - 1,
    added to the loss with weight algorithm.kl_coef. Gradient flows through logprobs.
    """
    _same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    return k3(ref_logprobs.detach() - logprobs)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) from logits [..., V] and token ids [...] (float32 softmax)."""
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} need tokens of shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(tokens.shape)}")
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy H = -sum_v p_v log p_v of softmax(logits) (float32).

    Divide logits by the sampling temperature first to get the entropy of the
    distribution the rollout actually sampled from.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def reverse_kl_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-position reverse KL(pi_student || pi_teacher) = sum_v p_s (log p_s - log p_t).

    On-policy distillation: the student samples, the teacher scores every
    position, and the student minimises the reverse KL, which is mode-seeking
    (MiniLLM, Gu et al., arXiv:2306.08543; GKD, Agarwal et al., arXiv:2306.13649).
    The teacher is a constant (detached). Both tensors are full-vocabulary [..., V];
    for vocabulary-sharded logits and a teacher given as log-probs use teacher_reverse_kl.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must match (same tokenizer and positions)")
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


# ------------------------------------------------------------------ on-policy distillation


def opd_advantages(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                   reward_advantages: torch.Tensor, alpha: float, distill_term: bool = True) -> torch.Tensor:
    """Per-token on-policy distillation advantage, [B, T]:

        A_t = sg[log pi_T(y_t | c_t) - log pi_S(y_t | c_t)] + alpha * A_reward

    The student samples y from its own policy and a frozen teacher scores every
    token; minimising the reverse KL(pi_S || pi_T) token by token is a policy
    gradient with this per-token reward and discount 0 (GKD, Agarwal et al.,
    arXiv:2306.13649; Thinking Machines, "On-Policy Distillation", 2025;
    MiniLLM, arXiv:2306.08543). It goes through the same clipped loss with TIS
    as GRPO. student_logprobs must be the TRAINER's log-probs (detached here):
    the rollout engine's would add the train/rollout mismatch to the signal.
    A_reward is the GRPO group advantage of the task reward ([B] or [B, T]),
    weighted by distill.alpha. distill_term=False keeps only alpha * A_reward
    (payload "full", where the exact KL replaces the sampled estimate).
    """
    _same_shape(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs)
    reward = reward_advantages.unsqueeze(-1) if reward_advantages.dim() == student_logprobs.dim() - 1 \
        else reward_advantages
    advantages = (alpha * reward.to(student_logprobs.dtype)).expand_as(student_logprobs)
    if distill_term:
        advantages = advantages + (teacher_logprobs - student_logprobs).detach()
    return advantages.detach()


def teacher_reverse_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Exact per-position reverse KL(pi_S || pi_T) = sum_v p_S(v) (log p_S(v) - log p_T(v)).

    The full-vocabulary form of the distillation objective (payload "full";
    DeepSeek-V4 and NeMo-RL's on_policy_distillation.full use it instead of the
    one-sample estimate), with zero variance over the vocabulary. Logits may be
    this rank's vocabulary shard under TP, with the teacher's row sliced to the
    same columns and vocabulary padding cut from both; sums over the
    vocabulary are all-reduced over tp_group (megatron_ernie/model/vocab_parallel.py).
    Gradient flows only into the student.
    """
    return vocab_parallel_reverse_kl(student_logits, teacher_logprobs, tp_group)


# columns of teacher_sums: what the per-teacher metrics are made of
TEACHER_SUM_COLUMNS = ("tokens", "k1", "k3", "abs_adv", "full_kl")


def teacher_sums(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                 teacher_index: torch.Tensor, num_teachers: int,
                 full_kl: torch.Tensor | None = None) -> torch.Tensor:
    """Per-teacher token sums [num_teachers, len(TEACHER_SUM_COLUMNS)] for KL monitors.

    Over the response tokens (loss mask) of the sequences each teacher scored:
    k1 = log pi_S - log pi_T, unbiased for KL(pi_S || pi_T) since the tokens come
    from the student, and k3 = (r - 1) - log r with r = pi_T / pi_S, unbiased and
    never negative (J. Schulman, "Approximating KL Divergence", 2020);
    abs_adv = |log pi_T - log pi_S|, the size of the distillation advantage;
    full_kl = the exact reverse KL when the full rows are known (else 0).
    Sums, not means, so micro-batches and data-parallel ranks add up exactly.
    teacher_index: [B] index into the sorted aliases, -1 = no teacher.
    """
    _same_shape(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs, loss_mask=loss_mask)
    log_ratio = (teacher_logprobs - student_logprobs).detach().float()
    mask = loss_mask.float()
    columns = [mask, -log_ratio, k3(log_ratio), log_ratio.abs(),
               full_kl.detach().float() if full_kl is not None else torch.zeros_like(mask)]
    per_sequence = torch.stack([(c * mask).sum(-1) for c in columns], dim=-1)  # [B, C]
    aliases = torch.arange(num_teachers, device=teacher_index.device)
    one_hot = (teacher_index.long().unsqueeze(-1) == aliases).to(per_sequence.dtype)
    return one_hot.transpose(0, 1) @ per_sequence


def teacher_metrics(sums: torch.Tensor, aliases, full: bool) -> dict[str, float]:
    """Means per teacher (and over all teachers) from teacher_sums added over a whole step.

    Names are distill/<alias>/<k1|k3|abs_adv|token_share|full_kl> and distill/<k1|k3|abs_adv|full_kl>.
    """
    names = [c for c in TEACHER_SUM_COLUMNS[1:] if full or c != "full_kl"]
    col = {c: i for i, c in enumerate(TEACHER_SUM_COLUMNS)}
    total = sums.sum(0)
    all_tokens = max(float(total[0]), 1.0)
    out = {}
    for alias, row in zip(aliases, sums):
        tokens = max(float(row[0]), 1.0)
        out.update({f"distill/{alias}/{c}": float(row[col[c]]) / tokens for c in names})
        out[f"distill/{alias}/token_share"] = float(row[0]) / all_tokens
    out.update({f"distill/{c}": float(total[col[c]]) / all_tokens for c in names})
    return out


def rl_loss(logprobs: torch.Tensor, train_old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
            advantages: torch.Tensor, loss_mask: torch.Tensor, config,
            ref_logprobs: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
            teacher_kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full per-batch objective from an AlgorithmConfig; returns (loss, detached metrics).

    loss = PPO-clip (x TIS weights if tis_cap > 0) + kl_coef * K3(ref) - entropy_coef * H
           + KL(student || teacher) (per-token exact reverse KL, on-policy distillation payload "full"),
    every term aggregated with config.loss_agg over the loss mask. advantages are [B]
    (GRPO) or per token [B, T] (opd_advantages). Metrics stay tensors so logging
    them costs no device sync until the caller reads them.
    """
    weights = None
    if config.tis_cap > 0:
        weights = truncated_importance_weights(train_old_logprobs, rollout_logprobs, config.tis_cap)
    pg = clipped_policy_loss(logprobs, train_old_logprobs, advantages, loss_mask, config.clip_low,
                             config.clip_high, config.loss_agg, weights)
    loss = pg.loss
    metrics = {"pg_loss": pg.loss.detach(), "clip_fraction": pg.clip_fraction, "ratio_mean": pg.ratio_mean,
               "rollout_kl_k3": masked_mean(rollout_kl_k3(train_old_logprobs, rollout_logprobs), loss_mask).detach()}
    if config.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("algorithm.kl_coef > 0 needs ref_logprobs from the reference model")
        ref_kl = aggregate_token_loss(reference_kl_k3(logprobs, ref_logprobs), loss_mask, config.loss_agg)
        loss = loss + config.kl_coef * ref_kl
        metrics["ref_kl_k3"] = ref_kl.detach()
    if entropy is not None:
        mean_entropy = aggregate_token_loss(entropy, loss_mask, config.loss_agg)
        loss = loss - config.entropy_coef * mean_entropy
        metrics["entropy"] = mean_entropy.detach()
    if teacher_kl is not None:
        distill = aggregate_token_loss(teacher_kl, loss_mask, config.loss_agg)
        loss = loss + distill
        metrics["teacher_kl"] = distill.detach()
    return loss, metrics
