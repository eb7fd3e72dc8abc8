"""Versioned messages between the RL roles (controller, rollout, reward, trainer).

Every message is a small frozen dataclass with an explicit schema, checked on
construction, so a malformed sample fails in the role that made it, not three
processes later inside a loss.

Wire format (little-endian), chosen to carry token and routing arrays without
pickle (never unpickle what another process sent) and without extra packages:

    magic b"ERL1" | u16 protocol version | u32 header length | header | payload

(header padded with spaces and arrays with zero bytes to 8-byte alignment.)

The header is UTF-8 JSON: {"type": name, "fields": {...}}. Arrays appear in
"fields" as {"__array__": [dtype, shape, offset, nbytes]} pointing into the
payload (raw bytes of a whitelisted dtype); a nested message appears as
{"__message__": name, "fields": {...}}. A tuple of messages of one type (a
batch of samples) is written by column: {"__columns__": name, "n": count,
"fields": {field: column}}, where a column is {"__ragged__": [dtype, row
shape, offset, nbytes], "lengths": [...]} (one array per field: every item's
array back to back), a nested {"__columns__": ...}, {"values": [...]} (plain
JSON scalars: strings, numbers, booleans, null), or {"rows": [...]} (each
item's value encoded as above). Decoding checks the magic, the version, the
type, the dtype whitelist and every bound, then re-runs the schema checks of
every message, also of every item of a column.

Why columns: a batch of 64 samples holds ~450 small arrays; written one
descriptor each, encoding and decoding them took about a millisecond per
32 samples on each hop of the sample path (issue 14's hand-off time); by
column they are five arrays, sliced into per-sample views on decode.
Plain scalar columns (ids, tasks, rewards) are one JSON list read as is: as
rows, each value went through the recursive decoder, ~960 calls for a batch
of 64 scored samples.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

PROTOCOL_VERSION = 3  # 2: tuples of messages by column; 3: plain scalar columns as one list
MAGIC = b"ERL1"
_PREAMBLE = struct.Struct("<4sHI")
_MAX_HEADER_BYTES = 16 << 20
_ALIGN = 8  # arrays start at multiples of 8 bytes, so decoding can view them in place
_WIRE_DTYPES = {"<i2": np.int16, "<i4": np.int32, "<i8": np.int64, "<f4": np.float32, "|b1": np.bool_}
_WIRE_NP_DTYPES = {k: np.dtype(v) for k, v in _WIRE_DTYPES.items()}
_PLAIN = (str, int, float, bool, type(None))  # what JSON carries as is

# Outcome of scoring a sample. "ok": verified correct; "wrong"/"no_answer": checked and
# incorrect / nothing to check; the rest: the program or the verifier failed (see detail).
REWARD_STATUSES = ("ok", "wrong", "no_answer", "timeout", "crash", "memory", "process_limit",
                   "output_limit", "sandbox_error", "error")
FINISH_REASONS = ("stop", "length", "abort")


class ProtocolError(ValueError):
    """A message is malformed: names the field, the value and what was expected."""


class ProtocolVersionError(ProtocolError):
    """The bytes were written by a different protocol version."""


# ---------------------------------------------------------------- schema checks


def _check(ok: bool, msg: str, name: str, value, expected: str) -> None:
    if not ok:
        shown = f"array{getattr(value, 'shape', '')}" if isinstance(value, np.ndarray) else repr(value)[:80]
        raise ProtocolError(f"{msg}.{name} = {shown}: expected {expected}")


def _scalar(msg, name: str, value, kind: type, minimum=None) -> None:
    if type(value) is kind and (kind is not float or math.isfinite(value)) and (minimum is None or value >= minimum):
        return  # the common case, decided without the checks below (every item of every batch comes here)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value >= minimum
    bound = f" >= {minimum}" if minimum is not None else ""
    _check(ok, msg, name, value, f"{kind.__name__}{bound}")


def _kind_ok(arr: np.ndarray, dtype) -> bool:
    """Integers for integer fields, numbers for float fields, bools for masks (empty arrays fit all)."""
    allowed = {"b": "b", "i": "iu", "f": "fiu"}[np.dtype(dtype).kind]
    return arr.size == 0 or arr.dtype.kind in allowed


@functools.lru_cache(maxsize=None)
def _int_bounds(dtype) -> tuple[int, int]:
    """(min, max) of an integer dtype; cached: np.iinfo costs microseconds, and every array of every
    message is checked (a TrainBatch of 64 samples holds ~450 arrays: issue 14's hand-off time)."""
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _array(obj, name: str, dtype, ndim: int, length: int | None = None, optional: bool = False):
    """Coerce field `name` to a read-only array of `dtype` and check its rank and length."""
    value = getattr(obj, name)
    if value is None and optional:
        return None
    if type(value) is np.ndarray and value.dtype == dtype and value.ndim == ndim and value.flags.c_contiguous:
        arr = value  # already what the field holds (every decoded array): no conversion, no range to check
    else:
        arr = _converted(obj, name, value, dtype, ndim)
    arr.setflags(write=False)
    if length is not None and arr.shape[0] != length:
        _check(False, type(obj).__name__, name, value, f"length {length} along the first axis")
    object.__setattr__(obj, name, arr)
    return arr


def _converted(obj, name: str, value, dtype, ndim: int) -> np.ndarray:
    """`value` as a contiguous array of `dtype`, refusing wrong kinds, ranks and out-of-range integers."""
    msg = type(obj).__name__
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        arr = None
    # the expected-text of each check is formatted only on failure (dtype.name alone took half of decoding)
    if not (arr is not None and _kind_ok(arr, dtype) and arr.ndim == ndim):
        _check(False, msg, name, value, f"a {ndim}-d {np.dtype(dtype).name} array")
    if np.dtype(dtype).kind == "i" and arr.size:
        low, high = _int_bounds(dtype)
        if not (low <= arr.min() and arr.max() <= high):
            _check(False, msg, name, value, f"values within {np.dtype(dtype).name}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _messages(obj, name: str, kind: type) -> tuple:
    """A field holding nested messages: stored as a tuple, every item a `kind`."""
    items = tuple(getattr(obj, name))
    object.__setattr__(obj, name, items)
    _check(all(isinstance(m, kind) for m in items), type(obj).__name__, name, items, f"{kind.__name__} messages")
    return items


class Message:
    """Base of all messages: encoding, decoding and type registry."""

    registry: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Message.registry[cls.__name__] = cls

    def to_bytes(self) -> bytes:
        payload = bytearray()
        header = json.dumps({"type": type(self).__name__, "fields": _encode_fields(self, payload)},
                            separators=(",", ":"), allow_nan=False).encode()
        header += b" " * (-(_PREAMBLE.size + len(header)) % _ALIGN)  # payload starts aligned
        return _PREAMBLE.pack(MAGIC, PROTOCOL_VERSION, len(header)) + header + bytes(payload)

    @classmethod
    def from_bytes(cls, data: bytes):
        message = decode(data)
        if not isinstance(message, cls):
            raise ProtocolError(f"expected a {cls.__name__} message, got a {type(message).__name__}")
        return message


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, eq=False)
class PromptRequest(Message):
    """Controller -> rollout: generate n_samples responses (one GRPO group) for a prompt.

    reference is opaque to rollout and copied into every Sample for the verifier
    (an exact answer, or JSON test cases for code tasks).
    """

    prompt_id: str
    task: str
    prompt_tokens: np.ndarray
    n_samples: int
    reference: str = ""
    max_new_tokens: int = 0  # 0: the rollout engine's configured default

    def __post_init__(self):
        _scalar("PromptRequest", "prompt_id", self.prompt_id, str)
        _scalar("PromptRequest", "task", self.task, str)
        _array(self, "prompt_tokens", np.int32, 1)
        _scalar("PromptRequest", "n_samples", self.n_samples, int, 1)
        _scalar("PromptRequest", "reference", self.reference, str)
        _scalar("PromptRequest", "max_new_tokens", self.max_new_tokens, int, 0)


@dataclass(frozen=True, eq=False)
class Sample(Message):
    """Rollout -> reward: one generated response and what the trainer needs to learn from it.

    rollout_logprobs: log pi_rollout(token) per response token, for importance
      correction of the trainer/rollout mismatch and of staleness.
    routed_experts: int16 [prompt + response tokens, MoE layers, top-k] expert ids
      chosen at rollout, so the trainer can replay the same routing; None for
      dense models. The final response token is never fed back through the model
      during generation; engines may mark its row -1.
    env_mask: bool [response tokens], True where the token came from the
      environment (tool output) in an agent episode; those are not trained on.
    """

    prompt_id: str
    sample_index: int
    task: str
    prompt_tokens: np.ndarray
    response_tokens: np.ndarray
    rollout_logprobs: np.ndarray
    policy_version: int
    routed_experts: np.ndarray | None = None
    env_mask: np.ndarray | None = None
    response_text: str = ""
    reference: str = ""
    finish_reason: str = "stop"

    def __post_init__(self):
        for name in ("prompt_id", "task", "response_text", "reference"):
            _scalar("Sample", name, getattr(self, name), str)
        _scalar("Sample", "sample_index", self.sample_index, int, 0)
        _scalar("Sample", "policy_version", self.policy_version, int, 0)
        prompt = _array(self, "prompt_tokens", np.int32, 1)
        response = _array(self, "response_tokens", np.int32, 1)
        _array(self, "rollout_logprobs", np.float32, 1, length=len(response))
        _array(self, "env_mask", np.bool_, 1, length=len(response), optional=True)
        _array(self, "routed_experts", np.int16, 3, length=len(prompt) + len(response), optional=True)
        _check(self.finish_reason in FINISH_REASONS, "Sample", "finish_reason", self.finish_reason,
               f"one of {FINISH_REASONS}")

    def loss_mask(self) -> np.ndarray:
        """1.0 for response tokens the policy produced, 0.0 for environment tokens."""
        if self.env_mask is None:
            return np.ones(len(self.response_tokens), dtype=np.float32)
        return (~self.env_mask).astype(np.float32)


@dataclass(frozen=True, eq=False)
class ScoredSample(Message):
    """Reward -> controller (-> teacher -> controller): a sample, its reward and why it got it.

    With on-policy distillation a teacher adds, for the teacher alias `teacher`:
    teacher_logprobs: float32 [response tokens], log pi_T(y_j | prompt + response[:j])
      at temperature 1 (payload "sampled" and "full");
    teacher_full: float32 [response tokens, V], the teacher's whole log-softmax row at
      temperature 1 over the tokenizer's real vocabulary V (padding cut), payload "full".
    Environment tokens get rows too; the trainer masks them.
    With a learned judge ([rl.judge], rl/judge/) the judge replaces `reward` by its
    score p_judge("y" | prompt + response) and keeps the verifier's reward here:
    rubric_reward: the task's own (rubric) reward of a judged sample, None otherwise.
    """

    sample: Sample
    reward: float
    status: str
    detail: str = ""
    teacher: str = ""
    teacher_logprobs: np.ndarray | None = None
    teacher_full: np.ndarray | None = None
    rubric_reward: float | None = None

    def __post_init__(self):
        _check(isinstance(self.sample, Sample), "ScoredSample", "sample", self.sample, "a Sample")
        if self.rubric_reward is not None:
            _scalar("ScoredSample", "rubric_reward", self.rubric_reward, float)
            object.__setattr__(self, "rubric_reward", float(self.rubric_reward))
        _scalar("ScoredSample", "reward", self.reward, float)
        object.__setattr__(self, "reward", float(self.reward))
        _check(self.status in REWARD_STATUSES, "ScoredSample", "status", self.status, f"one of {REWARD_STATUSES}")
        _scalar("ScoredSample", "detail", self.detail, str)
        _scalar("ScoredSample", "teacher", self.teacher, str)
        self._check_teacher_arrays()

    def _check_teacher_arrays(self) -> None:
        """Teacher rows: one per response token, finite log-probs, the sampled ids inside the row."""
        response = self.sample.response_tokens
        sampled = _array(self, "teacher_logprobs", np.float32, 1, length=len(response), optional=True)
        full = _array(self, "teacher_full", np.float32, 2, length=len(response), optional=True)
        for name, arr in (("teacher_logprobs", sampled), ("teacher_full", full)):
            if arr is None:
                continue
            _check(bool(self.teacher), "ScoredSample", "teacher", self.teacher,
                   f"the alias of the teacher that wrote {name}")
            _check(bool(np.isfinite(arr).all()) and (arr.size == 0 or float(arr.max()) <= 1e-3),
                   "ScoredSample", name, arr, "finite log-probabilities (<= 0)")
        if full is not None and len(response):
            _check(int(response.max()) < full.shape[1], "ScoredSample", "teacher_full", full,
                   f"a row over the whole vocabulary (> token id {int(response.max())})")


@dataclass(frozen=True, eq=False)
class SampleBatch(Message):
    """Rollout -> controller -> reward: the Samples of one generation batch as one message.

    Why: sent one message each, every sample cost the controller a wake-up, a
    decode and a re-send to a reward worker (about 0.6 ms a sample, 20 ms per
    worker per step at the tiny config, issue 14); one message per batch pays
    the wake-up and the system calls once.
    """

    samples: tuple[Sample, ...]

    def __post_init__(self):
        _messages(self, "samples", Sample)


@dataclass(frozen=True, eq=False)
class ScoredBatch(Message):
    """Reward -> controller: the verdicts of every sample a reward worker scored in one pass."""

    scored: tuple[ScoredSample, ...]

    def __post_init__(self):
        _messages(self, "scored", ScoredSample)


@dataclass(frozen=True, eq=False)
class WeightBucket(Message):
    """One contiguous buffer of a weight push: which tensors it holds, in order."""

    index: int
    nbytes: int
    dtype: str
    names: tuple[str, ...]

    def __post_init__(self):
        _scalar("WeightBucket", "index", self.index, int, 0)
        _scalar("WeightBucket", "nbytes", self.nbytes, int, 0)
        _scalar("WeightBucket", "dtype", self.dtype, str)
        object.__setattr__(self, "names", tuple(self.names))
        _check(all(isinstance(n, str) for n in self.names), "WeightBucket", "names", self.names, "strings")


@dataclass(frozen=True, eq=False)
class WeightsReady(Message):
    """Trainer -> rollout: policy `version` is published in these buckets."""

    version: int
    buckets: tuple[WeightBucket, ...]

    def __post_init__(self):
        _scalar("WeightsReady", "version", self.version, int, 0)
        _messages(self, "buckets", WeightBucket)
        _check([b.index for b in self.buckets] == list(range(len(self.buckets))), "WeightsReady", "buckets",
               [b.index for b in self.buckets], "bucket indices 0..n-1 in order")


@dataclass(frozen=True, eq=False)
class Heartbeat(Message):
    """Any role -> controller: I am alive (time is the sender's time.time())."""

    role: str
    rank: int
    time: float

    def __post_init__(self):
        _scalar("Heartbeat", "role", self.role, str)
        _scalar("Heartbeat", "rank", self.rank, int, 0)
        _scalar("Heartbeat", "time", self.time, float)
        object.__setattr__(self, "time", float(self.time))


@dataclass(frozen=True, eq=False)
class Shutdown(Message):
    """Controller -> all: finish the current item and exit."""

    reason: str = ""

    def __post_init__(self):
        _scalar("Shutdown", "reason", self.reason, str)


# ---------------------------------------------------------------- codec


def _encode_value(value, payload: bytearray):
    if isinstance(value, np.ndarray):
        dtype = value.dtype.str
        if dtype not in _WIRE_DTYPES:
            raise ProtocolError(f"cannot send an array of dtype {dtype}; allowed: {sorted(_WIRE_DTYPES)}")
        data = np.ascontiguousarray(value).tobytes()
        payload += bytes(-len(payload) % _ALIGN)
        ref = [dtype, list(value.shape), len(payload), len(data)]
        payload += data
        return {"__array__": ref}
    if isinstance(value, Message):
        return {"__message__": type(value).__name__, "fields": _encode_fields(value, payload)}
    if isinstance(value, (tuple, list)):
        if value and isinstance(value[0], Message) and all(type(v) is type(value[0]) for v in value):
            return _encode_columns(value, payload)
        return [_encode_value(v, payload) for v in value]
    return value


def _encode_columns(items, payload: bytearray) -> dict:
    """Messages of one type, field by field (see the module docstring)."""
    cls = type(items[0])
    columns = {name: _encode_column([getattr(m, name) for m in items], payload) for name in _field_names(cls)}
    return {"__columns__": cls.__name__, "n": len(items), "fields": columns}


def _encode_column(values: list, payload: bytearray) -> dict:
    """One field of every item: a ragged array when all are arrays of one dtype and row shape,
    nested columns when all are messages of one type, else each value on its own."""
    first = values[0]
    if isinstance(first, np.ndarray) and first.ndim >= 1 and all(
            isinstance(v, np.ndarray) and v.dtype == first.dtype and v.shape[1:] == first.shape[1:]
            and v.ndim == first.ndim for v in values):
        column = np.concatenate(values) if len(values) > 1 else first
        ref = _encode_value(column, payload)["__array__"]
        return {"__ragged__": ref, "lengths": [len(v) for v in values]}
    if isinstance(first, Message) and all(type(v) is type(first) for v in values):
        return _encode_columns(values, payload)
    if all(type(v) in _PLAIN for v in values):
        return {"values": values}
    return {"rows": [_encode_value(v, payload) for v in values]}


@functools.lru_cache(maxsize=None)
def _field_names(cls) -> tuple[str, ...]:
    """A message class's field names (dataclasses.fields is slow enough to show in every hop's time)."""
    return tuple(f.name for f in fields(cls))


def _encode_fields(message: Message, payload: bytearray) -> dict:
    return {name: _encode_value(getattr(message, name), payload) for name in _field_names(type(message))}


def _decode_array(ref, payload: memoryview) -> np.ndarray:
    try:
        dtype, shape, offset, nbytes = ref
        dtype = _WIRE_NP_DTYPES[dtype]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad array descriptor {ref!r}: {exc}") from None
    if not all(type(n) is int and n >= 0 for n in (*shape, offset, nbytes)):
        raise ProtocolError(f"bad array descriptor {ref!r}: sizes must be non-negative integers")
    count = math.prod(shape)
    if count * dtype.itemsize != nbytes or offset + nbytes > len(payload):
        raise ProtocolError(f"array descriptor {ref!r} does not fit the {len(payload)}-byte payload")
    arr = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
    return arr if arr.flags.aligned else arr.copy()


def _decode_value(value, payload: memoryview):
    if isinstance(value, dict) and "__array__" in value:
        return _decode_array(value["__array__"], payload)
    if isinstance(value, dict) and "__message__" in value:
        return _build(value["__message__"], value.get("fields"), payload)
    if isinstance(value, dict) and "__columns__" in value:
        return tuple(_decode_columns(value, payload))
    if isinstance(value, list):
        return tuple(_decode_value(v, payload) for v in value)
    if isinstance(value, dict):
        raise ProtocolError(f"unexpected object in message: {value!r:.80}")
    return value


def _message_class(type_name, encoded) -> type:
    """The registered class of `type_name`, after checking `encoded` names only its fields."""
    cls = Message.registry.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_name!r}; known: {sorted(Message.registry)}")
    names = _field_names(cls)
    if not isinstance(encoded, dict) or not all(k in names for k in encoded):
        raise ProtocolError(f"{type_name}: unexpected fields {sorted(set(encoded or {}) - set(names))}")
    return cls


