"""A reward worker under attack: scores hostile `code` samples and reports what got out.

Run as a script by tests/test_rl_sandbox_attacks.py, as root or (through
setpriv) as an ordinary user, so that each run is a separate reward-worker
process, as on a node:

    python sandbox_attacks.py SOURCE_DIR MODE PHASE SETTINGS_JSON

SOURCE_DIR holds the megatron_ernie package; MODE is "strong" (the default
isolation, "auto") or "weak" (isolation "rlimits", acknowledged); PHASE picks
the programs (see PHASES). Prints one JSON object: per program the reward,
status and detail the real reward path (RewardWorker.score on `code`
samples) gave it, plus what the worker saw from outside (a daemon left
running, SysV IPC objects left on the host, connections to its listeners).

Every attack program is scored against a reference whose expected output is
the loot: it earns reward 1.0 exactly when the attack worked, the way a
policy under RL pressure would be paid for it. Attacks that cannot print
their loot (killing, tracing) print ESCAPED. A contained attack prints
"contained: <why>" and gets status "wrong": it ran to the end, so containment
is not a side effect of a crash. x86_64 syscall numbers.
"""

import ctypes
import dataclasses
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time

PRELUDE = """
import ctypes, os, re, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def sys_(nr, *args):
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ret = libc.syscall(ctypes.c_long(nr), *conv)
    return ret, ctypes.get_errno()
def kread(key):
    buf = ctypes.create_string_buffer(512)
    n, err = sys_(250, 11, key, buf, 512)  # keyctl(KEYCTL_READ)
    return buf.raw[:n].decode() if n > 0 else None
def ksearch(ring, desc):
    return sys_(250, 10, ring, b"user", desc.encode(), 0)[0]  # keyctl(KEYCTL_SEARCH)
def keys_listed(description=""):  # serials of the keys /proc/keys lets us view (any that grant us "view")
    try:
        lines = open("/proc/keys").read().splitlines()
    except OSError:
        return []
    return [int(line.split()[0], 16) for line in lines if description in line]
def contained(why):
    print("contained:", why)
    sys.exit(0)
"""

