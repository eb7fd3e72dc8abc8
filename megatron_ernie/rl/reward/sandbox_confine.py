"""Kernel confinement layers of the reward sandbox that namespaces do not give.

Imported by `sandbox_boot.py` (standard library only, run as `python -I -S`),
applied in the forked child just before it execs the program:

- keyrings: no namespace, chroot or setuid isolates the kernel keyrings. A
  process keeps its parent's session keyring (possessor rights: read, write,
  clear) and every process of a uid shares that uid's user keyring, which
  outlives the process. `fresh_session_keyring` and `clear_uid_keyrings`
  give the program a new, empty session keyring and empty user keyrings.
- seccomp: a classic-BPF syscall filter (the mechanism of Docker's default
  profile, Linux >= 3.5), installed with no_new_privs so it binds an
  unprivileged process and survives exec. It returns EPERM for the denied
  syscalls; a program never needs them to compute an answer.
- Landlock (Linux >= 5.13, unprivileged): an allow-list of filesystem access
  beneath a few paths, plus TCP (ABI 4) and signal/abstract-socket scoping
  (ABI 6). Used by the weak "rlimits" mode, which has no mount namespace.
- SysV IPC limits: a new IPC namespace starts with shmmax/shmall practically
  unlimited, and a detached segment counts against no rlimit of anyone.

Every function returns whether it applied, so the status record can say which
layers a run had; nothing here raises for a missing kernel feature.
"""

import ctypes
import errno
import os
import platform
import struct

_libc = ctypes.CDLL(None, use_errno=True)

# keyctl(2) operations and special keyring ids (linux/keyctl.h)
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_CHOWN, KEYCTL_SETPERM, KEYCTL_CLEAR = 1, 4, 5, 7
KEYCTL_GET_PERSISTENT = 22
KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -3, -4, -5
# A kernel without keys or persistent keyrings, or a container whose seccomp profile (Docker's default)
# refuses the key syscalls: then the program, under the same inherited filter, cannot reach them either.
NO_KEYRINGS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM)

# Per-architecture syscall numbers (asm/unistd.h) and audit arch (linux/audit.h).
SYSCALLS = {
    "x86_64": dict(arch=0xC000003E, add_key=248, request_key=249, keyctl=250, shmget=29, semget=64, msgget=68,
                   mq_open=240, ptrace=101, process_vm_readv=310, process_vm_writev=311, socket=41,
                   perf_event_open=298, bpf=321, userfaultfd=323, io_uring_setup=425, io_uring_enter=426,
                   io_uring_register=427, landlock_create_ruleset=444, landlock_add_rule=445,
                   landlock_restrict_self=446),
    "aarch64": dict(arch=0xC00000B7, add_key=217, request_key=218, keyctl=219, shmget=194, semget=190,
                    msgget=186, mq_open=180, ptrace=117, process_vm_readv=270, process_vm_writev=271, socket=198,
                    perf_event_open=241, bpf=280, userfaultfd=282, io_uring_setup=425, io_uring_enter=426,
                    io_uring_register=427, landlock_create_ruleset=444, landlock_add_rule=445,
                    landlock_restrict_self=446),
}
X32_SYSCALL_BIT = 0x40000000
SYSV_IPC = ("shmget", "semget", "msgget")
# The weak mode shares the host's IPC namespace, network and processes: refuse what reaches them.
WEAK_DENIED = ("add_key", "request_key", "keyctl", *SYSV_IPC, "mq_open", "ptrace", "process_vm_readv",
               "process_vm_writev", "perf_event_open", "bpf", "userfaultfd", "io_uring_setup",
               "io_uring_enter", "io_uring_register")
AF_UNIX = 1


def _syscall(name: str, *args) -> int:
    return _libc.syscall(ctypes.c_long(SYSCALLS[platform.machine()][name]), *args)


def _keyctl(op: int, *args) -> int:
    return _syscall("keyctl", ctypes.c_long(op), *(ctypes.c_long(a) for a in args))


def _raise_unless_no_keyrings(what: str) -> None:
    err = ctypes.get_errno()
    if err not in NO_KEYRINGS:
        raise OSError(err, f"{what}: {os.strerror(err)}")


def fresh_session_keyring() -> bool:
    """Join a new anonymous session keyring owned by our (already dropped) uid; False if no keyrings."""
    if platform.machine() not in SYSCALLS:
        return False
    if _keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0) < 0:
        _raise_unless_no_keyrings("keyctl(JOIN_SESSION_KEYRING)")
        return False
    return True


