"""Trusted first stage of the reward sandbox: build the jail, then exec the program.

Run by `sandbox.py` as `python -I -S sandbox_boot.py SPEC_JSON` with the
program's stdin/stdout/stderr already redirected to files. Standard library
only, no package imports: it must start fast and import nothing the job owns.

Why a separate process instead of `preexec_fn`: namespace, mount and uid
changes are unsafe in a forked copy of a threaded reward worker, and this
process can outlive a worker hiccup long enough to reap the program.

"namespaces" mode (root, or an ordinary user where unprivileged user
namespaces are allowed), the design of bubblewrap and nsjail reduced to what a
reward program needs:
  unshare(mount, pid, net, ipc, uts [+ user]) -> fork; the child becomes PID 1
  of the new PID namespace, so when it dies the kernel kills every process it
  left behind (fork bombs included). The child builds a new root on a tmpfs
  holding read-only binds of the system and Python directories, a small
  size-capped tmpfs at /sandbox seeded with the program (its only writable
  place), a few /dev nodes and a fresh /proc; chroots into it, drops to the
  unprivileged uid, applies rlimits and execs Python. The new net namespace has
  only a downed loopback device: no network at all. (Binds are recursive but
  only their top mount is made read-only; none of the default paths has
  writable submounts on common systems.)
Both modes also close what no namespace isolates:
- kernel keyrings: the program joins a fresh session keyring it owns (so the
  worker's session keyring, where Kerberos/AFS/pam_keyinit put secrets, is not
  in its credentials), and as root the leased uid's user, user-session and
  persistent keyrings are cleared before and after the run (a non-root run's
  user keyrings live in its own user namespace and die with it);
- a seccomp filter (x86_64, aarch64) refuses request_key (its upcall runs
  /sbin/request-key as root on the host, e.g. DNS lookups through
  dns_resolver) and the keyctl operations that could stop us clearing a
  keyring (setperm, chown) or reach one that outlives the run (persistent);
- SysV IPC in the fresh IPC namespace is bounded by the memory limit
  (shmmax/shmall, shm_rmid_forced so a detached segment dies instead of
  living outside every rlimit, a few small message queues); where those
  sysctls cannot be written, SysV IPC is refused by the seccomp filter.
"rlimits" mode (only when explicitly chosen and acknowledged: "auto" refuses
to run when namespaces are unavailable): rlimits, uid drop when root, a new
session, a Python audit hook that refuses sockets, and the kernel's
unprivileged confinement where present: Landlock (filesystem reads only below
the system/Python paths and the scratch dir, no TCP, no signals or ptrace to
processes outside the sandbox) and a seccomp filter refusing keyrings, SysV
and POSIX message-queue IPC (no private IPC namespace here), non-Unix
sockets, io_uring, ptrace, process_vm_*, bpf and perf_event_open.
Every process the program started is killed afterwards (we are its child
subreaper, so its orphans stay our descendants).

Writes a JSON status file: isolation mode, exit code or signal, whether the
wall clock ran out, CPU seconds and wall seconds, and which confinement
layers ("seccomp", "landlock", "sysv-bounded") were applied.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves our directory off sys.path
import sandbox_confine as confine  # noqa: E402 - a sibling file, standard library only

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 0x20, 0x400, 0x800, 0x1000, 0x4000
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 0x40000, 0x200000, 0x1000000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 36, 38, 22
LAYERS_PREFIX = "layers: "
CLEANER_FOUND_LOCKED = 3
DEVICES = ("null", "zero", "urandom", "random")
JAIL_WORKDIR = "/sandbox"
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

# Prepended to the program in "rlimits" mode, where no network namespace exists.
SOCKET_BLOCK_PRELUDE = """
import runpy, sys
def _deny_sockets(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in the reward sandbox")
sys.addaudithook(_deny_sockets)
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_libc = ctypes.CDLL(None, use_errno=True)


def _checked(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _c_string(text):
    return None if text is None else text.encode()


def _mount(source, target, fstype, flags, data=None) -> None:
    ret = _libc.mount(_c_string(source), _c_string(target), _c_string(fstype), ctypes.c_ulong(flags),
                      _c_string(data))
    _checked(ret, f"mount {source} on {target}")


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when our parent dies (cleared by setuid: call again after)."""
    _checked(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def enter_namespaces(spec: dict) -> str:
    """Unshare the namespaces for "namespaces" mode; return the mode we got.

    As root: plain namespaces, and the program later drops to spec uid/gid.
    As an ordinary user (a Slurm job): the same inside a new user namespace,
    where spec uid/gid is the program's identity mapped onto ours; we hold
    capabilities only inside it, and the program's exec (euid != 0) drops them.
    "auto" never falls back to the weak mode: untrusted code only runs
    without namespaces when the config chose "rlimits" (and acknowledged it).
    """
    if spec["isolation"] == "rlimits":
        return "rlimits"
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    outer_uid, outer_gid = os.getuid(), os.getgid()
    if outer_uid == 0 and _libc.unshare(flags) == 0:
        return "namespaces"
    if _libc.unshare(CLONE_NEWUSER | flags) == 0:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{spec['uid']} {outer_uid} 1")
        _write("/proc/self/gid_map", f"{spec['gid']} {outer_gid} 1")
        return "namespaces"
    err = ctypes.get_errno()
    raise OSError(err, f"isolation = {spec['isolation']!r}: namespaces unavailable, unshare(user|mount|pid|net|"
                       f"ipc|uts) refused ({errno_name(err)}: {os.strerror(err)}), so untrusted code is not run. "
                       "Fix: run the reward workers as root, or allow unprivileged user namespaces "
                       "(user.max_user_namespaces > 0; on Ubuntu kernel.apparmor_restrict_unprivileged_userns = 0),"
                       " or accept the weaker mode (host filesystem view limited only by Landlock if present, "
                       "shared network/IPC namespaces) with sandbox.isolation = 'rlimits' and "
                       "sandbox.accept_weak_isolation = true")


def errno_name(err: int) -> str:
    import errno

    return errno.errorcode.get(err, str(err))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _kept_mount_flags(path: str) -> int:
    """The existing per-mount flags of `path` as MS_* bits.

    A read-only remount must restate them: inside a user namespace the kernel
    refuses to clear flags (nosuid, noexec, atime mode) locked by the host.
    """
    st = os.statvfs(path).f_flag
    flags = st & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    if st & os.ST_RELATIME:
        flags |= MS_RELATIME
    elif not st & os.ST_NOATIME:
        flags |= MS_STRICTATIME
    return flags


def _bind_readonly(source: str, root: str) -> None:
    """Make `source` visible read-only at the same path inside the new root."""
    target = root + source
    if os.path.islink(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.readlink(source), target)
        return
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | _kept_mount_flags(target))


def _covered(path: str, done: list) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in done)


def _make_workdir(spec: dict, workdir: str) -> None:
    """A size-capped tmpfs owned by the sandbox uid, seeded with the staged files.

    A tmpfs rather than a bind of the host directory, so that many files each
    under RLIMIT_FSIZE cannot fill the job's disk.
    """
    os.makedirs(workdir)
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={spec['scratch_bytes']},nr_inodes=1024,mode=0700")
    for name in os.listdir(spec["scratch_dir"]):
        with open(os.path.join(spec["scratch_dir"], name), "rb") as src:
            with open(os.path.join(workdir, name), "wb") as dst:
                dst.write(src.read())
    if os.geteuid() == 0:
        for path in [workdir] + [os.path.join(workdir, n) for n in os.listdir(workdir)]:
            os.chown(path, spec["uid"], spec["gid"])


def build_jail_root(spec: dict) -> None:
    """Assemble the new root filesystem (we are PID 1 of the new namespaces, still privileged in them)."""
    root = spec["root_dir"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # never propagate our mounts to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    done = []
    for path in sorted(set(spec["readonly_paths"]), key=len):
        if os.path.lexists(path) and not _covered(path, done):
            _bind_readonly(path, root)
            done.append(path)
    _make_workdir(spec, root + JAIL_WORKDIR)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in (d for d in DEVICES if os.path.exists(f"/dev/{d}")):
        open(f"{root}/dev/{dev}", "a").close()
        _mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, MS_BIND)
    os.makedirs(root + "/proc", exist_ok=True)
    try:
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass  # refused in some containers (masked host /proc) for user namespaces: go without /proc
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir(JAIL_WORKDIR)


def apply_limits(spec: dict) -> None:
    """rlimits for the program; CPU soft == hard so the kernel sends SIGKILL, which a PID 1 cannot ignore."""
    limits = {
        resource.RLIMIT_CPU: spec["cpu_s"],
        resource.RLIMIT_AS: spec["memory_bytes"],
        resource.RLIMIT_NPROC: spec["max_processes"] + spec.get("processes_already", 0),
        resource.RLIMIT_FSIZE: spec["max_file_bytes"],
        resource.RLIMIT_NOFILE: 64,
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))


def drop_privileges(spec: dict) -> None:
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
        if os.getuid() == 0 or os.geteuid() == 0:
            raise OSError("still root after setuid")


def confine_program(spec: dict, mode: str) -> list:
    """The kernel layers namespaces do not give (see sandbox_confine); returns the names applied.

    Runs after the uid drop, so the new session keyring belongs to the program.
    The uid's shared user keyrings are cleared when that uid is ours alone for
    this run: as root (a leased uid) or in our own user namespace; never in the
    weak mode as an ordinary user, where they are the job user's own. Keyring
    syscalls stay allowed only where the program has a kernel uid of its own
    (as root); an ordinary user's program shares the job user's and gets none.
    """
    layers = []
    if confine.fresh_session_keyring():
        layers.append("session-keyring")
        if mode == "namespaces" or spec["outer_root"]:
            confine.clear_uid_keyrings()
    if mode == "rlimits":
        if confine.restrict_with_landlock(spec["readonly_paths"] + ["/dev/null", "/dev/urandom"],
                                          [spec["scratch_dir"]]):
            layers.append("landlock")
        elif not spec["outer_root"]:
            raise OSError("isolation = 'rlimits' as an ordinary user needs Landlock (Linux >= 5.13 with landlock "
                          "in the lsm= list): without it the program runs as the job's own user and could read the "
                          "job's files and the memory and environment (auth key, hidden tests) of its other "
                          "processes. Run as root, enable user namespaces, or enable Landlock")
        seccomp = confine.weak_mode_filter()
    else:
        seccomp = confine.strong_mode_filter(spec["sysv_bounded"], own_uid=spec["outer_root"])
    return layers + ["seccomp"] * seccomp + ["sysv-bounded"] * bool(spec.get("sysv_bounded"))


def become_program(spec: dict, mode: str, report_w: int) -> None:
    """In the forked child: enter the jail (or the weak mode) and exec the program."""
    _die_with_parent()
    if mode == "namespaces":
        build_jail_root(spec)
        argv = [spec["python"], "-I", spec["script"]]
    else:
        os.setsid()
        os.chdir(spec["scratch_dir"])
        argv = [spec["python"], "-I", "-c", SOCKET_BLOCK_PRELUDE, spec["script"]]
    drop_privileges(spec)
    _die_with_parent()
    apply_limits(spec)
    os.write(report_w, f"{LAYERS_PREFIX}{','.join(confine_program(spec, mode))}\n".encode())
    env = dict(CLEAN_ENV, HOME=os.getcwd())
    try:
        os.execve(spec["python"], argv, env)
    except PermissionError as exc:
        raise PermissionError(f"{exc}; uid {os.getuid()} cannot run this interpreter: set sandbox.python "
                              "to one it can read and execute, e.g. /usr/bin/python3") from None


def _pidfd(pid: int):
    """A pollable handle on the child (Linux >= 5.3), or None on older kernels (e.g. RHEL 8)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def wait_with_deadline(pid: int, wall_s: float) -> dict:
    """Wait for the program; SIGKILL it at the wall-clock deadline. Returns the outcome."""
    deadline = time.monotonic() + wall_s
    pidfd = _pidfd(pid)
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            break
        if pidfd is None:
            time.sleep(min(0.005, remaining))
        else:
            select.select([pidfd], [], [], remaining)
    if pidfd is not None:
        os.close(pidfd)
    return {
        "timed_out": timed_out,
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def kill_leftovers(spec: dict, spare: int | None) -> None:
    """Weak mode has no PID namespace: kill what the program left behind.

    Every process it started is our descendant (we are its child subreaper, so
    even a daemon that double-forked and called setsid is reparented to us):
    kill the whole subtree until none is left. As root also every process of
    the sandbox uid, which is leased to this run alone (from a child that
    became that uid, so nothing else can be hit). `spare`: our keyring cleaner.
    """
    if os.geteuid() == 0:
        as_sandbox_uid(spec, _kill_all_of_my_uid)
    deadline = time.monotonic() + 2.0
    while (pids := descendants(os.getpid(), spare)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap_orphans(0.05)


def _kill_all_of_my_uid() -> None:
    for _ in range(3):  # again, for children forked while we were killing
        os.kill(-1, signal.SIGKILL)


def count_processes_of(uid: int) -> int:
    """How many tasks (threads included: the kernel counts those) `uid` has now.

    Weak mode as an ordinary user: the program keeps the job user's uid, and
    RLIMIT_NPROC compares against all of that user's tasks (trainer, workers,
    ...), so the program gets max_processes on top of those.
    """
    count = 0
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                count += len(os.listdir(f"/proc/{entry}/task"))
        except OSError:
            pass
    return count


def descendants(root: int, spare: int | None = None) -> list:
    """Pids of every process below `root` except `spare`, from /proc/*/stat parent links."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child == spare:
                continue
            found.append(child)
            todo.append(child)
    return found


def as_sandbox_uid(spec: dict, action) -> None:
    """Run `action` in a child that dropped to the sandbox uid (root only): it can touch nothing else."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            drop_privileges(spec)
            action()
            code = 0
        finally:
            os._exit(code)
    os.waitpid(child, 0)


def _clear_keyrings_of_my_uid() -> None:
    if confine.fresh_session_keyring():
        confine.clear_uid_keyrings()


def start_keyring_cleaner(spec: dict) -> tuple:
    """A child, forked before we enter the new PID namespace (whose dead init forbids later forks),
    that waits for the run to end and then empties the sandbox uid's keyrings. Returns (pid, go_fd)."""
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        code = 1
        try:
            if os.read(go_r, 1) == b"1":
                drop_privileges(spec)
                _clear_keyrings_of_my_uid()
                code = 0
        except confine.KeyringLocked:
            code = CLEANER_FOUND_LOCKED
        finally:
            os._exit(code)
    os.close(go_r)
    return pid, go_w


def finish_keyring_cleaner(cleaner: tuple) -> str:
    """Let the cleaner run; returns "" or why it could not clear."""
    pid, go_w = cleaner
    os.write(go_w, b"1")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == CLEANER_FOUND_LOCKED:
        return f"{confine.KEYRING_LOCKED_MARK} (found after the run)"
    return "" if status == 0 else f"clearing the sandbox uid's keyrings after the run failed (wait status {status})"


def reap_orphans(timeout_s: float = 1.0) -> None:
    """As child subreaper we inherit the program's orphans: reap them so no zombie counts against RLIMIT_NPROC."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def run(spec: dict) -> dict:
    _die_with_parent()
    spec["outer_root"] = os.geteuid() == 0
    cleaner = start_keyring_cleaner(spec) if spec["outer_root"] else None
    mode = enter_namespaces(spec)
    spec["sysv_bounded"] = mode == "namespaces" and confine.bound_sysv_ipc(spec["memory_bytes"])
    if mode == "rlimits":
        _checked(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
        if not spec["outer_root"]:
            spec["processes_already"] = count_processes_of(os.getuid())
    elif not spec["outer_root"]:
        spec["processes_already"] = 1  # we (the bootstrap) share the program's uid in its user namespace
    report_r, report_w = os.pipe2(os.O_CLOEXEC)  # closes by itself when exec succeeds
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        try:
            become_program(spec, mode, report_w)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, never raised past exec
            os.write(report_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
        os._exit(127)
    os.close(report_w)
    report, started = await_exec(report_r, spec["setup_s"])
    start = time.monotonic()  # the program's wall clock starts at its exec, not at the fork
    if started:
        outcome = wait_with_deadline(pid, spec["wall_s"])
    else:
        outcome = wait_with_deadline(pid, 0.0)  # kills the unfinished set-up
        report += f"\nthe sandbox was not ready within {spec['setup_s']} s (an overloaded host?)"
    if mode == "rlimits":
        kill_leftovers(spec, cleaner and cleaner[0])
    cleaner_error = finish_keyring_cleaner(cleaner) if cleaner is not None else ""
    if mode == "rlimits":
        reap_orphans()
    layers, setup_error = _parse_report(report)
    setup_error = setup_error or cleaner_error  # a later run must not see what this one stored
    return dict(outcome, isolation=mode, setup_error=setup_error, layers=layers, wall_s=time.monotonic() - start)


def await_exec(report_r: int, limit_s: float) -> tuple:
    """(what the child reported, whether it got to its exec or its end within limit_s).

    The child builds the jail, writes its report and execs the program; the
    report pipe is close-on-exec, so it reads empty once the program runs (or
    the child died). Why wait for it: building the jail waits on the kernel
    (mounts, namespaces), seconds on a busy host, and that must not count
    against the program's wall-clock limit.
    """
    deadline, chunks = time.monotonic() + limit_s, []
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([report_r], [], [], remaining)[0]:
            break
        chunk = os.read(report_r, 4096)
        if not chunk:
            return b"".join(chunks).decode(errors="replace"), True
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace"), False


def _parse_report(text: str) -> tuple:
    """(layers the child applied, its setup error or "") from its report."""
    layers = []
    if text.startswith(LAYERS_PREFIX):
        first, _, text = text.partition("\n")
        layers = [name for name in first[len(LAYERS_PREFIX):].split(",") if name]
    return layers, text.strip()[:4000]


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        status = run(spec)
    except OSError as exc:
        status = {"setup_error": f"{type(exc).__name__}: {exc}", "isolation": spec["isolation"]}
    with open(spec["status_path"], "w") as f:
        json.dump(status, f)


if __name__ == "__main__":
    main()