ATTACKS = {
    # the worker's session keyring (where pam_keyinit / Kerberos KEYRING: caches put secrets)
    "keyring_worker_session": """
found = [kread(k) for k in [ksearch(r, "ernie-worker-secret") for r in (-3, -4, -5)] + [{key_serial}] if k > 0]
found += [kread(serial) for serial in keys_listed("ernie-worker-secret")]  # by serial, as /proc/keys shows them
found = [v for v in found if v]
print(found[0]) if found else contained(os.strerror(ctypes.get_errno()))
""",
    "sysv_shm_beyond_memory_bound": """
libc.shmat.restype = ctypes.c_void_p
size, ids = 32 << 20, []
while len(ids) * size <= {memory_bound}:  # one segment past the bound is enough
    sid = libc.shmget(0, ctypes.c_size_t(size), 0o1600)
    if sid < 0:
        break
    addr = libc.shmat(sid, None, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        break
    ctypes.memset(addr, 1, size)
    libc.shmdt(ctypes.c_void_p(addr))
    ids.append(sid)
stat = ctypes.create_string_buffer(512)
held = sum(size for sid in ids if libc.shmctl(sid, 2, stat) == 0)
print("ESCAPED" if held > {memory_bound} else f"contained: {{held >> 20}} MiB held")
""",
    "worker_environ": """
try:
    data = open("/proc/{worker_pid}/environ", "rb").read()
except OSError as exc:
    contained(exc.strerror)
m = re.search(rb"ERNIE_RL_AUTHKEY=([0-9a-f]+)", data)
print(m.group(1).decode()) if m else contained("no key in environ")
""",
    # reward hacking: the expected output is in the grader's memory
    "worker_memory_hidden_tests": """
pattern = re.compile(("hidden" + "-expected-").encode() + rb"[0-9a-f]{{16}}")
try:
    maps = open("/proc/{worker_pid}/maps").read().splitlines()
    mem = open("/proc/{worker_pid}/mem", "rb", 0)
except OSError as exc:
    contained(exc.strerror)
for line in maps:
    span, perms = line.split()[:2]
    if not perms.startswith("rw"):  # Python objects live in writable anonymous memory
        continue
    lo, hi = (int(x, 16) for x in span.split("-"))
    for start in range(lo, min(hi, lo + (256 << 20)), 4 << 20):
        try:
            mem.seek(start)
            chunk = mem.read(min(4 << 20, hi - start))
        except (OSError, ValueError, OverflowError):
            break
        found = pattern.search(chunk)
        if found:
            print(found.group().decode())
            sys.exit(0)
contained("no hidden test found")
""",
    "ptrace_worker": """
ret, err = sys_(101, 0x4206, {worker_pid}, 0, 0)  # PTRACE_SEIZE: attach without stopping it
print("ESCAPED") if ret == 0 else contained(os.strerror(err))
""",
    "signal_worker": """
ret, err = sys_(62, {worker_pid}, 0)  # kill(pid, 0): may we signal it?
print("ESCAPED") if ret == 0 else contained(os.strerror(err))
""",
    # raw sockets through ctypes, past any Python-level hook
    "network_loopback": """
def sockaddr(port):
    return struct.pack("=H", 2) + struct.pack(">H", port) + bytes([127, 0, 0, 1]) + bytes(8)
reached = []
tcp = libc.socket(2, 1, 0)
if tcp >= 0 and libc.connect(tcp, sockaddr({tcp_port}), 16) == 0 and libc.send(tcp, b"leak", 4, 0) == 4:
    reached.append("tcp")
udp = libc.socket(2, 2, 0)
if udp >= 0 and libc.sendto(udp, b"leak", 4, 0, sockaddr({udp_port}), 16) == 4:
    reached.append("udp")
print("ESCAPED") if reached else contained(os.strerror(ctypes.get_errno()))
""",
    "host_file_hidden_tests": """
try:
    print(open({host_file!r}).read())
except OSError as exc:
    contained(exc.strerror)
""",
    "daemon_outlives_run": """
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        libc.prctl(15, b"ernie-daemon", 0, 0, 0)  # PR_SET_NAME, so the worker can look for it
        time.sleep(60)
    os._exit(0)
time.sleep(0.2)
contained("daemon started; the worker checks whether it survived")
""",
    "sysv_ipc_left_on_host": """
made = [name for name, ret in (("shm", libc.shmget(0x45524E49, 4096, 0o1666)),
                               ("msg", libc.msgget(0x45524E49, 0o1666)),
                               ("sem", libc.semget(0x45524E49, 1, 0o1666))) if ret >= 0]
contained(f"created {{made}}; the worker checks the host's IPC namespace")
""",
    # request_key's upcall runs /sbin/request-key as root on the host (e.g. dns_resolver lookups)
    "request_key_upcall": """
ret, err = sys_(249, b"user", b"ernie-upcall", b"callout-info", 0)
print("ESCAPED") if err != 1 else contained(os.strerror(err))  # anything but EPERM reached the kernel's upcall path
""",
}

CONTROLS = {  # what a legitimate program may still do: proves the attacks above were not stopped by accident
    "hello": ("print(6 * 7)", "42"),
    "own_session_keyring": ("""
kid, err = sys_(248, b"user", b"mine", b"own-key-ok", 10, -3)
print(kread(kid) if kid > 0 else os.strerror(err))
""", "own-key-ok"),
    "small_sysv_shm": ("""
libc.shmat.restype = ctypes.c_void_p
sid = libc.shmget(0, ctypes.c_size_t(1 << 20), 0o1600)
addr = libc.shmat(sid, None, 0) if sid >= 0 else None
if addr and addr != ctypes.c_void_p(-1).value:
    ctypes.memmove(addr, b"shm-ok", 6)
    print(ctypes.string_at(addr, 6).decode())
else:
    print(os.strerror(ctypes.get_errno()))
""", "shm-ok"),
    "fork_children": ("""
kids = []
for _ in range(3):
    kid = os.fork()
    if kid == 0:
        os._exit(0)
    kids.append(kid)
for kid in kids:
    os.waitpid(kid, 0)
print("forked", len(kids))
""", "forked 3"),
}

