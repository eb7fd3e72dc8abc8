"""The reward sandbox against hostile programs: each must fail with the right reason.

The programs run as a test-only uid so that "nothing is left running" can be
checked exactly by scanning /proc for that uid.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_ernie.config.rl import SandboxConfig
from megatron_ernie.rl.reward.sandbox import run_python

TEST_UID = 61_234
LIMITS = SandboxConfig(wall_s=5, cpu_s=1, memory_mb=200, max_processes=12, max_file_bytes=1 << 16,
                       max_output_bytes=1 << 12, scratch_mb=1, uid=TEST_UID, gid=TEST_UID)
SHORT_WALL = replace(LIMITS, wall_s=1)  # for programs that run until the wall clock stops them
REPO = Path(__file__).resolve().parents[1]


def processes_of_uid(uid: int, settle_s: float = 2.0) -> list[int]:
    """Processes owned by `uid`, polled for up to settle_s while any remain (the kernel reaps asynchronously)."""
    deadline = time.monotonic() + settle_s
    while (pids := _scan_uid(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def _scan_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                pass
    return pids


@pytest.fixture(scope="module")
def isolation() -> str:
    return run_python("print(1)", config=LIMITS).isolation


@pytest.fixture()
def namespaces(isolation):
    if isolation != "namespaces":
        pytest.skip("namespaces unavailable here (needs root/CAP_SYS_ADMIN); the rlimits mode is tested below")


def _boot_module():
    import importlib.util

    path = REPO / "megatron_ernie" / "rl" / "reward" / "sandbox_boot.py"
    spec = importlib.util.spec_from_file_location("sandbox_boot_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child_that_execs_after(setup_s: float, program: list[str]) -> tuple[int, int]:
    """A child that 'builds its jail' for setup_s, reports, then execs program; (pid, report fd)."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_r)
            time.sleep(setup_s)
            os.write(report_w, b"layers: seccomp\n")
            os.execv(program[0], program)
        finally:
            os._exit(127)
    os.close(report_w)
    return pid, report_r


def test_the_wall_clock_starts_at_the_programs_exec_not_while_the_jail_is_built():
    """A slow jail set-up (the kernel's mounts and namespaces on a busy host) must not use up the
    program's wall-clock limit: 0.6 s of set-up, then a 0.2 s program, under a 0.5 s limit."""
    boot = _boot_module()
    pid, report_r = _child_that_execs_after(0.6, [shutil.which("sleep"), "0.2"])
    report, started = boot.await_exec(report_r, limit_s=5.0)
    outcome = boot.wait_with_deadline(pid, 0.5)
    assert started and boot._parse_report(report) == (["seccomp"], "")
    assert not outcome["timed_out"] and outcome["exit_code"] == 0
    pid, report_r = _child_that_execs_after(3.0, [shutil.which("true")])
    report, started = boot.await_exec(report_r, limit_s=0.3)  # the set-up has its own bound
    assert not started and report == ""
    assert boot.wait_with_deadline(pid, 0.0)["signal"] == 9


def test_correct_program_scores_ok_and_sees_clean_environment(namespaces):
    code = "import os, sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\nprint(sorted(os.environ))"
    result = run_python(code, stdin="19 23\n", config=LIMITS)
    assert result.status == "ok", result
    assert result.stdout.splitlines() == ["42", "['HOME', 'LANG', 'LC_ALL', 'PATH']"]
    assert result.exit_code == 0 and result.isolation == "namespaces"
    assert 0 < result.wall_s < 5


def test_infinite_loop_times_out_on_cpu(namespaces):
    started = time.monotonic()
    # a generous wall clock, so the CPU limit is what stops it even on a loaded machine
    result = run_python("while True:\n    pass", config=replace(LIMITS, wall_s=30))
    assert result.status == "timeout" and "CPU-time" in result.detail, result
    assert result.cpu_s >= 0.9
    assert time.monotonic() - started < 32


def test_sleeping_program_times_out_on_wall_clock(namespaces):
    result = run_python("import time\ntime.sleep(30)", config=SHORT_WALL)
    assert result.status == "timeout" and "wall-clock limit of 1s" in result.detail
    assert result.wall_s < 2


def test_memory_bomb_hits_memory_limit(namespaces):
    result = run_python("chunks = []\nwhile True:\n    chunks.append(b'x' * (32 << 20))", config=LIMITS)
    assert result.status == "memory", result
    assert "MemoryError" in result.detail
    one_shot = run_python("table = [0] * (1 << 30)", config=LIMITS)  # 8 GiB at once
    assert one_shot.status == "memory", one_shot


def test_fork_bomb_is_contained_and_fully_killed(namespaces):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_python(code, config=SHORT_WALL)
    assert result.status in ("timeout", "process_limit"), result
    assert processes_of_uid(TEST_UID) == []


def test_fork_bomb_that_gives_up_reports_process_limit(namespaces):
    result = run_python("import os\nwhile True:\n    os.fork()", config=LIMITS)
    assert result.status == "process_limit", result
    assert processes_of_uid(TEST_UID) == []


def test_writes_outside_scratch_fail_and_leave_no_file(namespaces, tmp_path):
    outside = [f"/tmp/ernie-sandbox-escape-{os.getpid()}", str(REPO / f"escape-{os.getpid()}.txt"),
               str(tmp_path / "escape.txt")]
    for target in outside:
        result = run_python(f"open({target!r}, 'w').write('pwned')", config=LIMITS)
        assert result.status == "crash", (target, result)
        assert "Read-only file system" in result.detail or "No such file" in result.detail
        assert not os.path.exists(target)
    inside = run_python("open('note.txt', 'w').write('ok')\nprint(open('note.txt').read())", config=LIMITS)
    assert inside.status == "ok" and inside.stdout == "ok\n"


