"""RL loss functions against numbers worked out by hand (comments show the arithmetic)."""

import math

import pytest
import torch

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.rl import (AlgorithmConfig, BufferConfig, RLConfig, SamplingConfig, SandboxConfig,
                                      TaskConfig)
from megatron_ernie.rl import algorithms as alg

LN2 = math.log(2.0)


def close(tensor, expected, tol=1e-5):
    assert torch.allclose(torch.as_tensor(tensor, dtype=torch.float64),
                          torch.as_tensor(expected, dtype=torch.float64), atol=tol), (tensor, expected)


# ------------------------------------------------------------------ advantages

def test_grpo_advantages_subtract_group_mean_and_divide_by_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    # group 1: mean 0.5, deviations +-0.5, Bessel std sqrt((4 * 0.25) / 3) = 0.577350
    # group 2: mean 0.25, deviations -0.25 x3, +0.75; std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    s1 = math.sqrt(1.0 / 3.0)
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, -0.5, -0.5, -0.5, 1.5]
    close(alg.group_advantages(rewards, group_size=4, eps=0.0), expected)


def test_grpo_advantages_without_std_and_for_uniform_groups():
    rewards = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    close(alg.group_advantages(rewards, 2, normalize_std=False), [[1.0, -1.0], [0.0, 0.0]])
    close(alg.group_advantages(rewards, 2)[1], [0.0, 0.0])  # 0 / (0 + eps), never nan


def test_grpo_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="group_size = 1"):
        alg.group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="5 rewards do not split into groups of 2"):
        alg.group_advantages(torch.zeros(5), 2)


# ------------------------------------------------------------------ PPO clip loss

def ppo_case():
    # ratios: sequence 1 (A = +1): 1.5, 0.5, 1.1; sequence 2 (A = -1): 1.5, 0.5, 9.0 (masked out)
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 9.0]])
    logprobs = torch.log(ratios).requires_grad_()
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logprobs, old, torch.tensor([1.0, -1.0]), mask


def test_ppo_clip_token_mean_by_hand():
    logprobs, old, adv, mask = ppo_case()
    out = alg.clipped_policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2, agg="token-mean")
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   seq 1: max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5, max(-1.1, -1.1) = -1.1
    #   seq 2: max(1.5, 1.2) = 1.5, max(0.5, 0.8) = 0.8 (clipped)
    close(out.loss, (-1.2 - 0.5 - 1.1 + 1.5 + 0.8) / 5)
    close(out.clip_fraction, 2 / 5)
    close(out.ratio_mean, (1.5 + 0.5 + 1.1 + 1.5 + 0.5) / 5)
    out.loss.backward()
    # d/dlogp of -A r / 5 is -A r / 5 where unclipped; 0 where clipped or masked
    close(logprobs.grad, [[0.0, -0.5 / 5, -1.1 / 5], [1.5 / 5, 0.0, 0.0]])


def test_ppo_clip_seq_mean_and_clip_higher():
    logprobs, old, adv, mask = ppo_case()
    seq = alg.clipped_policy_loss(logprobs, old, adv, mask, agg="seq-mean")
    close(seq.loss, ((-1.2 - 0.5 - 1.1) / 3 + (1.5 + 0.8) / 2) / 2)
    # clip_high = 0.6: ratio 1.5 < 1.6 is no longer clipped for A > 0
    higher = alg.clipped_policy_loss(logprobs, old, adv, mask, clip_high=0.6)
    close(higher.loss, (-1.5 - 0.5 - 1.1 + 1.5 + 0.8) / 5)


def test_ppo_loss_with_importance_weights_and_empty_mask():
    logprobs, old, adv, mask = ppo_case()
    weights = torch.tensor([[2.0, 1.0, 1.0], [1.0, 0.5, 1.0]])
    out = alg.clipped_policy_loss(logprobs, old, adv, mask, importance_weights=weights)
    close(out.loss, (-2.4 - 0.5 - 1.1 + 1.5 + 0.4) / 5)
    empty = alg.clipped_policy_loss(logprobs, old, adv, torch.zeros(2, 3))
    close(empty.loss, 0.0)


def test_ppo_loss_rejects_mismatched_shapes_and_unknown_agg():
    logprobs, old, adv, mask = ppo_case()
    with pytest.raises(ValueError, match="one shape"):
        alg.clipped_policy_loss(logprobs, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="agg = 'mean'"):
        alg.clipped_policy_loss(logprobs, old, adv, mask, agg="mean")


# ------------------------------------------------------------------ TIS and KL

def test_truncated_importance_weights_are_capped_and_detached():
    train_old = torch.log(torch.tensor([0.5, 0.2, 0.3])).requires_grad_()
    rollout = torch.log(torch.tensor([0.25, 0.4, 0.3]))
    w = alg.truncated_importance_weights(train_old, rollout, cap=1.5)
    close(w, [1.5, 0.5, 1.0])  # 0.5 / 0.25 = 2 -> capped at 1.5; 0.2 / 0.4 = 0.5; 1
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap = 0"):
        alg.truncated_importance_weights(train_old, rollout, cap=0)