# Leave a key where a later run (of this or another worker) looks; then look for it.
CARRY_STORE = """
stored = []
for ring in (-3, -4, -5):
    kid, err = sys_(248, b"user", b"ernie-carry", b"{carry}", {carry_len}, ring)  # add_key
    if kid > 0:
        sys_(250, 5, kid, 0x3f3f3f3f)  # setperm: everyone may read it
        stored.append(ring)
persistent, err = sys_(250, 22, -1, -3)  # KEYCTL_GET_PERSISTENT into the session keyring
if persistent > 0 and sys_(248, b"user", b"ernie-carry", b"{carry}", {carry_len}, persistent)[0] > 0:
    stored.append("persistent")
for serial in keys_listed(" keyring "):  # any keyring we can write by serial, e.g. the job user's own
    kid, err = sys_(248, b"user", b"ernie-carry", b"{carry}", {carry_len}, serial)
    if kid > 0:
        sys_(250, 5, kid, 0x3f3f3f3f)
        stored.append(hex(serial))
for ring in (-4, -5):  # take away the write right a cleaner needs
    sys_(250, 5, ring, 0x0b0b0000)
print("stored", stored)
"""

CARRY_READ = """
values = [kread(k) for k in [ksearch(r, "ernie-carry") for r in (-3, -4, -5)] if k > 0]
persistent, err = sys_(250, 22, -1, -3)
if persistent > 0 and ksearch(persistent, "ernie-carry") > 0:
    values.append(kread(ksearch(persistent, "ernie-carry")))
values += [kread(serial) for serial in keys_listed("ernie-carry")]
values = [v for v in values if v]
print(values[0]) if values else contained(os.strerror(ctypes.get_errno()))
"""

HOLDER = """
libc.prctl(15, b"{name}", 0, 0, 0)
for _ in range({children}):
    if os.fork() == 0:
        libc.prctl(15, b"{name}", 0, 0, 0)
        time.sleep(600)
        os._exit(0)
time.sleep(600)
"""

PHASES = ("attacks", "carry", "carry_store", "carry_read", "hold", "fork_ok")
IPC_KEY = 0x45524E49


def sandbox_config(mode: str, settings: dict):
    from megatron_ernie.config.rl import SandboxConfig

    weak = mode == "weak"
    wanted = dict(wall_s=settings.get("wall_s", 4), cpu_s=2, memory_mb=settings["memory_mb"],
                  max_processes=settings["max_processes"], scratch_mb=1, uid=settings["uid"], gid=settings["uid"],
                  uid_count=16, isolation="rlimits" if weak else "auto", accept_weak_isolation=weak,
                  python=settings.get("python", ""))
    known = {f.name for f in dataclasses.fields(SandboxConfig)}  # so the same attacks run against older code
    return SandboxConfig(**{k: v for k, v in wanted.items() if k in known})


def code_sample(name: str, program: str, expected: str, index: int):
    from megatron_ernie.rl.protocol import Sample

    reference = json.dumps({"tests": [{"stdin": "", "stdout": expected}]})
    return Sample(name, index, "code", [1], [2, 3], [-0.1, -0.2], 0, response_text=program, reference=reference)


def join_launcher_session_keyring(name: str) -> int:
    """Join (or create) the named session keyring every worker of this test shares, as under one launcher."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(ctypes.c_long(250), ctypes.c_long(1), name.encode())


def add_worker_secret_key(secret: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(ctypes.c_long(248), b"user", b"ernie-worker-secret", secret.encode(),
                        ctypes.c_long(len(secret)), ctypes.c_long(-3))


def score(programs: dict, config) -> dict:
    """{name: [reward, status, detail]} from the real reward path."""
    from megatron_ernie.rl.reward.worker import RewardWorker

    samples = [code_sample(name, PRELUDE + program, expected, i)
               for i, (name, (program, expected)) in enumerate(programs.items())]
    with RewardWorker(config, concurrency=2) as worker:
        scored = worker.score(samples)
    return {s.sample.prompt_id: [s.reward, s.status, s.detail] for s in scored}


def processes_named(name: str) -> list:
    """Live (not zombie) processes whose command name is `name`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                comm_and_rest = f.read().split(" (", 1)[1]
            comm, rest = comm_and_rest.rsplit(") ", 1)
            if entry.isdigit() and comm == name and rest[0] != "Z":
                pids.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return pids