def clear_uid_keyrings() -> None:
    """Empty our uid's user, user-session and persistent keyrings: what an earlier run left there.

    Call with the sandbox uid, after `fresh_session_keyring` (the persistent
    keyring is reached by linking it into the session keyring). The program
    cannot stop this: the seccomp filter refuses the setperm/chown that would
    take away our write permission.
    A keyring whose permissions an earlier program did change (on a kernel
    without seccomp, or before this filter existed) cannot be emptied by
    anyone until reboot: that raises KeyringLocked, and the caller moves on
    to another uid.
    """
    if platform.machine() not in SYSCALLS:
        return
    for keyring, name in ((KEY_SPEC_USER_KEYRING, "user"), (KEY_SPEC_USER_SESSION_KEYRING, "user-session")):
        _clear(keyring, name)
    persistent = _keyctl(KEYCTL_GET_PERSISTENT, -1, KEY_SPEC_SESSION_KEYRING)
    if persistent < 0:
        _raise_unless_no_keyrings("keyctl(GET_PERSISTENT)")
    else:
        _clear(persistent, "persistent")


class KeyringLocked(OSError):
    """The sandbox uid's keyring refuses to be cleared (its write permission was taken away)."""


def _clear(keyring: int, name: str) -> None:
    if _keyctl(KEYCTL_CLEAR, keyring) < 0:
        if ctypes.get_errno() == errno.EACCES:
            raise KeyringLocked(errno.EACCES, f"{KEYRING_LOCKED_MARK}: the {name} keyring of uid {os.getuid()} "
                                              "no longer lets its owner clear it; it empties at reboot")
        _raise_unless_no_keyrings(f"keyctl(CLEAR) of the sandbox uid's {name} keyring")


KEYRING_LOCKED_MARK = "sandbox uid keyring locked"


# --- seccomp ------------------------------------------------------------------------------------
# Classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}.
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
SECCOMP_MODE_FILTER = 2
OFFSET_NR, OFFSET_ARCH, OFFSET_ARG0 = 0, 4, 16  # arg0's low 32 bits (little-endian)
DENY, ALLOW = SECCOMP_RET_ERRNO | errno.EPERM, SECCOMP_RET_ALLOW


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _deny_if_equal(values, result: int = DENY) -> list[bytes]:
    """`if A == v: return result` for each v."""
    out = []
    for value in values:
        out += [_insn(BPF_JEQ_K, value, 0, 1), _insn(BPF_RET_K, result)]
    return out


def seccomp_program(denied: tuple, arg0_rule: tuple | None = None) -> bytes:
    """The filter: foreign-ABI syscalls (i386 int 0x80, x32) and `denied` get EPERM.

    arg0_rule = (syscall, "deny"|"allow_only", values): one syscall whose first
    argument decides (keyctl's operation, socket's address family).
    """
    table = SYSCALLS[platform.machine()]
    prog = [_insn(BPF_LD_W_ABS, OFFSET_ARCH), _insn(BPF_JEQ_K, table["arch"], 1, 0), _insn(BPF_RET_K, DENY),
            _insn(BPF_LD_W_ABS, OFFSET_NR), _insn(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1), _insn(BPF_RET_K, DENY)]
    prog += _deny_if_equal(table[name] for name in denied)
    if arg0_rule is not None:
        name, kind, values = arg0_rule
        prog += [_insn(BPF_JEQ_K, table[name], 1, 0), _insn(BPF_RET_K, ALLOW), _insn(BPF_LD_W_ABS, OFFSET_ARG0)]
        if kind == "deny":
            prog += _deny_if_equal(values) + [_insn(BPF_RET_K, ALLOW)]
        else:
            prog += _deny_if_equal(values, ALLOW) + [_insn(BPF_RET_K, DENY)]
    return b"".join(prog + [_insn(BPF_RET_K, ALLOW)])