def _construct(cls, kwargs: dict) -> Message:
    try:
        return cls(**kwargs)  # the schema checks run again on every message, also on every item of a column
    except TypeError as exc:
        raise ProtocolError(f"{cls.__name__}: {exc}") from None


def _build(type_name: str, encoded: dict, payload: memoryview) -> Message:
    cls = _message_class(type_name, encoded)
    return _construct(cls, {k: _decode_value(v, payload) for k, v in encoded.items()})


def _decode_columns(value: dict, payload: memoryview) -> list:
    """{"__columns__": type, "n": count, "fields": ...} -> that many messages, built one by one."""
    n, encoded = value.get("n"), value.get("fields")
    cls = _message_class(value["__columns__"], encoded)
    if type(n) is not int or n < 1:
        raise ProtocolError(f"{cls.__name__} columns: bad item count {n!r}")
    columns = {k: _decode_column(cls.__name__, k, v, n, payload) for k, v in encoded.items()}
    return [_construct(cls, {k: c[i] for k, c in columns.items()}) for i in range(n)]


def _decode_column(type_name: str, name: str, column, n: int, payload: memoryview) -> list:
    """One field's n values: per-item views of a ragged array, nested columns, plain values, or rows."""
    where = f"{type_name}.{name} column"
    if isinstance(column, dict) and "__ragged__" in column:
        return _ragged_rows(column, n, payload, where)
    if isinstance(column, dict) and "__columns__" in column:
        values = _decode_columns(column, payload)
    elif isinstance(column, dict) and isinstance(column.get("values"), list):
        values = _plain_values(column["values"], where)
    elif isinstance(column, dict) and isinstance(column.get("rows"), list):
        values = [_decode_value(v, payload) for v in column["rows"]]
    else:
        raise ProtocolError(f"{where}: unreadable column {column!r:.80}")
    if len(values) != n:
        raise ProtocolError(f"{where}: {len(values)} values for {n} items")
    return values