def test_job_files_are_invisible(namespaces):
    result = run_python(f"print(open({str(REPO / 'pyproject.toml')!r}).read())", config=LIMITS)
    assert result.status == "crash" and "No such file" in result.detail
    assert "megatron" not in result.stdout


def test_network_connection_never_reaches_a_listener(namespaces):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')"
        result = run_python(code, config=LIMITS)
        assert result.status == "crash" and "Network is unreachable" in result.detail, result
        with pytest.raises(socket.timeout):
            listener.accept()
        with socket.create_connection(("127.0.0.1", port)):  # positive control: the listener does work
            conn, _ = listener.accept()
            conn.close()


def test_parent_environment_is_invisible(namespaces, monkeypatch):
    secret = "s3cr3t-token-4711"
    monkeypatch.setenv("ERNIE_TEST_SECRET", secret)
    code = (f"import os\nprint(os.environ.get('ERNIE_TEST_SECRET'))\n"
            f"print(open('/proc/{os.getpid()}/environ').read())")
    result = run_python(code, config=LIMITS)
    assert result.status == "crash" and "No such file" in result.detail
    assert result.stdout == "None\n"
    assert secret not in result.stdout + result.stderr


def test_output_flood_hits_output_limit(namespaces):
    result = run_python("while True:\n    print('x' * 1000)", config=LIMITS)
    assert result.status == "output_limit", result
    assert len(result.stdout) == LIMITS.max_output_bytes


def test_scratch_disk_is_capped(namespaces):
    code = "for i in range(100):\n    open(f'f{i}', 'wb').write(bytes(60000))"
    result = run_python(code, config=LIMITS)
    assert result.status == "output_limit" and "No space left" in result.stderr


def test_crash_is_reported_with_last_traceback_line(namespaces):
    result = run_python("raise ValueError('bad answer')", config=LIMITS)
    assert result.status == "crash"
    assert result.detail == "exit code 1: ValueError: bad answer"


@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="needs a system /usr/bin/python3")
def test_rlimits_fallback_blocks_sockets_and_kills_leftovers():
    weak = replace(SHORT_WALL, isolation="rlimits", accept_weak_isolation=True, python="/usr/bin/python3")
    ok = run_python("print(6 * 7)", config=weak)
    assert (ok.status, ok.stdout, ok.isolation) == ("ok", "42\n", "rlimits")
    net = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))", config=weak)
    assert net.status == "crash" and "network access is disabled" in net.detail
    bomb = run_python("import os\nwhile True:\n    try:\n        os.fork() or os.setsid()\n    except OSError:\n"
                      "        pass", config=weak)
    assert bomb.status in ("timeout", "process_limit")
    assert processes_of_uid(TEST_UID) == []


def test_unrunnable_interpreter_is_a_sandbox_error_not_an_exception():
    result = run_python("print(1)", config=replace(LIMITS, python="/nonexistent/python"))
    assert result.status == "sandbox_error"
    assert "nonexistent" in result.detail


NON_ROOT_UID = 61_299
NON_ROOT_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from megatron_ernie.config.rl import SandboxConfig
from megatron_ernie.rl.reward.sandbox import run_python
cfg = SandboxConfig(wall_s=1.5, cpu_s=1, memory_mb=200, max_processes=8, scratch_mb=1)
programs = {"ok": "print(6 * 7)", "net": "import socket; socket.create_connection(('127.0.0.1', 9))",
            "write": f"open({sys.argv[2]!r}, 'w')",
            "bomb": "import os\\nwhile True: os.fork()"}
print(json.dumps({k: [r.status, r.isolation, r.stdout, r.detail]
                  for k, r in ((k, run_python(c, config=cfg)) for k, c in programs.items())}))
"""


def run_as_non_root(*args: str) -> subprocess.CompletedProcess:
    cmd = ["setpriv", f"--reuid={NON_ROOT_UID}", f"--regid={NON_ROOT_UID}", "--clear-groups",
           "/usr/bin/python3", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})


def readable_copy_of_package() -> Path:
    """The package source in a world-readable temporary folder: a clean clone may sit in a 0700 folder."""
    root = Path(tempfile.mkdtemp(prefix="ernie-nonroot-src-"))
    shutil.copytree(REPO / "megatron_ernie", root / "megatron_ernie", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def test_ordinary_user_gets_namespaces_through_a_user_namespace():
    """What a Slurm job (not root) gets: the same jail via an unprivileged user namespace."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs root (to become another user), setpriv and /usr/bin/python3")
    source = readable_copy_of_package()
    probe = run_as_non_root("-c", f"import sys; sys.path.insert(0, {str(source)!r}); "
                                  "import megatron_ernie.rl.reward.sandbox")
    userns = subprocess.run(["setpriv", f"--reuid={NON_ROOT_UID}", f"--regid={NON_ROOT_UID}", "--clear-groups",
                             "unshare", "--user", "--net", "true"], capture_output=True)
    if userns.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are disabled here: {userns.stderr.decode()[-200:]}")
    assert probe.returncode == 0, probe.stderr[-2000:]
    target = f"/tmp/ernie-nonroot-escape-{os.getpid()}"
    out = run_as_non_root("-c", NON_ROOT_SCRIPT, str(source), target)
    shutil.rmtree(source, ignore_errors=True)
    results = json.loads(out.stdout)
    assert results["ok"][:3] == ["ok", "namespaces", "42\n"], results
    assert results["net"][0] == "crash" and "Network is unreachable" in results["net"][3]
    assert results["write"][0] == "crash" and not os.path.exists(target)
    assert results["bomb"][0] == "process_limit"
