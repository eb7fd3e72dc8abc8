"""Who am I in this job?  Rank discovery for torchrun, Slurm, MPI and single runs.

Every launcher describes a process differently: torchrun exports torch's own
variables, ``srun`` exports ``SLURM_*`` (one task per GPU, no torchrun), and
``mpirun`` exports its implementation's variables.  ``discover`` reads a plain
mapping (pure, so tests pass dicts) and returns one ``DistEnv``;
``export_torch_env`` turns it into torch.distributed's ``env://`` variables.

Heterogeneous Slurm jobs (``#SBATCH hetjob``) run several roles in one job
(RL: trainer, rollout, reward, controller).  Facts about Slurm 22.05 that the
code relies on, checked on a real cluster (tests/slurm/):

* a step spanning several groups (``srun --het-group=0,1,2``) gives a task no
  group index: only ``SLURM_HET_SIZE`` and per-group
  ``SLURM_JOB_NODELIST_HET_GROUP_k`` / ``SLURM_NTASKS_HET_GROUP_k``;
  ``SLURM_PROCID`` counts across the groups in group order;
* ``SLURM_NTASKS_HET_GROUP_k`` describe the job allocation, not the step (a
  step may run fewer tasks), so group sizes are taken from the step's own
  tasks-per-node layout and the group each node belongs to;
* a step on one group (``srun --het-group=1``) numbers tasks inside the group;
* ``SLURM_JOB_ID`` is the leader's id in every group.

MPI: under ``srun --mpi=pmix`` Slurm's numbering equals ``MPI_COMM_WORLD``
(which spans all groups), so Slurm's variables win; under ``mpirun`` the MPI
variables win, and an MPMD start (``mpirun a : b : c``, launch/rl_local.sh)
groups ranks by MPI_APPNUM.  ``discover_mpi`` uses mpi4py itself: rank 0
broadcasts its address and a free port to bootstrap torch.distributed, and
``split_by_group`` gives the RL control plane one communicator per group.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Mapping

from megatron_ernie.config.errors import ConfigError

# The trainer's side of slurm/*.sbatch's time-limit contract: on SIGUSR1 every
# rank saves, rank 0 commits `latest`, all ranks pass a barrier and exit with
# EXIT_REQUEUE (sysexits.h EX_TEMPFAIL, "temporary failure, retry later").  The
# script then requeues the job, and `--resume auto` continues from `latest`.
# Exit only after the barrier: srun --kill-on-bad-exit kills the other ranks as
# soon as one exits non-zero.
EXIT_REQUEUE = 75

# The Slurm port is derived from the job id so every task computes the same one
# without talking to the others; jobs sharing a first node rarely collide.
_PORT_BASE, _PORT_SPAN = 20000, 20000
_DEFAULT_PORT = 29500  # torchrun's default


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as torch.distributed and the RL roles need it.

    Without heterogeneous groups the whole world is one group: ``het_group``
    is None and ``het_group_rank/size`` equal ``rank/world_size``.
    ``local_rank`` (the GPU index) counts the tasks of this process's group on
    this node; groups on separate nodes (Slurm) make that the node-local rank.
    ``master_addr`` is None only for an ``mpirun`` start without MASTER_ADDR;
    ``discover_mpi`` fills it.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"
    node_rank: int = 0
    job_id: str | None = None
    het_group: int | None = None
    het_group_rank: int = 0
    het_group_size: int = 1
    het_group_master_addr: str | None = None
    role: str | None = None

    def within_group(self) -> "DistEnv":
        """The same process seen from inside its het group (its own torch world).

        Each group gets its own port (master_port + 1 + group) so groups whose
        first nodes coincide still rendezvous separately.
        """
        if self.het_group is None:
            return self
        return replace(self, rank=self.het_group_rank, world_size=self.het_group_size,
                       master_addr=self.het_group_master_addr,
                       master_port=self.master_port + 1 + self.het_group)


# --------------------------------------------------------------------- helpers
def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(name, None, "the launcher did not set it; start the job with srun, torchrun or mpirun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(name, raw, "must be an integer") from None


def _check_rank(rank_name: str, rank: int, size_name: str, size: int) -> None:
    if size < 1:
        raise ConfigError(size_name, size, "must be at least 1")
    if not 0 <= rank < size:
        raise ConfigError(rank_name, rank, f"must be in [0, {size_name}={size})")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ConfigError("hostlist", text, "brackets must be balanced and not nested")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError("hostlist", text, "unclosed '['")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(text: str, hostlist: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; zero padding of the start is kept."""
    out = []
    for item in text.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ConfigError("hostlist", hostlist, f"bad range '{item}': use N or N-M with N <= M")
        width = len(lo)
        out += [str(i).zfill(width) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. 'n[1-3,5],gpu-[01-02]'.

    Same rules as ``scontrol show hostnames``: comma-separated entries, each
    with zero or more bracketed ranges (several brackets expand as a
    cartesian product, 'r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2), zero padding kept.
    """
    hosts = []
    for entry in _split_top_level(hostlist.strip()):
        match = re.search(r"\[([^\]]*)\]", entry)
        if not match:
            hosts.append(entry)
            continue
        head, tail = entry[:match.start()], entry[match.end():]
        for value in _expand_range(match.group(1), hostlist):
            hosts += expand_hostlist(head + value + tail)
    return hosts


def expand_tasks_per_node(layout: str) -> list[int]:
    """Expand Slurm's tasks-per-node form '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for item in layout.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ConfigError("SLURM_STEP_TASKS_PER_NODE", layout, "expected a form like '2(x3),1'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


# ------------------------------------------------------------------- torchrun
def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    _check_rank("RANK", rank, "WORLD_SIZE", world)
    local_world = _int(environ, "LOCAL_WORLD_SIZE", 1)
    local_rank = _int(environ, "LOCAL_RANK", 0)
    _check_rank("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world)
    addr = environ.get("MASTER_ADDR", "127.0.0.1" if world == 1 else None)
    if addr is None:
        raise ConfigError("MASTER_ADDR", None, "set it (torchrun does) when WORLD_SIZE > 1")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=addr, master_port=_int(environ, "MASTER_PORT", _DEFAULT_PORT),
                   launcher="torchrun", node_rank=_int(environ, "GROUP_RANK", 0),
                   het_group_rank=rank, het_group_size=world,
                   het_group_master_addr=addr, role=environ.get("ERNIE_ROLE"))


# ---------------------------------------------------------------------- Slurm
def _step_nodes(environ: Mapping[str, str]) -> tuple[list[str], list[int]]:
    """The step's hosts and the task count on each, in Slurm's node order."""
    hostlist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") \
        or environ.get("SLURM_NODELIST", "")
    nodes = expand_hostlist(hostlist)
    layout = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    counts = expand_tasks_per_node(layout) if layout else [_int(environ, "SLURM_NTASKS")]
    if len(counts) != len(nodes):
        raise ConfigError("SLURM_STEP_TASKS_PER_NODE", layout,
                          f"lists {len(counts)} nodes but the node list '{hostlist}' has {len(nodes)}")
    return nodes, counts


def _node_index(environ: Mapping[str, str], nodes: list[str]) -> int:
    """This task's position in the step's node list. In a het step SLURM_NODEID counts nodes in het-group
    order while the node list (and its task counts) is sorted by name: a group placed on a node that sorts
    before an earlier group's would read another node's task count. The node's own name is exact."""
    name = environ.get("SLURMD_NODENAME", "")
    return nodes.index(name) if name in nodes else _int(environ, "SLURM_NODEID", 0)


def _het_groups(environ: Mapping[str, str], nodes: list[str], counts: list[int]):
    """[(group index, first host, task count)] for the groups this step runs on, in order."""
    tasks_on = dict(zip(nodes, counts))
    groups = []
    for k in range(_int(environ, "SLURM_HET_SIZE")):
        hosts = [h for h in expand_hostlist(environ.get(f"SLURM_JOB_NODELIST_HET_GROUP_{k}", ""))
                 if h in tasks_on]
        if hosts:
            groups.append((k, hosts[0], sum(tasks_on[h] for h in hosts)))
    if sum(size for _, _, size in groups) != sum(counts):
        raise ConfigError("SLURM_JOB_NODELIST_HET_GROUP_*", sorted(tasks_on),
                          "each node of the step must belong to exactly one het group")
    return groups


def _locate_in_groups(rank: int, groups) -> tuple[int, int, int, str]:
    """(group, rank in group, group size, group's first host): Slurm numbers tasks group by group."""
    start = 0
    for k, first_host, size in groups:
        if rank < start + size:
            return k, rank - start, size, first_host
        start += size
    raise ConfigError("SLURM_PROCID", rank, f"beyond the {start} tasks of the step's het groups")


def _role(environ: Mapping[str, str], group: int | None) -> str | None:
    """ERNIE_ROLE names the role outright; ERNIE_HET_ROLES maps group index -> role."""
    if environ.get("ERNIE_ROLE"):
        return environ["ERNIE_ROLE"]
    roles = [r for r in environ.get("ERNIE_HET_ROLES", "").split(",") if r]
    if group is None:  # not in a het step: only an unambiguous single role applies
        return roles[0] if len(roles) == 1 else None
    if group >= len(roles):
        raise ConfigError("ERNIE_HET_ROLES", environ["ERNIE_HET_ROLES"],
                          f"names {len(roles)} roles but this task is in het group {group}")
    return roles[group]


def _slurm_port(environ: Mapping[str, str]) -> int:
    if "MASTER_PORT" in environ:
        return _int(environ, "MASTER_PORT")
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or "0"
    return _PORT_BASE + int(job) % _PORT_SPAN if job.isdigit() else _DEFAULT_PORT


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS")
    _check_rank("SLURM_PROCID", rank, "SLURM_NTASKS", world)
    nodes, counts = _step_nodes(environ)
    if sum(counts) != world:
        raise ConfigError("SLURM_STEP_TASKS_PER_NODE", counts, f"adds up to {sum(counts)}, not SLURM_NTASKS={world}")
    node = _node_index(environ, nodes)
    _check_rank("SLURM_NODEID", node, "the step's node count", len(nodes))
    local_rank, local_world = _int(environ, "SLURM_LOCALID", 0), counts[node]
    _check_rank("SLURM_LOCALID", local_rank, "the tasks on this node", local_world)
    group, group_rank, group_size, group_master = None, rank, world, nodes[0]
    first_host = nodes[0]
    if "SLURM_HET_SIZE" in environ:
        groups = _het_groups(environ, nodes, counts)
        group, group_rank, group_size, group_master = _locate_in_groups(rank, groups)
        first_host = groups[0][1]  # rank 0 runs on the first host of the step's first group
    master = environ.get("MASTER_ADDR") or first_host
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=master, master_port=_slurm_port(environ), launcher="slurm",
                   node_rank=node, job_id=environ.get("SLURM_JOB_ID"), het_group=group,
                   het_group_rank=group_rank, het_group_size=group_size,
                   het_group_master_addr=group_master, role=_role(environ, group))


# ------------------------------------------------------------------------ MPI
# (rank, size, local rank, local size) variables of mpirun implementations.
_MPI_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH / Intel MPI (hydra)
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)


def _mpi_vars(environ: Mapping[str, str]):
    for names in _MPI_VARS:
        if names[0] in environ and names[1] in environ:
            return names
    return None


def _from_mpi_env(environ: Mapping[str, str], names) -> DistEnv:
    rank, world = _int(environ, names[0]), _int(environ, names[1])
    _check_rank(names[0], rank, names[1], world)
    local_rank, local_world = _int(environ, names[2], 0), _int(environ, names[3], 1)
    _check_rank(names[2], local_rank, names[3], local_world)
    addr = environ.get("MASTER_ADDR")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=addr, master_port=_int(environ, "MASTER_PORT", _DEFAULT_PORT),
                   launcher="mpi", het_group_rank=rank, het_group_size=world,
                   het_group_master_addr=addr, role=_role(environ, None))


