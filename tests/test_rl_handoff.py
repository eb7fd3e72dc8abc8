"""Hand-off time per step (rl/handoff.py): the part of a step that is neither training nor generation."""

import pytest

from megatron_ernie.rl.handoff import HandoffClock


def test_synchronous_handoff_is_the_period_less_training_and_the_slowest_worker():
    clock = HandoffClock(overlapped=False)
    assert clock.step(0.3, now=10.0) == {}  # the first step has no previous one to measure from
    clock.generated(0, 0.2)
    clock.generated(0, 0.1)  # worker 0 generated twice: 0.3 s in all
    clock.generated(1, 0.25)
    out = clock.step(0.4, now=11.0)
    assert out["handoff/generation_s"] == pytest.approx(0.3)
    assert out["handoff/seconds"] == pytest.approx(1.0 - 0.4 - 0.3)
    assert out["handoff/fraction"] == pytest.approx(0.3 / 1.0)
    assert out["handoff/step_period_s"] == pytest.approx(1.0)
    nothing_generated = clock.step(0.2, now=11.5)  # engine seconds were consumed by the previous step
    assert nothing_generated["handoff/generation_s"] == 0.0 and nothing_generated["handoff/seconds"] == pytest.approx(0.3)


def test_overlapped_handoff_counts_only_the_longer_of_training_and_generation():
    clock = HandoffClock(overlapped=True)
    clock.step(0.0, now=0.0)
    clock.generated(0, 0.5)
    out = clock.step(0.4, now=0.6)
    assert out["handoff/seconds"] == pytest.approx(0.1)
    clock.generated(0, 0.9)
    assert clock.step(0.4, now=1.2)["handoff/seconds"] == 0.0  # clipped: never negative


# ------------------------------------------------------------ message latency
def _tcp_pair():
    import threading

    from megatron_ernie.rl.control import Hello, LockedChannel, connect, listen

    listener = listen(0, b"k" * 32)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(LockedChannel(listener.accept())))
    thread.start()
    client = connect(listener.address, b"k" * 32, Hello("rollout", 0, 1))
    thread.join(10)
    listener.close()
    server = accepted[0]
    assert isinstance(server.recv(), Hello)
    return server, client


def _nodelay(channel) -> int:
    import os
    import socket

    sock = socket.socket(fileno=os.dup(channel.connection.fileno()))
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_control_connections_send_small_messages_without_nagle_delay():
    """Both ends of a control connection have TCP_NODELAY: a burst of small messages is not held
    back waiting for delayed ACKs (it split the first rollout batch of every run)."""
    server, client = _tcp_pair()
    try:
        assert _nodelay(server) == 1 and _nodelay(client) == 1
    finally:
        server.connection.close()
        client.connection.close()


class _CountingEngine:
    policy_version = 0

    def __init__(self):
        self.batches = []

    def generate(self, prompts, params):
        from megatron_ernie.rl.rollout.engine import Generation
        import numpy as np

        self.batches.append(len(prompts))
        return [Generation(np.array([5], np.int32), np.zeros(1, np.float32), None, "length") for _ in prompts]


def _run_worker_on_a_burst(wait_s: float, gap_s: float, prompts: int = 6) -> list[int]:
    """Send `prompts` one message at a time, gap_s apart, then stop; return the worker's batch sizes."""
    import threading
    import time

    import numpy as np

    from megatron_ernie.config.rl import SamplingConfig
    from megatron_ernie.rl.protocol import PromptRequest, Shutdown
    from megatron_ernie.rl.rollout.worker import RolloutWorker
    from megatron_ernie.rl.system import SystemConfig
    from megatron_ernie.rl.transport import pipe_pair

    class Tok:
        eod_id = 0

        def decode(self, ids):
            return "x" * len(ids)

    ours, theirs = pipe_pair()
    engine = _CountingEngine()
    system = SystemConfig(rollout_batch_prompts=prompts, rollout_batch_wait_s=wait_s)
    worker = RolloutWorker(engine, Tok(), SamplingConfig(), system, theirs)
    thread = threading.Thread(target=worker.run)
    thread.start()
    for i in range(prompts):
        ours.send(PromptRequest(f"{i}:t", "t", np.array([3, 4], np.int32), 2))
        time.sleep(gap_s)
    time.sleep(0.2)
    ours.send(Shutdown("done"))
    thread.join(10)
    sent = []
    while ours.poll(0):
        sent.append(ours.recv())
    return engine.batches, sent


