"""Run untrusted, model-written Python in a separate, locked-down process.

Code-execution rewards run whatever the policy wrote. A policy under RL
pressure finds every shortcut (reading the expected answers, killing the
grader, forking until the node falls over), so the program gets:

- wall-clock and CPU-time limits; on timeout every process it started dies
  (PID namespace: the kernel kills the namespace with its first process);
- an address-space limit (memory), a process-count limit (fork bombs) and a
  file-size limit (which also bounds stdout/stderr, written to files);
- no network (an empty network namespace);
- a small scratch directory (a size-capped tmpfs) as its only writable place,
  inside a private read-only root that shows only system and Python
  directories, not the job's files;
- a clean environment (no job env vars) and an unprivileged uid: dropped to
  with setuid when we are root (RLIMIT_NPROC does not bind root, and root can
  write anywhere), mapped through a user namespace when we are not;
- a fresh session keyring, emptied uid keyrings, SysV IPC bounded by the
  memory limit and a seccomp filter (sandbox_confine.py).

As root the uid is leased: each run takes the lowest uid of
[uid, uid + uid_count) that no other run on the node holds (an flock on a
node-local file, released when the run ends or its worker dies). RLIMIT_NPROC
and the user keyring are per uid node-wide, so two runs sharing a uid, in
one worker or in two, could starve or talk to each other. (As an ordinary
user every run has its own user namespace, where both are counted apart.)

The jail is built by `sandbox_boot.py`, a small stdlib-only script run as a
child process (see its docstring for the mechanics). It works as root and, as
an ordinary user, wherever unprivileged user namespaces are enabled. Where
neither is possible, isolation="auto" refuses to run the program (status
sandbox_error, naming what is missing and the fix); the weak mode (rlimits,
uid drop if root, Landlock and seccomp where the kernel has them, no private
namespaces) runs only when configured as isolation="rlimits" with
accept_weak_isolation=true, and as an ordinary user only where Landlock
exists (otherwise the program, running as the job's own user, could read
the job's files and its other processes' memory and environment). The mode
used is in every `SandboxResult.isolation`, the layers in `.layers`.

`run_python` never raises for anything the program does: a crash, timeout or
limit is a `SandboxResult` with a status and a detail line.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_ernie.config.rl import SandboxConfig

log = logging.getLogger(__name__)

OK, TIMEOUT, MEMORY, PROCESS_LIMIT = "ok", "timeout", "memory", "process_limit"
OUTPUT_LIMIT, CRASH, SANDBOX_ERROR = "output_limit", "crash", "sandbox_error"
STATUSES = (OK, TIMEOUT, MEMORY, PROCESS_LIMIT, OUTPUT_LIMIT, CRASH, SANDBOX_ERROR)

BOOT_SCRIPT = Path(__file__).with_name("sandbox_boot.py")
BOOT_GRACE_S = 5.0  # bootstrap start-up and reaping, on top of the jail set-up and wall_s
# Building the jail (namespaces, mounts) waits on the kernel: 0.1 s on an idle host, measured up
# to 2.2 s with two RL stages busy on 2 cores. The program's wall clock starts at its exec, so
# that wait never turns a correct program into a timeout; the set-up has this bound of its own.
JAIL_SETUP_LIMIT_S = 30.0
PROGRAM_NAME = "main.py"
UID_LEASE_DIR = Path("/run/ernie-sandbox-uids")  # node-local, shared by every worker and job on the node
PR_SET_DUMPABLE = 4
_warned_weak = False
_unusable_uids: set[int] = set()  # uids whose keyrings an earlier program locked (see sandbox_confine)
KEYRING_LOCKED_MARK = "sandbox uid keyring locked"  # sandbox_confine.KEYRING_LOCKED_MARK (boot is stdlib-only)


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one run: status is one of STATUSES; detail says why in one line."""

    status: str
    stdout: str
    stderr: str
    exit_code: int | None
    signal: int | None
    wall_s: float
    cpu_s: float
    isolation: str
    detail: str = ""
    layers: tuple[str, ...] = ()  # confinement layers applied (seccomp, landlock, session-keyring, sysv-bounded)

    @property
    def ok(self) -> bool:
        return self.status == OK