def _slurm_agrees_with_mpi(environ: Mapping[str, str], names) -> bool:
    """srun --mpi=... numbers tasks like MPI does; mpirun inside an allocation does not."""
    return (environ.get(names[0]) == environ.get("SLURM_PROCID")
            and environ.get(names[1]) in (None, environ.get("SLURM_NTASKS")))


# --------------------------------------------------------------------- public
def _single(environ: Mapping[str, str]) -> DistEnv:
    addr = environ.get("MASTER_ADDR", "127.0.0.1")
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr=addr,
                   master_port=_int(environ, "MASTER_PORT", _DEFAULT_PORT), launcher="single",
                   job_id=environ.get("SLURM_JOB_ID"), het_group_master_addr=addr,
                   role=_role(environ, None))


def discover(environ: Mapping[str, str]) -> DistEnv:
    """Read this process's DistEnv from launcher variables (pure: pass os.environ or a dict).

    Precedence: torchrun (RANK + WORLD_SIZE, also when started by srun), then an
    srun task (SLURM_STEP_ID: the batch script itself is one process), unless
    mpirun's own numbering disagrees with it, then mpirun, else a single process.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    mpi = _mpi_vars(environ)
    in_step = "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ)
    if in_step and (mpi is None or _slurm_agrees_with_mpi(environ, mpi)):
        return _from_slurm(environ)
    if mpi is not None:
        return _from_mpi_env(environ, mpi)
    return _single(environ)


def torch_env(env: DistEnv) -> dict[str, str]:
    """torch.distributed's env:// variables for this process."""
    if env.master_addr is None:
        raise ConfigError("MASTER_ADDR", None,
                          "an mpirun start has no master address; use discover_mpi() or export MASTER_ADDR")
    return {"MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port),
            "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.local_world_size)}


def export_torch_env(env: DistEnv, environ=None) -> dict[str, str]:
    """Write torch_env(env) into ``environ`` (default os.environ); returns what was set."""
    values = torch_env(env)
    (os.environ if environ is None else environ).update(values)
    return values


def resolve(environ: Mapping[str, str] | None = None) -> DistEnv:
    """discover(), asking MPI for what the environment cannot say (an mpirun start)."""
    environ = os.environ if environ is None else environ
    env = discover(environ)
    if env.launcher == "mpi" and env.master_addr is None:
        return discover_mpi(environ=environ)
    return env


# -------------------------------------------------------------------- mpi4py
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _rank0_address(comm) -> tuple[str, int]:
    """Rank 0's host name and a port free on it, broadcast to every rank of ``comm``."""
    mine = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def _mpi_groups(comm, environ: Mapping[str, str]):
    """(group or None, group comm) from MPI_APPNUM: mpirun's MPMD 'a : b : c' contexts."""
    from mpi4py import MPI

    appnum = comm.Get_attr(MPI.APPNUM)
    if comm.allreduce(appnum or 0, op=MPI.MAX) == 0:
        return None, comm
    return appnum, comm.Split(appnum, comm.Get_rank())


def discover_mpi(comm=None, environ: Mapping[str, str] | None = None) -> DistEnv:
    """DistEnv from an MPI communicator (default COMM_WORLD) plus the environment.

    Under srun the Slurm view is kept (and checked against MPI's); under mpirun
    ranks come from MPI, het groups from MPI_APPNUM, local ranks from a
    shared-memory split of the group (roles sharing a node, as in
    launch/rl_local.sh, each number their GPUs from 0), and rank 0 broadcasts
    its address and a free port.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    environ = os.environ if environ is None else environ
    env = discover(environ)
    if env.launcher == "slurm":
        if (env.rank, env.world_size) != (comm.Get_rank(), comm.Get_size()):
            raise ConfigError("SLURM_PROCID", env.rank, f"differs from MPI rank {comm.Get_rank()}; "
                              "launch with srun --mpi=pmix (OpenMPI) or --mpi=pmi2 (MPICH)")
        return env
    addr, port = _rank0_address(comm)
    group, group_comm = _mpi_groups(comm, environ)
    group_addr = _rank0_address(group_comm)[0]
    node = group_comm.Split_type(MPI.COMM_TYPE_SHARED)  # roles sharing a node each count from 0
    return replace(env, rank=comm.Get_rank(), world_size=comm.Get_size(), local_rank=node.Get_rank(),
                   local_world_size=node.Get_size(), master_addr=addr, master_port=port,
                   launcher="mpi" if comm.Get_size() > 1 else env.launcher, het_group=group,
                   het_group_rank=group_comm.Get_rank(), het_group_size=group_comm.Get_size(),
                   het_group_master_addr=group_addr, role=_role(environ, group))


def split_by_group(comm, env: DistEnv):
    """One communicator per het group (the RL control plane's per-role world)."""
    group_comm = comm.Split(env.het_group or 0, env.het_group_rank)
    if group_comm.Get_size() != env.het_group_size:
        raise ConfigError("het_group_size", env.het_group_size,
                          f"MPI finds {group_comm.Get_size()} ranks in group {env.het_group}; "
                          "run every group in one srun --het-group=... step")
    return group_comm