def test_rollout_worker_gathers_a_burst_of_prompts_into_one_batch():
    """Prompts arrive one message at a time; the worker waits up to rollout_batch_wait_s between
    them for a full batch, and generates at once with the wait at 0."""
    batches, sent = _run_worker_on_a_burst(wait_s=0.5, gap_s=0.01)
    assert batches == [12]  # 6 prompts x 2 samples, one batch
    assert [type(m).__name__ for m in sent] == ["SampleBatch", "RolloutStats"]  # its samples in one message
    assert len(sent[0].samples) == 12 and sent[1].samples == 12
    assert len(_run_worker_on_a_burst(wait_s=0.0, gap_s=0.05)[0]) > 1


def test_rollout_batch_wait_is_validated():
    from megatron_ernie.config.errors import ConfigError
    from megatron_ernie.rl.system import SystemConfig

    with pytest.raises(ConfigError, match=r"rl.system.rollout_batch_wait_s.*-0.1"):
        SystemConfig(rollout_batch_wait_s=-0.1).validate("rl.system")


def _write_trace(directory, name: str, lines: list[tuple]) -> None:
    (directory / f"{name}-1.tsv").write_text("".join("\t".join(map(str, line)) + "\n" for line in lines))


def test_step_timeline_lays_the_roles_lines_on_one_clock_and_takes_medians_over_steps(tmp_path):
    """Three steps of 1.0 s; the controller's TrainBatch leaves at 0.50, 0.60, 0.55 s into them."""
    from megatron_ernie.rl import trace

    _write_trace(tmp_path, "trainer0", [(t, "send", "WeightsReady", "controller", 10) for t in (0.0, 1.0, 2.0, 3.0)]
                 + [(t + 0.52, "recv", "TrainBatch", "controller", 999) for t in (0.0, 1.0, 2.0)])
    _write_trace(tmp_path, "controller0", [(0.5, "send", "TrainBatch", "trainer0", 999),
                                           (1.6, "send", "TrainBatch", "trainer0", 999),
                                           (2.55, "send", "TrainBatch", "trainer0", 999),
                                           (1.1, "send", "PromptRequest", "rollout0", 5),
                                           (1.2, "send", "PromptRequest", "rollout0", 5)])
    with open(tmp_path / "controller0-1.tsv", "a") as f:
        f.write("3.5\tsend\tTrain")  # a killed process's last line, cut short: skipped
    timeline = trace.step_timeline(trace.load(str(tmp_path)), skip_steps=0)
    assert timeline[0] == {"step_s": pytest.approx(1.0), "steps": 3}
    rows = {(r["role"], r["type"], r["which"]): r for r in timeline[1:]}
    assert rows[("trainer0", "WeightsReady", "first")]["offset_s"] == 0.0
    assert rows[("controller0", "TrainBatch", "first")]["offset_s"] == pytest.approx(0.55)
    assert rows[("trainer0", "TrainBatch", "first")]["offset_s"] == pytest.approx(0.52)
    # seen in one step of three: below half, left out (first and last alike)
    assert ("controller0", "PromptRequest", "first") not in rows and ("controller0", "PromptRequest", "last") not in rows
    assert [r["offset_s"] for r in timeline[1:]] == sorted(r["offset_s"] for r in timeline[1:])
    assert "TrainBatch (first)" in trace.format_timeline(timeline)
    assert trace.main([str(tmp_path), "--skip", "0"]) == 0


def test_an_unwritable_trace_directory_is_a_clear_error(tmp_path, monkeypatch):
    from megatron_ernie.config.errors import ConfigError
    from megatron_ernie.rl import trace

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(trace.TRACE_ENV, str(blocker / "trace"))
    with pytest.raises(ConfigError, match="ERNIE_RL_TRACE"):
        trace.MessageTrace.from_env("rollout", 0)
    monkeypatch.delenv(trace.TRACE_ENV)
    assert trace.MessageTrace.from_env("rollout", 0) is None
