"""`ernie rl`: disaggregated asynchronous RL (controller, trainer, rollout, reward and teacher roles).

    ernie rl --config configs/rl_tiny_cpu.toml [--set k=v ...] [--resume auto|none]

Without a role (no --role, ERNIE_ROLE or Slurm het group), this process is the
controller and starts every other role as a child process on this machine:
--trainer-procs trainer ranks (one torch world), --rollout-workers rollout
engines, --reward-workers reward processes (defaults from [rl.system]), and
with [rl.distill] teachers --teacher-workers teacher processes PER ALIAS
(process r serves the (r mod #aliases)-th alias in sorted order, so every
alias gets the same count; rl/teacher/), and with [rl.judge] --judge-workers
judge processes (rl/judge/). Teacher and judge checkpoints are checked before
any process starts (exit 2 naming rl.distill.teachers.<alias> or rl.judge.checkpoint).

With a role (slurm/rl_hetjob.sbatch exports ERNIE_HET_ROLES; each het group
runs one role; launch/rl_local.sh sets ERNIE_ROLE), the process runs that role
only. Roles find the controller at ERNIE_RL_CONTROLLER=host:port, or, in a
Slurm het job, on the first node of the controller's group at the job's
port + 64. Trainer ranks form their own torch world (their het group).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from megatron_ernie import config as C
from megatron_ernie.config.checks import check_model_vs_parallel, check_moe_vs_parallel
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.rl.control import ADDRESS_ENV, AUTHKEY_ENV, RANK_ENV, authkey_from_env, parse_address
from megatron_ernie.rl.system import SystemConfig, system_config

log = logging.getLogger("megatron_ernie.rl")
ROLE_CHOICES = ("controller", "trainer", "rollout", "reward", "teacher", "judge")
_CONTROLLER_PORT_OFFSET = 64  # from the job's torch master port; het groups use +1..+k


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file (defaults apply where it is silent)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--resume", choices=["auto", "none"], help="auto: continue from the latest RL checkpoint")
    p.add_argument("--role", choices=ROLE_CHOICES, help="run one role only (default: from the environment)")
    p.add_argument("--trainer-procs", type=int, help="local launch: trainer processes (default 1)")
    p.add_argument("--rollout-workers", type=int, help="local launch: rollout processes ([rl.system])")
    p.add_argument("--reward-workers", type=int, help="local launch: reward processes ([rl.system])")
    p.add_argument("--teacher-workers", type=int,
                   help="local launch: teacher processes per [rl.distill] alias ([rl.system] teacher_workers)")
    p.add_argument("--judge-workers", type=int,
                   help="local launch: judge processes with [rl.judge] ([rl.system] judge_workers)")
    return p


def _split_system(raw: dict) -> tuple[dict, dict]:
    """Take the [rl.system] table out of the raw tree (the root schema does not know it yet)."""
    rl = dict(raw.get("rl", {}))
    system = rl.pop("system", {})
    return {**raw, "rl": rl} if "rl" in raw else raw, system


def load_config(args) -> tuple[C.ErnieConfig, SystemConfig]:
    """The root config (train.global_batch_size derived: prompts_per_step * n_per_prompt) and [rl.system].

    [rl.system] (TOML or --set rl.system.key=value) is read here, so it works
    whether or not the root RLConfig carries a `system` field.
    """
    from megatron_ernie.config.loader import apply_overrides, build, read_toml

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    raw, raw_system = _split_system(apply_overrides(read_toml(args.config) if args.config else {}, overrides))
    cfg = build(C.ErnieConfig, raw)
    C.validate(cfg)
    system = build(SystemConfig, raw_system, "rl.system") if raw_system else system_config(cfg)
    changes = {k: v for k, v in (("rollout_workers", args.rollout_workers), ("reward_workers", args.reward_workers),
                                 ("teacher_workers", args.teacher_workers),
                                 ("judge_workers", args.judge_workers)) if v is not None}
    system = dataclasses.replace(system, **changes)
    system.validate("rl.system")
    system.check_fp8(cfg.fp8, "rl.system")
    system.check_rollout_tensor(cfg.model, cfg.moe, "rl.system")
    check_lengths(cfg)
    check_model_vs_parallel(cfg.model, cfg.moe, cfg.parallel)  # before any role starts: the trainer would fail
    check_moe_vs_parallel(cfg.model, cfg.moe, cfg.parallel)
    batch = system.prompts_per_step * cfg.rl.sampling.n_per_prompt
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=batch)), system


def check_lengths(cfg) -> None:
    """A prompt plus max_new_tokens must fit model.seq_length (the KV cache and the trainer's sequences)."""
    if cfg.rl.sampling.max_new_tokens >= cfg.model.seq_length:
        raise ConfigError("rl.sampling.max_new_tokens", cfg.rl.sampling.max_new_tokens,
                          f"must leave room for the prompt within model.seq_length = {cfg.model.seq_length}; "
                          "lower it or raise model.seq_length")


def check_tasks_and_tokenizer(cfg, system, tokenizer: bool = True, warn: bool = False) -> None:
    """Resolve every task (importing user `module`s) and, in the launcher or controller, the run's tokenizer
    (data.tokenizer or the one inside checkpoint.load) before any process starts. A mistake then costs one
    message and exit 2 from the launcher, instead of surfacing in the controller after every child has
    started (and been waited on). Every role resolves the tasks too: a Slurm task fails at once, by itself.
    The controller (`warn`) also says, once, which tasks' reference answers do not fit the response budget."""
    from megatron_ernie.rl.task_tokenizer import answers_over_budget, tokenizer_for
    from megatron_ernie.rl.tasks import resolve_task

    for i, task in enumerate(cfg.rl.tasks):
        resolve_task(task, f"rl.tasks[{i}]")
    if tokenizer:
        run_tokenizer = tokenizer_for(cfg, agent=system.agent_max_turns > 1)
        for line in answers_over_budget(cfg, run_tokenizer) if warn else ():  # once: the controller's log
            log.warning(f"ernie rl: warning: {line}")


# -------------------------------------------------------------- addresses
def _slurm_controller_host(dist_env) -> str | None:
    from megatron_ernie.runtime.env import expand_hostlist

    roles = [r for r in os.environ.get("ERNIE_HET_ROLES", "").split(",") if r]
    if dist_env.launcher != "slurm" or "controller" not in roles:
        return None
    nodes = os.environ.get(f"SLURM_JOB_NODELIST_HET_GROUP_{roles.index('controller')}", "")
    return expand_hostlist(nodes)[0] if nodes else None


def controller_address(system: SystemConfig, dist_env=None) -> tuple[str, int]:
    if os.environ.get(ADDRESS_ENV):
        return parse_address(os.environ[ADDRESS_ENV])
    host = _slurm_controller_host(dist_env) if dist_env is not None else None
    port = system.controller_port or ((dist_env.master_port if dist_env else 29500) + _CONTROLLER_PORT_OFFSET)
    return host or (dist_env.master_addr if dist_env and dist_env.master_addr else "127.0.0.1"), port


def _role_from_env(args):
    """(role, role rank, DistEnv or None)."""
    if args.role:
        return args.role, int(os.environ.get(RANK_ENV, "0")), None
    from megatron_ernie.runtime.env import resolve

    dist_env = resolve()
    if dist_env.role is None:
        return None, 0, dist_env
    return dist_env.role, int(os.environ.get(RANK_ENV, dist_env.het_group_rank)), dist_env


# ------------------------------------------------------------------ roles
def _hide_gpus_from_cpu_role(role) -> None:
    """A role whose Slurm het group has no GPUs (ERNIE_CPU_ROLES, from slurm.<role>.gpus_per_node = 0) runs
    on CPU: with no visible GPU torch picks gloo and host memory, as on a CPU-only node, even where
    the node has GPUs that Slurm did not give this group."""
    cpu_roles = [r for r in os.environ.get("ERNIE_CPU_ROLES", "").split(",") if r]
    if role in cpu_roles:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def run_role(role: str, rank: int, cfg, system, dist_env=None) -> int:
    from megatron_ernie.observe.console import setup_logging

    setup_logging(cfg.log.level, role == "controller" or rank == 0)
    if role != "controller":
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the controller coordinates save-and-requeue
    address = controller_address(system, dist_env)
    authkey = authkey_from_env(cfg.run.dir)
    if role == "controller":
        from megatron_ernie.rl.control import listen

        return run_controller(cfg, system, listen(address[1], authkey), address[0],
                              _expected_rollouts(system, dist_env))
    if role == "trainer":
        from megatron_ernie.rl.trainer import run_trainer

        if dist_env is not None and dist_env.het_group is not None:
            from megatron_ernie.runtime.env import export_torch_env

            export_torch_env(dist_env.within_group())  # the trainer's world is its het group
        return run_trainer(cfg, system, address, authkey)
    if role == "rollout":
        from megatron_ernie.rl.rollout.worker import run_rollout

        if system.rollout_tensor > 1 and dist_env is not None and dist_env.het_group is not None:
            from megatron_ernie.runtime.env import export_torch_env

            export_torch_env(dist_env.within_group())  # the TP replicas' world is the rollout het group
        return run_rollout(cfg, system, rank, address, authkey)
    if role == "teacher":
        from megatron_ernie.rl.teacher.serve import run_teacher

        return run_teacher(cfg, system, rank, address, authkey)
    if role == "judge":
        from megatron_ernie.rl.judge.serve import run_judge

        return run_judge(cfg, system, rank, address, authkey)
    from megatron_ernie.rl.reward.serve import run_reward

    return run_reward(cfg, system, rank, address, authkey)


def _expected_rollouts(system: SystemConfig, dist_env) -> int:
    """Rollouts the controller waits for before the first push: one per replica of the rollout processes."""
    roles = [r for r in os.environ.get("ERNIE_HET_ROLES", "").split(",") if r]
    processes = system.rollout_workers
    if dist_env is not None and dist_env.launcher == "slurm" and "rollout" in roles:
        processes = int(os.environ.get(f"SLURM_NTASKS_HET_GROUP_{roles.index('rollout')}", processes))
    return system.rollout_replicas(processes, "rl.system")


def run_controller(cfg, system, listener, host: str, expected_rollouts: int, watch=None) -> int:
    import torch.distributed as dist

    from megatron_ernie.rl.controller import Controller, install_signal_handlers
    from megatron_ernie.rl.metrics import RunMetrics, latest_state
    from megatron_ernie.rl.task_tokenizer import tokenizer_for

    C.save_resolved(cfg, cfg.run.dir)
    tokenizer = tokenizer_for(cfg, agent=system.agent_max_turns > 1)
    tokenizer.save(os.path.join(cfg.run.dir, "tokenizer.json"))
    store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False)
    metrics = RunMetrics(cfg.run.dir, cfg.log.tensorboard, cfg.rl.judge.watch_window)
    controller = Controller(cfg, system, listener, (host, store.port), metrics, expected_rollouts, tokenizer)
    state = latest_state(cfg.run.dir) if cfg.checkpoint.resume == "auto" else None
    if state is not None:
        controller.load_state_dict(state)
        log.info(f"controller resumed at policy version {controller.version}")
    install_signal_handlers(controller)
    if watch is not None:
        watch(controller)
    code = controller.run()
    del store
    return code