def sysv_left_on_host() -> list:
    """Which of shm/msg/sem hold our attack's key in the host IPC namespace (and remove them)."""
    left = []
    for kind, flag in (("shm", "-M"), ("msg", "-Q"), ("sem", "-S")):
        with open(f"/proc/sysvipc/{kind}") as f:
            if any(line.split()[0] == str(IPC_KEY) for line in f.readlines()[1:]):
                left.append(kind)
                os.system(f"ipcrm {flag} {IPC_KEY} 2>/dev/null")
    return left


def listeners() -> tuple:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    return tcp, udp


def reached(tcp, udp) -> list:
    got = []
    for sock, kind in ((tcp, "tcp"), (udp, "udp")):
        try:
            sock.accept() if kind == "tcp" else sock.recv(16)
            got.append(kind)
        except BlockingIOError:
            pass
    return got


def attack_phase(mode: str, settings: dict) -> dict:
    """Every attack, plus the controls, and what the worker sees from outside afterwards."""
    hidden = "hidden-expected-" + secrets.token_hex(8)  # held only in this worker's memory
    join_launcher_session_keyring(settings["keyring"])
    key_serial = add_worker_secret_key(settings["worker_secret"])
    folder = tempfile.mkdtemp(prefix="ernie-attack-")  # 0700, this worker's user only
    host_file = os.path.join(folder, "hidden_tests.json")
    with open(os.open(host_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(settings["host_secret"])
    tcp, udp = listeners()
    fill = dict(key_serial=key_serial, carry=settings["carry"], carry_len=len(settings["carry"]),
                memory_bound=settings["memory_mb"] << 20, worker_pid=os.getpid(), host_file=host_file,
                tcp_port=tcp.getsockname()[1], udp_port=udp.getsockname()[1])
    loot = {"keyring_worker_session": settings["worker_secret"],
            "worker_environ": os.environ.get("ERNIE_RL_AUTHKEY", "?"), "worker_memory_hidden_tests": hidden,
            "host_file_hidden_tests": settings["host_secret"]}
    programs = {name: (text.format(**fill), loot.get(name, "ESCAPED")) for name, text in ATTACKS.items()}
    programs.update(CONTROLS)
    results = score(programs, sandbox_config(mode, settings))
    deadline = time.monotonic() + 2.0
    while processes_named("ernie-daemon") and time.monotonic() < deadline:
        time.sleep(0.05)
    daemons = processes_named("ernie-daemon")
    for pid in daemons:
        os.kill(pid, 9)
    os.unlink(host_file)
    os.rmdir(folder)
    return {"scored": results, "daemons_left": len(daemons), "sysv_left": sysv_left_on_host(),
            "listeners_reached": reached(tcp, udp), "uid": os.getuid()}


def carry_launcher(source: str, mode: str, settings: dict) -> dict:
    """Like a launcher: hold one session keyring while two worker processes, one after the other, score."""
    join_launcher_session_keyring(settings["keyring"])
    report = {}
    for phase in ("carry_store", "carry_read"):
        out = subprocess.run([sys.executable, __file__, source, mode, phase, json.dumps(settings)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{phase} worker failed: {out.stderr[-2000:]}")
        report.update(json.loads(out.stdout)["scored"])
    return {"scored": report}


def main() -> None:
    source, mode, phase, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    sys.path.insert(0, source)
    config = sandbox_config(mode, settings)
    if phase == "attacks":
        report = attack_phase(mode, settings)
    elif phase == "carry":
        report = carry_launcher(source, mode, settings)
    elif phase == "carry_store":
        fill = dict(carry=settings["carry"], carry_len=len(settings["carry"]))
        report = {"scored": score({"keyring_carry_store": (CARRY_STORE.format(**fill), "-")}, config)}
    elif phase == "carry_read":
        report = {"scored": score({"keyring_carry_read": (CARRY_READ, settings["carry"])}, config)}
    elif phase == "hold":
        holder = HOLDER.format(children=settings["max_processes"] - 1, name=settings["holder_name"])
        long_wall = sandbox_config(mode, dict(settings, wall_s=settings["hold_s"]))
        report = {"scored": score({"hold": (holder, "-")}, long_wall)}
    else:
        report = {"scored": score({"fork_children": CONTROLS["fork_children"]}, config)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