def install_seccomp(denied: tuple, arg0_rule: tuple | None = None) -> bool:
    """Install the filter on this process (inherited by its children, kept across exec); False if unsupported."""
    if platform.machine() not in SYSCALLS:
        return False
    program = seccomp_program(denied, arg0_rule)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(buffer))
    _checked(_libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if _libc.prctl(22, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0) != 0:
        if ctypes.get_errno() == errno.EINVAL:  # kernel built without seccomp filters
            return False
        _checked(-1, "prctl(PR_SET_SECCOMP)")
    return True


def strong_mode_filter(sysv_bounded: bool, own_uid: bool) -> bool:
    """Namespaces mode. With a uid of its own (we are root: a leased uid) the program keeps keyrings,
    fresh and cleared, but not the ops that defeat clearing. As an ordinary user's program it has the
    job user's kernel uid (a user namespace maps one uid onto itself), and keys grant rights by kernel
    uid: any key of the job user that allows its "user" class, e.g. that user's own user keyring, would
    be readable and writable by serial number (listed in /proc/keys). There it gets no keyrings at all."""
    denied = ("request_key",) + (() if sysv_bounded else SYSV_IPC)
    if not own_uid:
        return install_seccomp(denied + ("add_key", "keyctl"))
    return install_seccomp(denied, ("keyctl", "deny", (KEYCTL_CHOWN, KEYCTL_SETPERM, KEYCTL_GET_PERSISTENT)))


def weak_mode_filter() -> bool:
    return install_seccomp(WEAK_DENIED, ("socket", "allow_only", (AF_UNIX,)))


def _checked(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# --- SysV IPC limits -----------------------------------------------------------------------------
def bound_sysv_ipc(memory_bytes: int) -> bool:
    """In our fresh IPC namespace: all shared memory together <= the memory bound, destroyed on detach.

    Writable by root, and by a user-namespace owner on recent kernels; False
    where refused (the caller then denies SysV IPC with seccomp instead).
    """
    page = os.sysconf("SC_PAGE_SIZE")
    settings = {"shmmax": memory_bytes, "shmall": max(1, memory_bytes // page), "shm_rmid_forced": 1,
                "shmmni": 64, "msgmni": 4, "msgmnb": 16384, "msgmax": 8192}
    try:
        for name, value in settings.items():
            with open(f"/proc/sys/kernel/{name}", "w") as f:
                f.write(str(value))
    except OSError:
        return False
    return True


# --- Landlock ------------------------------------------------------------------------------------
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (1 << 14) | (1 << 15)  # + truncate, ioctl_dev
READ_ONLY = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1}  # ABI >= 5: (1 << 16) - 1


def landlock_abi() -> int:
    if platform.machine() not in SYSCALLS:
        return 0
    abi = _syscall("landlock_create_ruleset", None, ctypes.c_size_t(0),
                   ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(abi, 0)


def _ruleset_attr(abi: int) -> bytes:
    """struct landlock_ruleset_attr, as long as this ABI knows it."""
    fs = FS_RIGHTS_BY_ABI.get(abi, (1 << 16) - 1 if abi >= 5 else (1 << 15) - 1)
    if abi < 4:
        return struct.pack("Q", fs)
    if abi < 6:
        return struct.pack("QQ", fs, NET_BIND_TCP | NET_CONNECT_TCP)
    return struct.pack("QQQ", fs, NET_BIND_TCP | NET_CONNECT_TCP, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)


def _allow_beneath(ruleset: int, path: str, rights: int, handled: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not os.path.isdir(path):
            rights &= FS_FILE_RIGHTS
        attr = struct.pack("=Qi", rights & handled, fd)  # struct landlock_path_beneath_attr is packed
        _checked(_syscall("landlock_add_rule", ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.c_char_p(attr), 0),
                 f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def restrict_with_landlock(read_paths, write_paths) -> bool:
    """Confine this process: read/execute only beneath `read_paths`, everything beneath `write_paths`.

    Also, with ABI >= 4, no TCP bind/connect; with ABI >= 6, no signals to and
    no abstract Unix sockets of processes outside the sandbox. Landlock
    always denies ptrace of processes outside the sandbox. False if unsupported.
    """
    abi = landlock_abi()
    if abi < 1:
        return False
    attr = _ruleset_attr(abi)
    handled = struct.unpack_from("Q", attr)[0]
    ruleset = _syscall("landlock_create_ruleset", ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), 0)
    if ruleset < 0:
        _checked(-1, "landlock_create_ruleset")
    try:
        for path in (p for p in read_paths if os.path.exists(p)):
            _allow_beneath(ruleset, path, READ_ONLY, handled)
        for path in write_paths:
            _allow_beneath(ruleset, path, handled, handled)
        _checked(_libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        _checked(_syscall("landlock_restrict_self", ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return True