def run_python(code: str, stdin: str = "", config: SandboxConfig | None = None) -> SandboxResult:
    """Run `code` as a Python program fed `stdin`; return its outcome, never raising for it."""
    config = config or SandboxConfig()
    config.validate("rl.sandbox")
    if config.isolation == "rlimits":
        _protect_this_process()
    while True:
        with _leased_uid(config) as leased, \
                tempfile.TemporaryDirectory(prefix="ernie-sandbox-", ignore_cleanup_errors=True) as rundir:
            if leased is None:
                return _sandbox_error(f"all {config.uid_count} sandbox uids [{config.uid}, "
                                      f"{config.uid + config.uid_count}) are in use by other runs on this node or "
                                      "unusable (see the warnings): raise rl.sandbox.uid_count", "")
            paths = _prepare_rundir(Path(rundir), code, stdin, leased)
            status = _launch(paths, leased)
            if KEYRING_LOCKED_MARK not in status.get("setup_error", ""):
                return _classify(status, paths, leased)
            _unusable_uids.add(leased.uid)
            log.warning(f"reward sandbox: skipping uid {leased.uid} until reboot: {status['setup_error']}")


def _sandbox_error(detail: str, isolation: str) -> SandboxResult:
    return SandboxResult(SANDBOX_ERROR, "", "", None, None, 0.0, 0.0, isolation, detail)


