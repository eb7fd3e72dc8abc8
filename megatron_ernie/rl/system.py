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
from megatron_ernie.config.fp8 import FP8Config

ROLLOUT_DTYPES = ("bf16", "fp32")
FP8_ROLES = ("both", "rollout", "trainer")


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
    reward_concurrency: sandboxed programs one reward process (or the controller, with no reward
      workers) runs at once. A sandbox run mostly waits on the kernel (namespaces set up and torn
      down), not the CPU (benchmarks/sandbox_concurrency.py, 2 cores): one run after another took
      0.19 s a run idle and 1.34 s with two RL stages running, 8 at once 0.08 s and 0.14 s, at
      the same CPU time per run.
    inline_rewards: the controller scores tasks registered with inline=True (exact-match checks:
      arithmetic, calc, open_ended) where their samples arrive, and sends only the rest (code in
      the sandbox, user tasks) to reward workers. A reward-worker round trip costs milliseconds
      of encoding per batch for microseconds of checking (issue 14's hand-off).
    rollout_tensor: tensor-parallel size of one rollout model replica (megatron-core TP, no SP):
      rollout processes [k*t, (k+1)*t) generate together as replica k, so the number of
      rollout processes must be a multiple of it (rollout/replica.py).
    rollout_batch_prompts: prompts a rollout engine generates together in one batch.
    rollout_batch_wait_s: with fewer prompts queued than that, how long a rollout worker waits
      for the next one before generating what it has (prompts arrive one message at a time).
    rollout_dtype: precision of the rollout engine; "bf16" against the fp32 trainer is the
      train/inference mismatch that TIS and routing replay correct.
    fp8_roles: which side runs the `[fp8]` recipe when it is on: "both" (unified: one FP8
      operator path, and with delayed scaling the rollout quantises with the trainer's
      scales, shipped with every weight version), "rollout" (FP8 rollout, high-precision
      trainer) or "trainer".
    routing_replay: the trainer replays the experts the rollout engine chose (R3).
    heartbeat_s / heartbeat_timeout_s: roles report every heartbeat_s; a rollout or reward
      process silent for heartbeat_timeout_s is declared dead and its prompts reissued.
    sync_bucket_mb: size of one weight-broadcast bucket; sync_timeout_s bounds one broadcast.
    agent_max_turns: > 1 runs multi-turn tool-use episodes (rl/agent) instead of single answers.
    teacher_workers: with [rl.distill] teachers, teacher processes a local launch starts PER ALIAS
      (`ernie rl --teacher-workers N`); process r serves the (r mod #aliases)-th alias in sorted
      order (on Slurm: the teacher group's tasks, spread the same way).
    teacher_dtype: precision of the teachers' forward pass ("fp32": exact log-probs; "bf16": cheaper,
      ~1e-2 nats of noise in the distillation signal).
    teacher_batch_samples: samples a teacher scores together in one forward pass.
    judge_workers: with [rl.judge], judge processes a local launch starts (`ernie rl --judge-workers N`;
      on Slurm: the judge group's tasks); they share teacher_dtype and teacher_batch_samples.
    """

    prompts_per_step: int = 4
    rollout_workers: int = 1
    rollout_tensor: int = 1
    reward_workers: int = 1
    reward_concurrency: int = 8
    inline_rewards: bool = True
    rollout_batch_prompts: int = 4
    rollout_batch_wait_s: float = 0.02
    rollout_dtype: str = "bf16"
    fp8_roles: str = "both"
    routing_replay: bool = True
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 20.0
    sync_bucket_mb: float = 16.0
    sync_timeout_s: float = 120.0
    agent_max_turns: int = 1
    teacher_workers: int = 1
    teacher_dtype: str = "fp32"
    teacher_batch_samples: int = 32
    judge_workers: int = 1
    controller_port: int = 0  # 0: derived from the job id (Slurm) or chosen free (local)

    def validate(self, path: str) -> None:
        for name in ("prompts_per_step", "rollout_workers", "rollout_tensor", "rollout_batch_prompts",
                     "agent_max_turns", "teacher_workers", "teacher_batch_samples", "judge_workers",
                     "reward_concurrency"):
            _int_at_least(path, name, getattr(self, name), 1)
        self.rollout_replicas(self.rollout_workers, path)
        _int_at_least(path, "reward_workers", self.reward_workers, 0)
        _int_at_least(path, "controller_port", self.controller_port, 0)
        if self.rollout_dtype not in ROLLOUT_DTYPES:
            raise ConfigError(f"{path}.rollout_dtype", self.rollout_dtype, f"choose one of {list(ROLLOUT_DTYPES)}")
        if self.teacher_dtype not in ROLLOUT_DTYPES:
            raise ConfigError(f"{path}.teacher_dtype", self.teacher_dtype, f"choose one of {list(ROLLOUT_DTYPES)}")
        if self.fp8_roles not in FP8_ROLES:
            raise ConfigError(f"{path}.fp8_roles", self.fp8_roles, f"choose one of {list(FP8_ROLES)}")
        if not 0.0 <= self.rollout_batch_wait_s <= 1.0:
            raise ConfigError(f"{path}.rollout_batch_wait_s", self.rollout_batch_wait_s,
                              "use 0 (generate at once) to 1 second; prompts of one burst arrive within milliseconds")
        for name in ("heartbeat_s", "heartbeat_timeout_s", "sync_bucket_mb", "sync_timeout_s"):
            _positive(path, name, getattr(self, name))
        if self.heartbeat_timeout_s < 3 * self.heartbeat_s:
            raise ConfigError(f"{path}.heartbeat_timeout_s", self.heartbeat_timeout_s,
                              f"allow at least 3 heartbeats (>= {3 * self.heartbeat_s}) before declaring a role dead")


    def role_fp8(self, fp8: FP8Config, role: str) -> FP8Config:
        """The `[fp8]` settings the "trainer" or a "rollout" engine builds its model with."""
        runs_fp8 = self.fp8_roles in ("both", role)
        return fp8 if runs_fp8 else FP8Config()

    def shares_fp8_scales(self, fp8: FP8Config) -> bool:
        """Whether weight pushes carry the trainer's delayed-scaling scales (precision/sharing.py)."""
        return fp8.enabled and fp8.recipe == "delayed" and self.fp8_roles == "both"

    def rollout_replicas(self, processes: int, path: str) -> int:
        """How many TP replicas `processes` rollout processes make (they must divide evenly)."""
        if processes % self.rollout_tensor:
            raise ConfigError(f"{path}.rollout_tensor", self.rollout_tensor,
                              f"{processes} rollout processes do not split into replicas of {self.rollout_tensor}: "
                              "make the rollout process count (rollout_workers, or the Slurm rollout group's "
                              "tasks) a multiple of rollout_tensor")
        return processes // self.rollout_tensor

    def check_rollout_tensor(self, model, moe, path: str) -> None:
        """The model sizes a rollout TP replica splits must divide by rollout_tensor."""
        t = self.rollout_tensor
        sizes = {"model.num_attention_heads": model.num_attention_heads,
                 "model.num_query_groups": model.num_query_groups, "model.ffn_hidden_size": model.ffn_hidden_size}
        if moe.num_experts:
            sizes["moe.expert_ffn_hidden_size"] = moe.expert_ffn_hidden_size
        for field_path, size in sizes.items():
            if size % t:
                raise ConfigError(f"{path}.rollout_tensor", t,
                                  f"{field_path} = {size} is not divisible by it; choose a divisor of {size}")

    def check_fp8(self, fp8: FP8Config, path: str) -> None:
        """fp8_roles against the `[fp8]` table (the two live in different sections)."""
        if not fp8.enabled and self.fp8_roles != "both":
            raise ConfigError(f"{path}.fp8_roles", self.fp8_roles,
                              "has no effect while fp8.recipe = \"off\"; choose an [fp8] recipe "
                              "or drop fp8_roles")
        if self.shares_fp8_scales(fp8) and fp8.backend == "te":
            raise ConfigError(f"{path}.fp8_roles", self.fp8_roles,
                              "sharing delayed-scaling state with the rollout is implemented for "
                              "fp8.backend = \"emulate\"; with Transformer Engine use a stateless recipe "
                              "(fp8.recipe = \"current\" or \"blockwise\"), which needs no shared state")


def system_config(cfg) -> SystemConfig:
    """cfg.rl.system once the root config carries it, else the defaults."""
    return getattr(cfg.rl, "system", None) or SystemConfig()
