"""How the RL roles are laid out and talk to each other (the `[rl.system]` table).

Separate from config/rl.py's algorithm/sampling/buffer settings because these
describe the machinery, not the learning problem: how many prompts make one
training step, how many rollout and reward processes a local launch starts,
the rollout engine's precision, routing replay, heartbeats and weight-sync
buckets. Import-light (no torch) like the rest of the config tree.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.config.errors import ConfigError

ROLLOUT_DTYPES = ("bf16", "fp32")


def _int_at_least(path: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{path}.{name}", value, f"use an integer >= {minimum}")


def _positive(path: str, name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{path}.{name}", value, "must be a number > 0")


@dataclass(frozen=True)
class SystemConfig:
    """prompts_per_step: GRPO groups in one training batch (batch = prompts_per_step * n_per_prompt).
    rollout_workers / reward_workers: processes a local launch starts (on Slurm: the het group
      sizes decide); reward_workers = 0 scores inside the controller.
    rollout_batch_prompts: prompts a rollout engine generates together in one batch.
    rollout_dtype: precision of the rollout engine; "bf16" against the fp32 trainer is the
      train/inference mismatch that TIS and routing replay correct.
    routing_replay: the trainer replays the experts the rollout engine chose (R3).
    heartbeat_s / heartbeat_timeout_s: roles report every heartbeat_s; a rollout or reward
      process silent for heartbeat_timeout_s is declared dead and its prompts reissued.
    sync_bucket_mb: size of one weight-broadcast bucket; sync_timeout_s bounds one broadcast.
    agent_max_turns: > 1 runs multi-turn tool-use episodes (rl/agent) instead of single answers.
    """

    prompts_per_step: int = 4
    rollout_workers: int = 1
    reward_workers: int = 1
    rollout_batch_prompts: int = 4
    rollout_dtype: str = "bf16"
    routing_replay: bool = True
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 20.0
    sync_bucket_mb: float = 16.0
    sync_timeout_s: float = 120.0
    agent_max_turns: int = 1
    controller_port: int = 0  # 0: derived from the job id (Slurm) or chosen free (local)

    def validate(self, path: str) -> None:
        for name in ("prompts_per_step", "rollout_workers", "rollout_batch_prompts", "agent_max_turns"):
            _int_at_least(path, name, getattr(self, name), 1)
        _int_at_least(path, "reward_workers", self.reward_workers, 0)
        _int_at_least(path, "controller_port", self.controller_port, 0)
        if self.rollout_dtype not in ROLLOUT_DTYPES:
            raise ConfigError(f"{path}.rollout_dtype", self.rollout_dtype, f"choose one of {list(ROLLOUT_DTYPES)}")
        for name in ("heartbeat_s", "heartbeat_timeout_s", "sync_bucket_mb", "sync_timeout_s"):
            _positive(path, name, getattr(self, name))
        if self.heartbeat_timeout_s < 3 * self.heartbeat_s:
            raise ConfigError(f"{path}.heartbeat_timeout_s", self.heartbeat_timeout_s,
                              f"allow at least 3 heartbeats (>= {3 * self.heartbeat_s}) before declaring a role dead")


def system_config(cfg) -> SystemConfig:
    """cfg.rl.system once the root config carries it, else the defaults."""
    return getattr(cfg.rl, "system", None) or SystemConfig()