@contextmanager
def _leased_uid(config: SandboxConfig):
    """`config` with uid/gid moved to the lowest free uid of its range, held for the run (root only).

    An exclusive flock per uid under a root-only node-local directory: taken
    without blocking, dropped by the kernel when this run's file closes, even
    if the worker is killed. Yields None when every uid is taken.
    """
    if os.geteuid() != 0:
        yield config
        return
    UID_LEASE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    for offset in range(config.uid_count):
        if config.uid + offset in _unusable_uids:
            continue
        fd = os.open(UID_LEASE_DIR / str(config.uid + offset), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield replace(config, uid=config.uid + offset, gid=config.gid + offset)
        finally:
            os.close(fd)
        return
    yield None


def _protect_this_process() -> None:
    """Weak mode: make this worker non-dumpable, so a program of the same uid cannot ptrace it
    or read its /proc/PID/{mem,environ} (auth key, the tests' expected outputs) when Landlock is missing."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def cpu_limit_s(config: SandboxConfig) -> int:
    """RLIMIT_CPU counts whole seconds."""
    return max(1, round(config.cpu_s))


def _prepare_rundir(rundir: Path, code: str, stdin: str, config: SandboxConfig) -> dict:
    """rundir/{scratch (the program's, chowned to it), root (jail mount point), io (ours)}."""
    os.chmod(rundir, 0o711)
    paths = {name: rundir / name for name in ("scratch", "root", "io")}
    for name, mode in (("scratch", 0o700), ("root", 0o755), ("io", 0o700)):
        paths[name].mkdir(mode=mode)
    (paths["scratch"] / PROGRAM_NAME).write_text(code)
    (paths["io"] / "stdin").write_text(stdin)
    if os.geteuid() == 0:
        for path in (paths["scratch"], paths["scratch"] / PROGRAM_NAME):
            os.chown(path, config.uid, config.gid)
    return paths


def _python_dirs(python: str) -> list[str]:
    """Directories the program's interpreter needs, made visible (read-only) in the jail."""
    dirs = {os.path.dirname(os.path.dirname(p)) for p in (python, os.path.realpath(python))}
    if python == sys.executable:
        dirs |= {sys.prefix, sys.base_prefix, os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    return sorted(d for d in dirs if d not in ("", "/"))


def _boot_spec(paths: dict, config: SandboxConfig) -> dict:
    python = config.python or sys.executable
    return {
        "isolation": config.isolation,
        "python": python,
        "script": PROGRAM_NAME,
        "uid": config.uid,
        "gid": config.gid,
        "scratch_dir": str(paths["scratch"]),
        "root_dir": str(paths["root"]),
        "status_path": str(paths["io"] / "status.json"),
        "readonly_paths": list(config.readonly_paths) + _python_dirs(python),
        "wall_s": config.wall_s,
        "setup_s": JAIL_SETUP_LIMIT_S,
        "cpu_s": cpu_limit_s(config),
        "memory_bytes": config.memory_mb << 20,
        "max_processes": config.max_processes,
        "max_file_bytes": config.max_file_bytes,
        "scratch_bytes": config.scratch_mb << 20,
    }


def _launch(paths: dict, config: SandboxConfig) -> dict:
    """Run the bootstrap with the program's stdio on files; return its status record."""
    io = paths["io"]
    argv = [sys.executable, "-I", "-S", str(BOOT_SCRIPT), json.dumps(_boot_spec(paths, config))]
    with open(io / "stdin", "rb") as fin, open(io / "stdout", "wb") as fout, open(io / "stderr", "wb") as ferr:
        proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, env={},
                                start_new_session=True, close_fds=True)
        try:
            proc.wait(timeout=JAIL_SETUP_LIMIT_S + config.wall_s + BOOT_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        return json.loads((io / "status.json").read_text())
    except (OSError, ValueError):
        return {"setup_error": f"sandbox bootstrap ended without a status (exit {proc.returncode})"}


def _read_capped(path: Path, limit: int) -> tuple[str, bool]:
    """Up to `limit` bytes of a file as text, and whether there was more."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def _classify(status: dict, paths: dict, config: SandboxConfig) -> SandboxResult:
    stdout, stdout_cut = _read_capped(paths["io"] / "stdout", config.max_output_bytes)
    stderr, _ = _read_capped(paths["io"] / "stderr", config.max_output_bytes)
    isolation = status.get("isolation", "none")
    _warn_once(status, isolation)
    verdict, detail = _verdict(status, stderr, stdout_cut, paths, config)
    return SandboxResult(status=verdict, stdout=stdout, stderr=stderr, exit_code=status.get("exit_code"),
                         signal=status.get("signal"), wall_s=status.get("wall_s", 0.0),
                         cpu_s=status.get("cpu_s", 0.0), isolation=isolation, detail=detail,
                         layers=tuple(status.get("layers", ())))


def _verdict(status: dict, stderr: str, stdout_cut: bool, paths: dict, config: SandboxConfig) -> tuple[str, str]:
    """Map the raw outcome to (status, detail). Order matters: limits before crashes."""
    last_line = stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""
    if status.get("setup_error"):
        return SANDBOX_ERROR, f"{status['setup_error']} {last_line}".strip()
    if status.get("timed_out"):
        return TIMEOUT, f"wall-clock limit of {config.wall_s}s reached"
    cpu_limit = cpu_limit_s(config)
    if status.get("signal") in (signal.SIGKILL, signal.SIGXCPU) and status.get("cpu_s", 0) >= cpu_limit - 0.1:
        return TIMEOUT, f"CPU-time limit of {cpu_limit}s reached"
    output_limit = f"output or files beyond the limits ({config.max_file_bytes} bytes a file, " \
                   f"{config.scratch_mb} MiB scratch): {last_line}"
    if stdout_cut or status.get("signal") == signal.SIGXFSZ or _file_full(paths["io"] / "stdout", config):
        return OUTPUT_LIMIT, output_limit
    if status.get("exit_code") == 0:
        return OK, ""
    if "MemoryError" in stderr or status.get("signal") == signal.SIGSEGV:
        return MEMORY, f"memory limit of {config.memory_mb} MiB reached: {last_line}"
    if "BlockingIOError" in stderr or "Resource temporarily unavailable" in stderr:
        return PROCESS_LIMIT, f"process limit of {config.max_processes} reached: {last_line}"
    if any(m in stderr for m in ("File too large", "No space left on device")) or \
            _file_full(paths["io"] / "stderr", config):
        return OUTPUT_LIMIT, output_limit
    code = status.get("exit_code")
    how = f"exit code {code}" if code is not None else f"signal {status.get('signal')}"
    return CRASH, f"{how}: {last_line}"


def _file_full(path: Path, config: SandboxConfig) -> bool:
    return os.path.getsize(path) >= config.max_file_bytes


def _warn_once(status: dict, isolation: str) -> None:
    """Once per process: the refusal of "auto" (an error), or which layers the weak mode got."""
    global _warned_weak
    if _warned_weak:
        return
    if "namespaces unavailable" in status.get("setup_error", ""):
        _warned_weak = True
        log.error(f"reward sandbox: {status['setup_error']}")
    elif isolation == "rlimits" and not status.get("setup_error"):
        _warned_weak = True
        layers = status.get("layers", [])
        missing = [name for name in ("landlock", "seccomp") if name not in layers]
        log.warning(f"reward sandbox: weak 'rlimits' mode (accepted in the config), layers {layers}"
                    + (f"; the kernel lacks {missing}: the program can read world-readable files of the job"
                       + (", reach the network and keyrings" if "seccomp" in missing else "")
                       if missing else ""))
