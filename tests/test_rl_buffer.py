"""Experience buffer: the staleness bound, group integrity and checkpointing."""

import pytest

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.rl import BufferConfig
from megatron_ernie.rl.buffer import ExperienceBuffer
from megatron_ernie.rl.protocol import Sample, ScoredSample


def group(prompt_id: str, version: int, rewards=(1.0, 0.0), versions=None) -> list[ScoredSample]:
    versions = versions or [version] * len(rewards)
    return [ScoredSample(Sample(prompt_id, i, "arithmetic", [1, 2], [3], [-0.5], v, reference="7"), r, "ok")
            for i, (r, v) in enumerate(zip(rewards, versions))]


def test_synchronous_lag_zero_accepts_only_current_version():
    buf = ExperienceBuffer(BufferConfig(max_policy_lag=0), group_size=2, policy_version=3)
    assert buf.add_group(group("a", 3)) is True
    assert buf.add_group(group("b", 2)) is False
    assert (len(buf), buf.stats.dropped_stale_groups) == (1, 1)
    assert buf.set_policy_version(4) == 1  # "a" (v3) can no longer train v4
    assert len(buf) == 0 and buf.stats.dropped_stale_groups == 2


def test_lag_bound_is_inclusive_and_enforced_on_every_version_bump():
    buf = ExperienceBuffer(BufferConfig(max_policy_lag=2), group_size=2, policy_version=5)
    for pid, version in (("v3", 3), ("v4", 4), ("v5", 5), ("v2", 2)):
        buf.add_group(group(pid, version))
    assert buf.pending_prompt_ids() == ["v3", "v4", "v5"]  # 5 - 2 = 3 > lag: dropped
    buf.set_policy_version(6)
    assert buf.pending_prompt_ids() == ["v4", "v5"]
    buf.set_policy_version(8)
    assert len(buf) == 0 and buf.stats.dropped_stale_groups == 4


def test_popped_batches_never_exceed_the_lag():
    lag = 1
    buf = ExperienceBuffer(BufferConfig(max_policy_lag=lag), group_size=2)
    for step in range(6):
        for k in range(3):
            buf.add_group(group(f"s{step}-{k}", step))
        for g in buf.pop_batch(2):
            assert buf.policy_version - buf.group_version(g) <= lag
        buf.set_policy_version(step + 1)
    assert buf.stats.consumed_groups == 12


def test_group_version_is_its_oldest_sample():
    buf = ExperienceBuffer(BufferConfig(max_policy_lag=1), group_size=2, policy_version=4)
    assert buf.add_group(group("mixed", 0, versions=[4, 2])) is False
    assert buf.add_group(group("ok", 0, versions=[4, 3])) is True


def test_reissue_turns_stale_groups_back_into_prompts():
    buf = ExperienceBuffer(BufferConfig(max_policy_lag=0, stale="reissue"), group_size=2, policy_version=1)
    buf.add_group(group("p7", 1))
    buf.set_policy_version(2)
    requests = buf.take_reissued()
    assert [(r.prompt_id, r.task, r.n_samples, r.reference, r.prompt_tokens.tolist()) for r in requests] == [
        ("p7", "arithmetic", 2, "7", [1, 2])]
    assert buf.take_reissued() == [] and buf.stats.reissued_groups == 1 and buf.stats.dropped_stale_groups == 0


def test_uniform_reward_groups_can_be_filtered():
    buf = ExperienceBuffer(BufferConfig(drop_uniform_groups=True), group_size=2)
    assert buf.add_group(group("same", 0, rewards=(1.0, 1.0))) is False
    assert buf.add_group(group("diff", 0, rewards=(1.0, 0.0))) is True
    assert buf.stats.dropped_uniform_groups == 1


def test_groups_stay_whole_and_versions_are_consistent():
    buf = ExperienceBuffer(BufferConfig(), group_size=2, policy_version=1)
    with pytest.raises(ValueError, match="has 1 samples, expected 2"):
        buf.add_group(group("a", 1)[:1])
    with pytest.raises(ValueError, match="mixes prompts"):
        buf.add_group(group("a", 1)[:1] + group("b", 1)[1:])
    with pytest.raises(ValueError, match="claims policy version 2, but the trainer is at 1"):
        buf.add_group(group("future", 2))
    with pytest.raises(ValueError, match="went back from 1 to 0"):
        buf.set_policy_version(0)
    with pytest.raises(ValueError, match="holds 0 groups, 1 requested"):
        buf.pop_batch(1)
    with pytest.raises(ConfigError, match="max_policy_lag"):
        ExperienceBuffer(BufferConfig(max_policy_lag=-1), group_size=2)


def test_state_dict_round_trip_restores_queue_version_and_counters():
    buf = ExperienceBuffer(BufferConfig(max_policy_lag=1, stale="reissue"), group_size=2, policy_version=2)
    buf.add_group(group("old", 1))
    buf.add_group(group("new", 2, rewards=(0.25, 0.75)))
    buf.add_group(group("gone", 0))
    state = buf.state_dict()
    restored = ExperienceBuffer(BufferConfig(max_policy_lag=1, stale="reissue"), group_size=2)
    restored.load_state_dict(state)
    assert restored.policy_version == 2 and len(restored) == 2
    assert restored.stats == buf.stats and restored.stats.reissued_groups == 1
    assert [r.prompt_id for r in restored.take_reissued()] == ["gone"]
    batch = restored.pop_batch(2)
    assert [g[0].sample.prompt_id for g in batch] == ["old", "new"]
    assert [s.reward for s in batch[1]] == [0.25, 0.75]
    restored.set_policy_version(3)  # the restored bound still applies
    assert restored.add_group(group("late", 1)) is False
    with pytest.raises(ValueError, match="format"):
        restored.load_state_dict({"format": 99})
