"""Submission settings for ``ernie submit``: the ``[slurm]`` section.

One job shape for pretraining (``nodes`` x ``gpus_per_node``, one task per
GPU) and, for RL, one heterogeneous job whose groups (trainer, rollout,
reward, teacher, judge, controller) are sized independently.  Validation happens before
anything reaches sbatch, so a bad size is reported with the field to change
instead of a job that waits forever or dies on its first node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatron_ernie.config.errors import ConfigError, require

ROLES = ("trainer", "rollout", "reward", "teacher", "judge", "controller")
MODEL_ROLES = ("trainer", "rollout", "teacher", "judge")  # these run megatron-core: on GPUs, or on CPUs with gloo


def parse_time_limit(text: str) -> int:
    """Slurm's --time formats in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(text)
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return (a * 60 + b) * 60 + c
    return a * 60 + (b or 0)  # M or M:S



@dataclass(frozen=True)
class HetGroupConfig:
    """One group of the RL heterogeneous job; nodes = 0 leaves the group out."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one per GPU, or 1 on CPU-only nodes
    cpus_per_task: int = 0  # 0: Slurm's default
    partition: str = ""  # "": the job's slurm.partition

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def validate(self, path: str) -> None:
        for name in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task"):
            require(getattr(self, name) >= 0, f"{path}.{name}", getattr(self, name), "must be >= 0")


@dataclass(frozen=True)
class GpuGroupConfig(HetGroupConfig):
    """A group that runs the model (trainer, rollout): GPU nodes by default."""

    gpus_per_node: int = 8


@dataclass(frozen=True)
class SlurmConfig:
    """How to ask Slurm for the job (sbatch options) and what to run in it."""

    job_name: str = "ernie"
    partition: str = ""  # "": the cluster's default partition
    account: str = ""
    qos: str = ""
    time: str = "24:00:00"  # Slurm --time format
    nodes: int = 1  # pretraining nodes; for RL the sum of the groups' nodes
    gpus_per_node: int = 8  # pretraining: one task per GPU
    cpus_per_task: int = 0  # 0: Slurm's default
    mem: str = "0"  # --mem; "0" = all memory of each node, "" = leave unset
    exclusive: bool = True
    signal_lead_s: int = 300  # USR1 this many seconds before the time limit: save, exit, requeue
    requeue: bool = True  # requeue after a USR1 save, a preemption or a node failure
    max_restarts: int = 20  # stop requeueing after this many restarts (SLURM_RESTART_COUNT)
    log_dir: str = ""  # "": <run.dir>/slurm
    mpi: str = "pmix"  # srun --mpi for the RL job (mpi4py control plane); pmi2 for MPICH
    setup: tuple[str, ...] = ()  # shell lines run before srun (module load, source venv/bin/activate)
    env: tuple[str, ...] = ()  # extra KEY=VALUE exported for the tasks (e.g. NCCL_SOCKET_IFNAME=ib0)
    extra_sbatch: tuple[str, ...] = ()  # extra sbatch options, e.g. "--constraint=h100"
    ernie: str = "ernie"  # the ernie command on the compute nodes, e.g. "python -m megatron_ernie.cli"
    trainer: GpuGroupConfig = field(default_factory=GpuGroupConfig)
    rollout: GpuGroupConfig = field(default_factory=GpuGroupConfig)
    reward: HetGroupConfig = field(default_factory=lambda: HetGroupConfig(nodes=0))  # 0: rewards in the controller
    # the distillation teachers ([rl.distill]); task r serves the (r mod #aliases)-th alias. 0: no teachers
    teacher: GpuGroupConfig = field(default_factory=lambda: GpuGroupConfig(nodes=0))
    # the learned judge ([rl.judge]); every task serves the one judge checkpoint. 0: no judge
    judge: GpuGroupConfig = field(default_factory=lambda: GpuGroupConfig(nodes=0))
    controller: HetGroupConfig = field(default_factory=HetGroupConfig)

    def cpu_model_roles(self) -> list[str]:
        """Roles that run the model on CPU-only nodes (gpus_per_node = 0): a CPU partition, or a small
        run. Their tasks must not see a GPU (they use gloo and host memory), which the job tells them
        through ERNIE_CPU_ROLES (rl/main.py hides the GPUs from those roles before torch looks)."""
        return [role for role, group in self.groups() if role in MODEL_ROLES and group.gpus_per_node == 0]

    def groups(self) -> list[tuple[str, HetGroupConfig]]:
        """The RL groups that get nodes, in het-group order."""
        return [(role, getattr(self, role)) for role in ROLES if getattr(self, role).nodes > 0]

    def validate(self, path: str) -> None:
        self._validate_job(path)
        for role in ROLES:
            getattr(self, role).validate(f"{path}.{role}")

    def _validate_job(self, path: str) -> None:
        require(bool(self.job_name) and not re.search(r"\s", self.job_name), f"{path}.job_name",
                 self.job_name, "give a name without spaces")
        for name in ("nodes", "gpus_per_node"):
            require(getattr(self, name) >= 1, f"{path}.{name}", getattr(self, name), "must be at least 1")
        require(self.cpus_per_task >= 0, f"{path}.cpus_per_task", self.cpus_per_task, "must be >= 0")
        require(self.max_restarts >= 0, f"{path}.max_restarts", self.max_restarts, "must be >= 0")
        require(self.mpi in ("pmix", "pmi2", "none"), f"{path}.mpi", self.mpi,
                 "use pmix (OpenMPI), pmi2 (MPICH) or none")
        self._validate_time(path)
        self._validate_lists(path)

    def _validate_time(self, path: str) -> None:
        try:
            limit = parse_time_limit(self.time)
        except ValueError:
            raise ConfigError(f"{path}.time", self.time,
                              "use a Slurm time: minutes, HH:MM:SS or D-HH:MM:SS") from None
        require(limit > 0, f"{path}.time", self.time, "must be longer than zero")
        require(0 <= self.signal_lead_s < limit, f"{path}.signal_lead_s", self.signal_lead_s,
                 f"must be >= 0 and shorter than {path}.time ({self.time} = {limit} s)")

    def _validate_lists(self, path: str) -> None:
        for name in ("setup", "env", "extra_sbatch"):
            value = getattr(self, name)
            require(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
                     f"{path}.{name}", value, "must be a list of strings")
        for line in self.env:
            require(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", line) is not None, f"{path}.env", line,
                     "write each entry as KEY=VALUE")
        for option in self.extra_sbatch:
            require(option.startswith("-"), f"{path}.extra_sbatch", option,
                     "write each entry as an sbatch option, e.g. '--constraint=h100'")

    def check_scorer_group(self, path: str, role: str, needed: int, what: str) -> None:
        """A scorer group (teacher, judge) must run at least `needed` tasks when the run declares its
        scorers, and must be absent when it declares none (its tasks would idle). `what` names the
        declaration in the messages, e.g. "rl.judge.checkpoint"."""
        group = getattr(self, role)
        tasks = group.nodes * group.ntasks_per_node
        if needed:
            require(tasks >= needed, f"{path}.{role}.nodes", group.nodes,
                    f"{what} needs {needed} {role} task(s) but the {role} group runs {tasks} "
                    f"({path}.{role}.nodes x tasks per node); give it at least {needed}")
        else:
            require(group.nodes == 0, f"{path}.{role}.nodes", group.nodes,
                    f"a {role} group without {what} would idle; set it to 0 or declare {what}")

    def check_teachers(self, path: str, aliases) -> None:
        """A run with [rl.distill] teachers needs a teacher group with a task for every alias, and vice versa."""
        aliases = list(aliases)
        self.check_scorer_group(path, "teacher", len(aliases),
                                f"rl.distill.teachers ({len(aliases)} aliases {aliases}, one task each)"
                                if aliases else "rl.distill.teachers")

    def check_judge(self, path: str, judged: bool) -> None:
        """A run with an [rl.judge] checkpoint needs a judge group (any number of tasks share the one
        judge), and a judge group needs a judge."""
        self.check_scorer_group(path, "judge", 1 if judged else 0, "rl.judge.checkpoint")

    def validate_rl(self, path: str) -> None:
        """Rules for the heterogeneous RL job (called by ``ernie submit rl``)."""
        for role in ("trainer", "rollout", "controller"):
            group = getattr(self, role)
            require(group.nodes >= 1, f"{path}.{role}.nodes", group.nodes, f"the {role} needs at least one node")
        used = sum(group.nodes for _, group in self.groups())
        sizes = " + ".join(f"{path}.{role}.nodes={group.nodes}" for role, group in self.groups())
        require(used <= self.nodes, f"{path}.nodes", self.nodes,
                 f"the het groups need {used} nodes ({sizes}); raise {path}.nodes or shrink the groups")
        require(used >= self.nodes, f"{path}.nodes", self.nodes,
                 f"the het groups use only {used} nodes ({sizes}); set {path}.nodes = {used} or grow a group")