# ---------------------------------------------------------- local launch
def _child_argv(argv: list[str]) -> list[str]:
    """The command line minus the launcher-only flags (children get --role instead)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--trainer-procs", "--rollout-workers", "--reward-workers", "--teacher-workers", "--judge-workers",
                    "--role"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(argv: list[str], cfg, system, trainer_procs: int) -> int:
    """This process becomes the controller; every other role is a child process on this host."""
    from megatron_ernie.rl.control import listen

    authkey = os.urandom(16).hex()
    os.environ[AUTHKEY_ENV] = authkey
    listener = listen(system.controller_port, bytes.fromhex(authkey))
    port = listener.address[1]
    base = {**os.environ, ADDRESS_ENV: f"127.0.0.1:{port}", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    base.pop("ERNIE_HET_ROLES", None)
    command = [sys.executable, "-m", "megatron_ernie.rl.main", *_child_argv(argv)]
    master_port = _free_port()
    children = []
    for rank in range(trainer_procs):
        env = {**base, "RANK": str(rank), "WORLD_SIZE": str(trainer_procs), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(trainer_procs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)}
        children.append(subprocess.Popen(command + ["--role", "trainer"], env=env))
    rollout_world = _rollout_world_env(system)
    teachers = system.teacher_workers * len(cfg.rl.distill.aliases)
    judges = system.judge_workers if cfg.rl.judge.enabled else 0
    for role, count in (("rollout", system.rollout_workers), ("reward", system.reward_workers), ("teacher", teachers),
                        ("judge", judges)):
        for rank in range(count):
            env = {**base, RANK_ENV: str(rank), **(rollout_world(rank) if role == "rollout" else {})}
            children.append(subprocess.Popen(command + ["--role", role], env=env))
    code = 1
    try:
        from megatron_ernie.observe.console import setup_logging

        setup_logging(cfg.log.level, True)
        code = run_controller(cfg, system, listener, "127.0.0.1", _expected_rollouts(system, None),
                              watch=lambda controller: _watch_children(children, trainer_procs, controller))
    finally:
        from megatron_ernie.runtime.env import EXIT_REQUEUE

        _reap(children, grace_s=_REAP_GRACE_S if code in (0, EXIT_REQUEUE) else _FAIL_GRACE_S)
    return code


def _rollout_world_env(system):
    """rank -> torch world env of the rollout processes, when they form TP replicas (else none)."""
    if system.rollout_tensor == 1:
        return lambda rank: {}
    port, size = _free_port(), system.rollout_workers
    return lambda rank: {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                         "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _watch_children(children, trainer_procs: int, controller) -> None:
    """Stop the run at once when a child cannot run: a trainer process that exits before the run ends
    (it may never have connected), or any role that exits with 2 (a config error at start-up). Other
    roles that die are the controller's business (rollouts are retried elsewhere)."""
    import threading

    def watch():
        while not controller.finished:
            for index, child in enumerate(children):
                code = child.poll()
                if code is not None and (index < trainer_procs or code == 2):
                    role = "trainer" if index < trainer_procs else "role"
                    controller.fail(f"{role} process {child.pid} exited with code {code}")
                    return
            time.sleep(0.5)

    threading.Thread(target=watch, name="watch-children", daemon=True).start()


