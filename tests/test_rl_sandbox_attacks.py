"""The reward sandbox attacked as a policy under RL pressure would, through the real reward worker.

Every cell of (root, ordinary user) x (default "auto" isolation = namespaces,
acknowledged weak "rlimits" mode) runs the hostile programs of
tests/sandbox_attacks.py in separate reward-worker processes and checks what
got out. An attack's expected output is its loot (the worker's keyring
secret, the auth key, the hidden tests), so reward 1.0 would mean the policy
was paid for escaping; every attack must score 0 with status "wrong" (it ran
to its end and found nothing), and the controls must keep working.

The ordinary-user cells need root (to become that user) and, for the
namespaces mode, unprivileged user namespaces; they skip with the reason
otherwise. x86_64 only (the programs use raw syscall numbers).
"""

import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.rl import SandboxConfig

sys.path.insert(0, str(Path(__file__).parent))
import sandbox_attacks  # noqa: E402 - the driver, also run as a script

REPO = Path(__file__).resolve().parents[1]
NON_ROOT_UID = 61_297
AUTHKEY = "5e" * 16
# Fresh loot every session: a key left on this host by an earlier (older, weaker) run must not count.
SETTINGS = dict(memory_mb=128, max_processes=6, uid=61_700, worker_secret=f"worker-secret-{secrets.token_hex(6)}",
                carry=f"carry-over-{secrets.token_hex(6)}", host_secret=f"host-hidden-tests-{secrets.token_hex(6)}",
                hold_s=120)  # the holder keeps its quota until killed; B must start within this on a loaded host
CELLS = [(user, mode) for user in ("root", "non-root") for mode in ("strong", "weak")]
# Controls a legitimate program keeps, per cell; a missing one says which layer takes it away.
CONTROLS_KEPT = {
    ("root", "strong"): {"hello", "fork_children", "own_session_keyring", "small_sysv_shm"},
    # the IPC namespace's sysctls need uid 0 mapped in the user namespace: SysV IPC is refused instead;
    # the program has the job user's kernel uid, which keys trust: keyrings are refused too
    ("non-root", "strong"): {"hello", "fork_children"},
    # weak mode: no private IPC namespace or keyrings to give, so seccomp refuses both
    ("root", "weak"): {"hello", "fork_children"},
    ("non-root", "weak"): {"hello", "fork_children"},
}

def keyrings_refused() -> str:
    """Empty where this process may use kernel keyrings, else the errno name (a container may forbid them)."""
    probe = ("import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             "ok = libc.syscall(ctypes.c_long(250), ctypes.c_long(1), None) >= 0\n"  # join a fresh session keyring
             "print('' if ok else errno.errorcode[ctypes.get_errno()])")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()


KEYRINGS_REFUSED = keyrings_refused() if platform.machine() == "x86_64" else "not x86_64"
if KEYRINGS_REFUSED:  # nothing to isolate there: the sandbox treats keyrings as absent, as the program finds them
    for kept in CONTROLS_KEPT.values():
        kept.discard("own_session_keyring")

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or os.geteuid() != 0,
                                reason="attack programs use x86_64 syscall numbers; the cells need root")


