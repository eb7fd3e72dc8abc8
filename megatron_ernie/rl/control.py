"""The control plane: messages beyond protocol.py and the connections that carry them.

Carrier, chosen deliberately: `multiprocessing.connection` (Listener/Client)
wrapped in transport.PipeChannel, i.e. one authenticated byte stream (a TCP
socket; a Unix pipe would do on one node) between the controller and each
role process. Why not the alternatives:
  * MPI (mpi4py): a role that dies takes MPI_COMM_WORLD down with it (the
    default error handler aborts every rank; ULFM is not portable), and the
    controller must notice a dead rollout worker and carry on. MPI also needs a
    working MPI runtime on every node, which a CPU reward pool may lack.
  * torch.distributed (gloo): the same failure coupling (a dead peer leaves
    collectives and any-source receives hanging until the timeout), no way to
    wait on "whichever peer speaks first" with a timeout, and it would tie the
    controller and reward workers to torch.
  * per-peer sockets: a dead process closes its socket, so the controller sees
    EOF at once; `connection.wait` multiplexes all peers with a timeout (the
    heartbeat clock); peers connect and reconnect in any order; it works the
    same on one node and across Slurm het groups; send_bytes/recv_bytes never
    pickle, and the HMAC handshake (authkey) keeps stray connections out.
Bulk weights do not use this plane: they go over a torch.distributed gloo (or
NCCL) group, see weight_sync.py.

Topology is a star: every message goes through the controller, which keeps
all state that must survive a role's death (in-flight prompts, partial
groups, the policy version).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener

from megatron_ernie.rl.protocol import Message, ScoredSample, Shutdown, WeightsReady, _check, _scalar, decode
from megatron_ernie.rl.trace import MessageTrace
from megatron_ernie.rl.transport import PipeChannel

ROLES = ("controller", "trainer", "rollout", "reward", "teacher", "judge")
ADDRESS_ENV, AUTHKEY_ENV, RANK_ENV = "ERNIE_RL_CONTROLLER", "ERNIE_RL_AUTHKEY", "ERNIE_RL_RANK"


# ------------------------------------------------------------------ messages
@dataclass(frozen=True, eq=False)
class Hello(Message):
    """Role -> controller, first message on a connection."""

    role: str
    rank: int
    pid: int
    host: str = ""

    def __post_init__(self):
        _check(self.role in ROLES, "Hello", "role", self.role, f"one of {ROLES}")
        _scalar("Hello", "rank", self.rank, int, 0)
        _scalar("Hello", "pid", self.pid, int, 0)
        _scalar("Hello", "host", self.host, str)


@dataclass(frozen=True, eq=False)
class Start(Message):
    """Controller -> trainer: load checkpoint `resume_version` (-1: start fresh / from checkpoint.load)."""

    resume_version: int

    def __post_init__(self):
        _scalar("Start", "resume_version", self.resume_version, int, -1)


@dataclass(frozen=True, eq=False)
class TrainBatch(Message):
    """Controller -> trainer: whole GRPO groups (contiguous, group_size each) for one step."""

    step: int
    group_size: int
    samples: tuple[ScoredSample, ...]

    def __post_init__(self):
        _scalar("TrainBatch", "step", self.step, int, 0)
        _scalar("TrainBatch", "group_size", self.group_size, int, 1)
        object.__setattr__(self, "samples", tuple(self.samples))
        _check(bool(self.samples) and len(self.samples) % self.group_size == 0, "TrainBatch", "samples",
               len(self.samples), f"a non-empty multiple of group_size={self.group_size}")

    def groups(self) -> list[tuple[ScoredSample, ...]]:
        n = self.group_size
        return [self.samples[i:i + n] for i in range(0, len(self.samples), n)]


@dataclass(frozen=True, eq=False)
class StepDone(Message):
    """Trainer -> controller: policy `version` exists now; metrics as a JSON object."""

    version: int
    metrics_json: str
    step_s: float
    idle_s: float

    def __post_init__(self):
        _scalar("StepDone", "version", self.version, int, 1)
        _scalar("StepDone", "metrics_json", self.metrics_json, str)
        _scalar("StepDone", "step_s", self.step_s, float, 0)
        _scalar("StepDone", "idle_s", self.idle_s, float, 0)


@dataclass(frozen=True, eq=False)
class SyncPlan(Message):
    """Controller -> trainer rank 0 and rollouts: broadcast/receive `ready` on group `generation`.

    The group is a gloo group of `size` members rendezvousing in the
    controller's TCPStore at host:port; the trainer is rank 0 (the source).
    """

    generation: int
    host: str
    port: int
    rank: int
    size: int
    ready: WeightsReady

    def __post_init__(self):
        _scalar("SyncPlan", "generation", self.generation, int, 0)
        _scalar("SyncPlan", "host", self.host, str)
        _scalar("SyncPlan", "port", self.port, int, 1)
        _scalar("SyncPlan", "size", self.size, int, 1)
        _scalar("SyncPlan", "rank", self.rank, int, 0)
        _check(self.rank < self.size, "SyncPlan", "rank", self.rank, f"< size={self.size}")
        _check(isinstance(self.ready, WeightsReady), "SyncPlan", "ready", self.ready, "a WeightsReady")


@dataclass(frozen=True, eq=False)
class SyncDone(Message):
    """Trainer/rollout -> controller: a weight broadcast finished (ok) or failed (detail)."""

    version: int
    generation: int
    ok: bool
    nbytes: int = 0
    seconds: float = 0.0
    detail: str = ""

    def __post_init__(self):
        _scalar("SyncDone", "version", self.version, int, 0)
        _scalar("SyncDone", "generation", self.generation, int, 0)
        _scalar("SyncDone", "ok", self.ok, bool)
        _scalar("SyncDone", "nbytes", self.nbytes, int, 0)
        _scalar("SyncDone", "seconds", self.seconds, float, 0)
        _scalar("SyncDone", "detail", self.detail, str)


@dataclass(frozen=True, eq=False)
class RolloutStats(Message):
    """Rollout -> controller, after each generation batch."""

    version: int
    samples: int
    tokens: int
    seconds: float

    def __post_init__(self):
        _scalar("RolloutStats", "version", self.version, int, 0)
        for name in ("samples", "tokens"):
            _scalar("RolloutStats", name, getattr(self, name), int, 0)
        _scalar("RolloutStats", "seconds", self.seconds, float, 0)


@dataclass(frozen=True, eq=False)
class TeacherReady(Message):
    """Teacher -> controller: model loaded, serving `alias` from `checkpoint`; route samples to me now.

    tokenizer_sha256 is the content hash of the checkpoint's tokenizer, which
    the controller compares with the run's once more (the teacher already
    refused to start on a mismatch).
    """

    alias: str
    checkpoint: str
    tokenizer_sha256: str

    def __post_init__(self):
        for name in ("alias", "checkpoint", "tokenizer_sha256"):
            _scalar("TeacherReady", name, getattr(self, name), str)


@dataclass(frozen=True, eq=False)
class TeacherStats(Message):
    """Teacher -> controller, after each scoring batch: samples, response tokens, forward seconds."""

    alias: str
    samples: int
    tokens: int
    seconds: float

    def __post_init__(self):
        _scalar("TeacherStats", "alias", self.alias, str)
        for name in ("samples", "tokens"):
            _scalar("TeacherStats", name, getattr(self, name), int, 0)
        _scalar("TeacherStats", "seconds", self.seconds, float, 0)


@dataclass(frozen=True, eq=False)
class SaveCheckpoint(Message):
    """Controller -> trainer: save policy `version` now."""

    version: int

    def __post_init__(self):
        _scalar("SaveCheckpoint", "version", self.version, int, 0)


@dataclass(frozen=True, eq=False)
class Saved(Message):
    """Trainer -> controller: the checkpoint of `version` is committed at `path`."""

    version: int
    path: str

    def __post_init__(self):
        _scalar("Saved", "version", self.version, int, 0)
        _scalar("Saved", "path", self.path, str)


@dataclass(frozen=True, eq=False)
class Failure(Message):
    """Any role -> controller: an unrecoverable error, just before the process exits."""

    role: str
    detail: str

    def __post_init__(self):
        _scalar("Failure", "role", self.role, str)
        _scalar("Failure", "detail", self.detail, str)


# --------------------------------------------------------------- connections
class LockedChannel(PipeChannel):
    """A PipeChannel whose sends may come from two threads (the main loop and the heartbeat)."""

    def __init__(self, connection, trace: MessageTrace | None = None, peer: str = "controller"):
        super().__init__(connection)
        self._lock = threading.Lock()
        self.trace, self.peer = trace, peer  # rl/trace.py: off unless ERNIE_RL_TRACE is set
        send_small_messages_at_once(connection)

    def send(self, message: Message) -> None:
        """Traced at the moment the bytes leave (after encoding), recv at the moment they have arrived
        (before decoding): a hop's time on the trace is the carrier's plus the receiver's decode."""
        data = message.to_bytes()
        sent_at = time.monotonic()
        self.send_bytes(data)
        if self.trace is not None:
            self.trace.record(sent_at, "send", type(message).__name__, self.peer, len(data))

    def recv(self) -> Message:
        data = self.recv_bytes()
        arrived_at = time.monotonic()
        message = decode(data)
        if self.trace is not None:
            self.trace.record(arrived_at, "recv", type(message).__name__, self.peer, len(data))
        return message

    def send_bytes(self, data: bytes) -> None:
        with self._lock:
            super().send_bytes(data)