def test_k3_uses_rollout_over_train_ratio():
    # r = pi_rollout / pi_train = 0.25 / 0.5 = 0.5: k3 = (0.5 - 1) - ln 0.5
    train, rollout = torch.log(torch.tensor([0.5, 0.1])), torch.log(torch.tensor([0.25, 0.1]))
    close(alg.rollout_kl_k3(train, rollout), [-0.5 + LN2, 0.0])
    # the other direction would give r = 2: (2 - 1) - ln 2 = 0.306853, a different number
    close(alg.rollout_kl_k3(rollout, train), [1.0 - LN2, 0.0])
    assert (alg.k3(torch.linspace(-5, 5, 11)) >= 0).all()


def test_reference_kl_k3_value_and_gradient():
    logprobs = torch.log(torch.tensor([0.5])).requires_grad_()
    ref = torch.log(torch.tensor([0.25]))
    kl = alg.reference_kl_k3(logprobs, ref)  # r = pi_ref / pi_theta = 0.5
    close(kl, [-0.5 + LN2])
    kl.sum().backward()
    close(logprobs.grad, [1.0 - 0.5])  # d/dlogp [exp(ref - logp) - 1 - (ref - logp)] = 1 - r


# ------------------------------------------------------------------ logits functions

def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    # uniform over 2: ln 2; p = (0.25, 0.75): -(0.25 ln 0.25 + 0.75 ln 0.75)
    expected = [LN2, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    close(alg.entropy_from_logits(logits), expected)


def test_token_logprobs_gathers_the_sampled_token():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    close(alg.token_logprobs(logits, torch.tensor([[1, 0]])), [[math.log(0.75), math.log(0.5)]])
    with pytest.raises(ValueError, match="need tokens of shape"):
        alg.token_logprobs(logits, torch.tensor([1, 0]))


def test_reverse_kl_is_student_to_teacher_and_teacher_gets_no_grad():
    student = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # p_s = (0.25, 0.75)
    teacher = torch.tensor([[1.0, 1.0]], requires_grad=True)              # p_t = (0.5, 0.5)
    kl = alg.reverse_kl_from_logits(student, teacher)
    # KL(s || t) = 0.25 ln(0.25 / 0.5) + 0.75 ln(0.75 / 0.5); KL(t || s) would be 0.143841
    close(kl, [0.25 * math.log(0.5) + 0.75 * math.log(1.5)])
    kl.sum().backward()
    assert teacher.grad is None and student.grad is not None
    close(alg.reverse_kl_from_logits(teacher.detach(), teacher.detach()), [0.0])


# ------------------------------------------------------------------ composition

def test_rl_loss_combines_terms_from_config():
    logprobs = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    old = logprobs.detach().clone()
    rollout = torch.log(torch.tensor([[0.25, 0.5]]))      # TIS weights 2 -> 1.5 (cap), 1
    ref = torch.log(torch.tensor([[0.25, 0.25]]))         # K3 per token: -0.5 + ln 2
    config = AlgorithmConfig(tis_cap=1.5, kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = alg.rl_loss(logprobs, old, rollout, torch.tensor([2.0]), torch.ones(1, 2), config,
                                ref_logprobs=ref, entropy=torch.tensor([[1.0, 3.0]]))
    # ratio 1, A = 2: token losses -2 * 1.5, -2 * 1 -> mean -2.5; + 0.1 K3 - 0.01 * mean entropy 2
    close(loss, -2.5 + 0.1 * (-0.5 + LN2) - 0.01 * 2.0)
    close(metrics["pg_loss"], -2.5)
    close(metrics["rollout_kl_k3"], ((-0.5 + LN2) + 0.0) / 2)  # r = 0.25 / 0.5 on token 1
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        alg.rl_loss(logprobs, old, rollout, torch.tensor([2.0]), torch.ones(1, 2), config)


# ------------------------------------------------------------------ config

def test_rl_config_defaults_validate():
    RLConfig().validate("rl")


@pytest.mark.parametrize("config, message", [
    (RLConfig(algorithm=AlgorithmConfig(loss_agg="mean")), "rl.algorithm.loss_agg = 'mean': choose one of"),
    (RLConfig(algorithm=AlgorithmConfig(clip_low=1.5)), "rl.algorithm.clip_low = 1.5"),
    (RLConfig(algorithm=AlgorithmConfig(tis_cap=0.5)), "rl.algorithm.tis_cap = 0.5: use 0 \\(off\\)"),
    (RLConfig(sampling=SamplingConfig(n_per_prompt=1)), "rl.sampling.n_per_prompt = 1: GRPO compares"),
    (RLConfig(sampling=SamplingConfig(top_p=0.0)), "rl.sampling.top_p = 0.0"),
    (RLConfig(buffer=BufferConfig(stale="keep")), "rl.buffer.stale = 'keep'"),
    (RLConfig(sandbox=SandboxConfig(memory_mb=16)), "rl.sandbox.memory_mb = 16: Python alone"),
    (RLConfig(sandbox=SandboxConfig(max_processes=2.5)), "rl.sandbox.max_processes = 2.5: use an integer"),
    (RLConfig(sandbox=SandboxConfig(uid=0)), "rl.sandbox.uid = 0"),
    (RLConfig(sandbox=SandboxConfig(isolation="docker")), "rl.sandbox.isolation = 'docker'"),
    (RLConfig(tasks=()), "rl.tasks = \\(\\): list at least one task"),
    (RLConfig(tasks=(TaskConfig(), TaskConfig(weight=0))), "rl.tasks\\[1\\].weight = 0"),
])
def test_rl_config_errors_name_field_value_and_fix(config, message):
    with pytest.raises(ConfigError, match=message):
        config.validate("rl")