@pytest.fixture(scope="module")
def readable_source() -> Path:
    """Package and driver in a world-readable folder (a clone may sit in a 0700 one, like /root)."""
    root = Path(tempfile.mkdtemp(prefix="ernie-attack-src-"))
    shutil.copytree(REPO / "megatron_ernie", root / "megatron_ernie", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(sandbox_attacks.__file__), root / "sandbox_attacks.py")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _skip_unless_cell_possible(user: str, mode: str) -> None:
    if user == "root":
        return
    if not (shutil.which("setpriv") and shutil.which("unshare") and os.access("/usr/bin/python3", os.X_OK)):
        pytest.skip("the ordinary-user cells need setpriv, unshare and /usr/bin/python3")
    if mode == "strong":
        probe = subprocess.run(["setpriv", f"--reuid={NON_ROOT_UID}", f"--regid={NON_ROOT_UID}", "--clear-groups",
                                "unshare", "--user", "--net", "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"unprivileged user namespaces are disabled here: {probe.stderr.strip()[-200:]}")


def driver_command(user: str, mode: str, phase: str, settings: dict, source: Path) -> list[str]:
    """The reward worker as root, or as NON_ROOT_UID running this interpreter through a private bind mount
    (its prefix may sit below a folder only root can enter)."""
    settings = dict(settings, python="" if (user, mode) == ("root", "strong") else "/usr/bin/python3")
    args = [str(source / "sandbox_attacks.py"), str(source), mode, phase, json.dumps(settings)]
    env = ["env", "-i", "PATH=/usr/bin:/bin", f"ERNIE_RL_AUTHKEY={AUTHKEY}"]
    if user == "root":
        return env + [sys.executable, *args]
    prefix = os.path.realpath(sys.prefix)
    python = "/mnt/ernie-py/" + os.path.relpath(os.path.realpath(sys.executable), prefix)
    script = (f"mount -t tmpfs tmpfs /mnt && mkdir /mnt/ernie-py && mount --bind {prefix} /mnt/ernie-py && "
              f"exec setpriv --reuid={NON_ROOT_UID} --regid={NON_ROOT_UID} --clear-groups \"$@\"")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *env,
            "LD_LIBRARY_PATH=/mnt/ernie-py/lib", python, *args]


def run_driver(user: str, mode: str, phase: str, settings: dict, source: Path) -> dict:
    out = subprocess.run(driver_command(user, mode, phase, settings, source), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def cell_settings(user: str, mode: str, name: str) -> dict:
    """Distinct uids and keyring names per cell, so cells cannot see each other's leftovers."""
    index = CELLS.index((user, mode))
    return dict(SETTINGS, uid=SETTINGS["uid"] + 32 * index, keyring=f"ernie-{name}-{os.getpid()}-{index}")


@pytest.mark.parametrize("user,mode", CELLS)
def test_every_attack_is_contained_through_the_reward_worker(user, mode, readable_source):
    _skip_unless_cell_possible(user, mode)
    report = run_driver(user, mode, "attacks", cell_settings(user, mode, "attacks"), readable_source)
    scored = report["scored"]
    assert report["uid"] == (0 if user == "root" else NON_ROOT_UID)
    escaped = {name: scored[name] for name in sandbox_attacks.ATTACKS if scored[name][:2] != [0.0, "wrong"]}
    assert escaped == {}, f"{user}/{mode}: not contained (or did not run to its end): {escaped}"
    assert report["daemons_left"] == 0, f"{user}/{mode}: a daemon outlived its run"
    assert report["sysv_left"] == [], f"{user}/{mode}: SysV IPC objects left on the host"
    assert report["listeners_reached"] == [], f"{user}/{mode}: the worker's loopback listeners were reached"
    kept = {name for name in sandbox_attacks.CONTROLS if scored[name][:2] == [1.0, "ok"]}
    assert kept == CONTROLS_KEPT[(user, mode)], {name: scored[name] for name in sandbox_attacks.CONTROLS}


@pytest.mark.parametrize("user,mode", CELLS)
def test_keys_stored_by_one_worker_are_not_read_by_a_later_one(user, mode, readable_source):
    """Two worker processes one after the other, under one launcher session keyring; the first run stores
    a key in every keyring it reaches (and tries to lock the uid's user keyring against clearing)."""
    _skip_unless_cell_possible(user, mode)
    if KEYRINGS_REFUSED:
        pytest.skip(f"kernel keyrings are refused to this process tree here ({KEYRINGS_REFUSED}): no key can be "
                    "stored, so there is nothing to carry between runs")
    scored = run_driver(user, mode, "carry", cell_settings(user, mode, "carry"), readable_source)["scored"]
    assert scored["keyring_carry_store"][1] == "wrong", scored  # it ran to its end
    assert scored["keyring_carry_read"][:2] == [0.0, "wrong"], scored


def _holders(settings: dict) -> list[int]:
    return sandbox_attacks.processes_named(settings["holder_name"])


@pytest.mark.parametrize("user,mode", CELLS)
def test_process_quota_held_in_one_worker_does_not_fail_another(user, mode, readable_source):
    """Worker A's program holds max_processes processes; a correct forking program in worker B still passes."""
    _skip_unless_cell_possible(user, mode)
    settings = dict(cell_settings(user, mode, "quota"), holder_name=f"ernie-hold-{CELLS.index((user, mode))}")
    holder = subprocess.Popen(driver_command(user, mode, "hold", settings, readable_source),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(_holders(settings)) < settings["max_processes"] and time.monotonic() < deadline:
            assert holder.poll() is None, holder.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        assert len(_holders(settings)) >= settings["max_processes"], "the holder never took its quota"
        scored = run_driver(user, mode, "fork_ok", settings, readable_source)["scored"]
        assert len(_holders(settings)) >= settings["max_processes"], ("the quota was released before worker B ran",
                                                              holder.poll() is not None and holder.communicate())
        assert scored["fork_children"][:2] == [1.0, "ok"], scored
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        for pid in _holders(settings):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # ended on its own meanwhile


NO_NAMESPACES = """
import json, sys
sys.path.insert(0, sys.argv[1])
from dataclasses import replace
from megatron_ernie.config.rl import SandboxConfig
from megatron_ernie.rl.reward import sandbox_confine as confine
from megatron_ernie.rl.reward.sandbox import run_python
import sandbox_attacks
# A host where namespaces cannot be created: unshare(2) fails with EPERM for this process and its children.
confine.SYSCALLS["x86_64"]["unshare"] = 272
assert confine.install_seccomp(("unshare",))
auto = SandboxConfig(wall_s=4, cpu_s=1, memory_mb=128, uid=61_900, gid=61_900)
weak = replace(auto, isolation="rlimits", accept_weak_isolation=True, python="/usr/bin/python3")
direct = run_python("open('/tmp/ernie-auto-ran', 'w'); print('ran')", config=auto)
worker = sandbox_attacks.score({"hello": ("print(6 * 7)", "42")}, auto)["hello"]
chosen = run_python("print(6 * 7)", config=weak)
print(json.dumps({"direct": [direct.status, direct.stdout, direct.detail, direct.isolation],
                  "worker": worker, "weak": [chosen.status, chosen.stdout, chosen.isolation]}))
"""


def test_auto_refuses_to_run_code_without_namespaces(readable_source):
    """No silent fallback: the error names what is missing and the explicit opt-in; the weak mode runs only
    when chosen and acknowledged."""
    marker = Path("/tmp/ernie-auto-ran")
    marker.unlink(missing_ok=True)
    out = subprocess.run([sys.executable, "-c", NO_NAMESPACES, str(readable_source)], capture_output=True,
                         text=True, timeout=120, cwd=readable_source)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    status, stdout, detail, isolation = report["direct"]
    assert (status, stdout, isolation) == ("sandbox_error", "", "auto"), report
    for needed in ("namespaces unavailable", "EPERM", "isolation = 'rlimits'", "accept_weak_isolation = true",
                   "unprivileged user namespaces"):
        assert needed in detail, (needed, detail)
    assert not marker.exists()
    assert report["worker"][:2] == [0.0, "sandbox_error"] and "namespaces unavailable" in report["worker"][2]
    assert report["weak"] == ["ok", "42\n", "rlimits"]


def test_weak_mode_needs_the_acknowledgement():
    with pytest.raises(ConfigError) as err:
        SandboxConfig(isolation="rlimits").validate("rl.sandbox")
    assert "rl.sandbox.accept_weak_isolation = False" in str(err.value)
    assert "accept_weak_isolation = true" in str(err.value)
    SandboxConfig(isolation="rlimits", accept_weak_isolation=True).validate("rl.sandbox")
    with pytest.raises(ConfigError, match="rl.sandbox.uid_count = 0"):
        SandboxConfig(uid_count=0).validate("rl.sandbox")


def test_seccomp_program_denies_exactly_the_listed_syscalls():
    """The filter, run by the kernel's classic-BPF rules in a child: denied -> EPERM, the rest untouched."""
    code = """
import ctypes, os, sys
sys.path.insert(0, sys.argv[1])
from megatron_ernie.rl.reward import sandbox_confine as confine
libc = ctypes.CDLL(None, use_errno=True)
assert confine.install_seccomp(("shmget",), ("socket", "allow_only", (1,)))
results = {}
for name, call in (("shmget", lambda: libc.shmget(0, 4096, 0o1600)), ("msgget", lambda: libc.msgget(0, 0o1600)),
                   ("socket_inet", lambda: libc.socket(2, 1, 0)), ("socket_unix", lambda: libc.socket(1, 1, 0)),
                   ("getpid", lambda: libc.getpid())):
    ret = call()
    results[name] = "EPERM" if ret < 0 and ctypes.get_errno() == 1 else "allowed"
print(results)
"""
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str({"shmget": "EPERM", "msgget": "allowed", "socket_inet": "EPERM",
                                      "socket_unix": "allowed", "getpid": "allowed"})


def test_uid_lease_skips_uids_in_use_and_is_released():
    from megatron_ernie.rl.reward.sandbox import _leased_uid

    config = SandboxConfig(uid=62_000, gid=62_000, uid_count=3)
    with _leased_uid(config) as first, _leased_uid(config) as second, _leased_uid(config) as third:
        assert [first.uid, second.uid, third.uid] == [62_000, 62_001, 62_002]
        assert [first.gid, second.gid, third.gid] == [62_000, 62_001, 62_002]
        with _leased_uid(config) as fourth:
            assert fourth is None
    with _leased_uid(replace(config, uid_count=1)) as again:
        assert again.uid == 62_000


NO_LANDLOCK = """
import json, sys
sys.path.insert(0, sys.argv[1])
from megatron_ernie.config.rl import SandboxConfig
from megatron_ernie.rl.reward import sandbox_confine as confine
from megatron_ernie.rl.reward.sandbox import run_python
assert confine.install_seccomp(("landlock_create_ruleset",))  # a kernel without Landlock, for this process tree
weak = SandboxConfig(wall_s=4, cpu_s=1, memory_mb=128, isolation="rlimits", accept_weak_isolation=True,
                     python="/usr/bin/python3")
result = run_python("print('ran')", config=weak)
print(json.dumps([result.status, result.stdout, result.detail]))
"""


def test_weak_mode_as_ordinary_user_refuses_without_landlock(readable_source):
    """Without Landlock the program would run as the job's own user, next to its files and processes."""
    _skip_unless_cell_possible("non-root", "weak")
    out = subprocess.run(["setpriv", f"--reuid={NON_ROOT_UID}", f"--regid={NON_ROOT_UID}", "--clear-groups",
                          "/usr/bin/python3", "-c", NO_LANDLOCK, str(readable_source)],
                         capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    status, stdout, detail = json.loads(out.stdout)
    assert (status, stdout) == ("sandbox_error", ""), detail
    assert "needs Landlock" in detail and "auth key" in detail


LOCK_MY_USER_KEYRING = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
keyctl = lambda *a: libc.syscall(ctypes.c_long(250), *(ctypes.c_long(x) for x in a))
keyctl(1, 0)                      # a session keyring of our own
keyctl(5, -4, 0x0b0b0000)         # user keyring: view/read/search only, so no one can clear it any more
print(keyctl(7, -4), ctypes.get_errno())
"""


def test_uid_whose_keyring_an_earlier_program_locked_is_skipped(caplog):
    """Where a program (before the seccomp filter, or on a kernel without it) took its uid's write
    permission away, that keyring cannot be emptied until reboot: the run moves to the next uid."""
    from megatron_ernie.rl.reward.sandbox import run_python

    if not os.access("/usr/bin/python3", os.X_OK) or not shutil.which("setpriv"):
        pytest.skip("needs setpriv and /usr/bin/python3 to act as the earlier program")
    if KEYRINGS_REFUSED:
        pytest.skip(f"kernel keyrings are refused here ({KEYRINGS_REFUSED}): no keyring to lock")
    locked_uid = 62_150
    lock = subprocess.run(["setpriv", f"--reuid={locked_uid}", f"--regid={locked_uid}", "--clear-groups",
                           "/usr/bin/python3", "-c", LOCK_MY_USER_KEYRING], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert lock.stdout.split() == ["-1", "13"], lock  # clearing is refused (EACCES): the keyring is locked
    config = SandboxConfig(wall_s=4, cpu_s=1, memory_mb=128, uid=locked_uid, gid=locked_uid, uid_count=2)
    result = run_python("import os\nprint(os.getuid(), os.getgid())", config=config)
    assert (result.status, result.stdout) == ("ok", f"{locked_uid + 1} {locked_uid + 1}\n"), result
    assert f"skipping uid {locked_uid} until reboot" in caplog.text