def send_small_messages_at_once(connection) -> None:
    """Turn off Nagle's algorithm on a TCP connection (TCP_NODELAY); other carriers are left alone.

    Why: the control plane sends bursts of small messages (a step's prompts, one
    per message). With Nagle on, the second small write waits for the peer to
    acknowledge the first, and the peer delays that ACK (up to ~40 ms on Linux):
    measured here, the rollout worker received the 2nd of 16 prompts sent within
    7 ms only 20 ms after the 1st, so it generated a batch of one prompt and then
    one of the rest. Every request/reply hop of a step paid such stalls.
    """
    try:
        sock = socket.socket(fileno=os.dup(connection.fileno()))
    except (OSError, AttributeError, ValueError):
        return
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.close()


def authkey_from_env(run_dir: str) -> bytes:
    """ERNIE_RL_AUTHKEY (hex, set by the local launcher), else derived from the Slurm job and run dir."""
    if os.environ.get(AUTHKEY_ENV):
        return bytes.fromhex(os.environ[AUTHKEY_ENV])
    job = os.environ.get("SLURM_JOB_ID", "local")
    return hashlib.sha256(f"ernie-rl|{job}|{os.path.abspath(run_dir)}".encode()).digest()


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        from megatron_ernie.config.errors import ConfigError

        raise ConfigError(ADDRESS_ENV, text, "use HOST:PORT, e.g. 127.0.0.1:29600")
    return host, int(port)