_REAP_GRACE_S = 60.0  # a finished (or requeued) run: children leave on the controller's shutdown message
_FAIL_GRACE_S = 5.0  # a failed run: nothing left to wait for


def _reap(children, grace_s: float = _REAP_GRACE_S) -> None:
    """Wait for the children `grace_s` in all (one deadline, not one per child), then SIGTERM what is
    left and SIGKILL what ignores that. After a failure the grace is short: the others are stopped at once."""
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    left = [c for c in children if c.poll() is None]
    for child in left:
        log.warning(f"child {child.pid} did not exit; stopping it")
        child.terminate()
    for child in left:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        role, rank, dist_env = _role_from_env(args)
        _hide_gpus_from_cpu_role(role)  # before anything asks torch about CUDA
        cfg, system = load_config(args)
        check_tasks_and_tokenizer(cfg, system, tokenizer=role in (None, "controller"), warn=role == "controller")
        if role in (None, "controller"):  # before any process starts; teachers check again themselves
            from megatron_ernie.rl.teacher.checkpoints import check_teachers

            check_teachers(cfg, agent=system.agent_max_turns > 1)
            from megatron_ernie.rl.judge.checkpoints import check_judge

            check_judge(cfg, agent=system.agent_max_turns > 1)
        if role is None:
            return launch_local(argv, cfg, system, args.trainer_procs or 1)
        return run_role(role, rank, cfg, system, dist_env)
    except ConfigError as err:
        print(f"ernie rl: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