def _plain_values(values: list, where: str) -> list:
    """A plain column's values, as JSON gave them; a nested list or object is refused here (rows
    are the only way to carry those), before any schema check sees it."""
    bad = [v for v in values if type(v) not in _PLAIN]
    if bad:
        raise ProtocolError(f"{where}: a plain column holds {bad[0]!r:.80}")
    return values


def _ragged_rows(column: dict, n: int, payload: memoryview, where: str) -> list:
    """Views of one array split along its first axis at the items' lengths."""
    lengths = column.get("lengths")
    if not (isinstance(lengths, list) and len(lengths) == n and all(type(k) is int and k >= 0 for k in lengths)):
        raise ProtocolError(f"{where}: bad lengths {lengths!r:.80} for {n} items")
    whole = _decode_array(column["__ragged__"], payload)
    if whole.ndim < 1 or sum(lengths) != whole.shape[0]:
        raise ProtocolError(f"{where}: lengths summing to {sum(lengths)} for an array of shape {whole.shape}")
    rows, start = [], 0
    for k in lengths:
        rows.append(whole[start:start + k])
        start += k
    return rows


def decode(data: bytes) -> Message:
    """Bytes -> message of whatever type they hold; ProtocolError on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"decode() takes bytes, got {type(data).__name__}")
    view = memoryview(data)
    if len(view) < _PREAMBLE.size:
        raise ProtocolError(f"message too short ({len(view)} bytes)")
    magic, version, header_len = _PREAMBLE.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError(f"not an RL protocol message (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"message has protocol version {version}, this process speaks {PROTOCOL_VERSION}: "
            "start every RL role from the same megatron_ernie release")
    end = _PREAMBLE.size + header_len
    if header_len > _MAX_HEADER_BYTES or end > len(view):
        raise ProtocolError(f"header length {header_len} exceeds the {len(view)}-byte message")
    try:
        header = json.loads(bytes(view[_PREAMBLE.size:end]))
        type_name, encoded = header["type"], header["fields"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"unreadable message header: {exc}") from None
    return _build(type_name, encoded, view[end:])