def listen(port: int, authkey: bytes) -> Listener:
    """The controller's listening socket on all interfaces (port 0: any free port)."""
    return Listener(("0.0.0.0", port), authkey=authkey)


def connect(address: tuple[str, int], authkey: bytes, hello: Hello, timeout_s: float = 300.0) -> LockedChannel:
    """Connect to the controller (retrying while it starts up) and introduce ourselves."""
    trace = MessageTrace.from_env(hello.role, hello.rank)  # before the retry loop: its errors are not "no controller"
    deadline, delay = time.monotonic() + timeout_s, 0.1
    while True:
        try:
            channel = LockedChannel(Client(address, authkey=authkey), trace)
            break
        except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError, socket.gaierror, OSError):
            if time.monotonic() > deadline:
                raise ConnectionError(f"no RL controller at {address[0]}:{address[1]} after {timeout_s:.0f} s; "
                                      f"check {ADDRESS_ENV} and that the controller role started") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    channel.send(hello)
    return channel


class Heartbeats:
    """Sends a Heartbeat every `period_s` from a daemon thread until stopped."""

    def __init__(self, channel, role: str, rank: int, period_s: float):
        from megatron_ernie.rl.protocol import Heartbeat

        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(period_s):
                try:
                    channel.send(Heartbeat(role, rank, time.time()))
                except (OSError, ValueError):
                    return  # the controller is gone; the main loop will notice

        self._thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def recv_or_none(channel: PipeChannel, timeout_s: float):
    """The next message within timeout_s, else None; EOFError when the peer is gone."""
    if not channel.poll(timeout_s):
        return None
    return channel.recv()


def receive_work(channel: PipeChannel, kind: type, who: str, log) -> tuple[list, int | None]:
    """A scorer's next batch: every `kind` message that has arrived (waiting up to 0.5 s for the first).

    Returns (items, None), or ([], exit code) on Shutdown: 75 when the
    controller asks for a requeue, else 0. Other messages are logged and dropped.
    """
    items, message = [], recv_or_none(channel, 0.5)
    while message is not None:
        if isinstance(message, Shutdown):
            return [], 75 if message.reason == "requeue" else 0
        if isinstance(message, kind):
            items.append(message)
        else:
            log.warning(f"{who}: ignoring unexpected {type(message).__name__}")
        message = recv_or_none(channel, 0.0)
    return items, None

