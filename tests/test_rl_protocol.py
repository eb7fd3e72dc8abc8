"""RL message protocol: exact round trips, schema checks, version and tamper errors."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ernie.rl import protocol
from megatron_ernie.rl.protocol import (Heartbeat, PromptRequest, ProtocolError, ProtocolVersionError, Sample,
                                        SampleBatch, ScoredBatch, ScoredSample, Shutdown, WeightBucket, WeightsReady,
                                        decode)
from megatron_ernie.rl.transport import pipe_pair

REPO = Path(__file__).resolve().parents[1]


def make_sample(**overrides) -> Sample:
    args = dict(prompt_id="arith-17", sample_index=2, task="arithmetic", prompt_tokens=[5, 6, 7],
                response_tokens=[8, 9], rollout_logprobs=[-0.25, -1.5], policy_version=4,
                routed_experts=np.arange(5 * 3 * 2, dtype=np.int16).reshape(5, 3, 2),
                env_mask=[False, True], response_text="19", reference="19", finish_reason="length")
    args.update(overrides)
    return Sample(**args)


def test_scored_sample_round_trip_keeps_every_field_exactly():
    original = ScoredSample(make_sample(), reward=1.0, status="ok", detail="matched 19")
    back = ScoredSample.from_bytes(original.to_bytes())
    s = back.sample
    assert (back.reward, back.status, back.detail) == (1.0, "ok", "matched 19")
    assert (s.prompt_id, s.sample_index, s.task, s.policy_version) == ("arith-17", 2, "arithmetic", 4)
    assert (s.response_text, s.reference, s.finish_reason) == ("19", "19", "length")
    assert s.prompt_tokens.tolist() == [5, 6, 7] and s.prompt_tokens.dtype == np.int32
    assert s.response_tokens.tolist() == [8, 9]
    assert s.rollout_logprobs.tolist() == [-0.25, -1.5] and s.rollout_logprobs.dtype == np.float32
    assert s.routed_experts.dtype == np.int16 and s.routed_experts.shape == (5, 3, 2)
    assert s.routed_experts[4, 2, 1] == 29
    assert s.env_mask.tolist() == [False, True]
    assert s.loss_mask().tolist() == [1.0, 0.0]


def test_optional_arrays_round_trip_as_none():
    sample = make_sample(routed_experts=None, env_mask=None)
    back = Sample.from_bytes(sample.to_bytes())
    assert back.routed_experts is None and back.env_mask is None
    assert back.loss_mask().tolist() == [1.0, 1.0]


def test_other_messages_round_trip():
    req = decode(PromptRequest("p1", "code", [1, 2], n_samples=8, reference='{"tests": []}').to_bytes())
    assert (req.prompt_id, req.task, req.prompt_tokens.tolist(), req.n_samples, req.reference,
            req.max_new_tokens) == ("p1", "code", [1, 2], 8, '{"tests": []}', 0)
    weights = decode(WeightsReady(7, [WeightBucket(0, 1024, "bfloat16", ["a.weight", "b.bias"]),
                                      WeightBucket(1, 64, "float32", ["c"])]).to_bytes())
    assert weights.version == 7
    assert [(b.index, b.nbytes, b.dtype, b.names) for b in weights.buckets] == [
        (0, 1024, "bfloat16", ("a.weight", "b.bias")), (1, 64, "float32", ("c",))]
    beat = decode(Heartbeat("reward", 3, 1234.5).to_bytes())
    assert (beat.role, beat.rank, beat.time) == ("reward", 3, 1234.5)
    assert decode(Shutdown("done").to_bytes()).reason == "done"


def test_wire_layout_is_versioned_and_arrays_are_aligned():
    data = make_sample().to_bytes()
    magic, version, header_len = struct.unpack_from("<4sHI", data)
    assert (magic, version) == (b"ERL1", protocol.PROTOCOL_VERSION)
    header = json.loads(data[10:10 + header_len])
    assert header["type"] == "Sample"
    assert header["fields"]["prompt_tokens"] == {"__array__": ["<i4", [3], 0, 12]}
    assert (10 + header_len) % 8 == 0
    assert all(ref["__array__"][2] % 8 == 0 for ref in header["fields"].values()
               if isinstance(ref, dict) and "__array__" in ref)


def mixed_batch() -> ScoredBatch:
    """Samples of different lengths, one without routes, one with an env mask, a teacher on one."""
    rng = np.random.default_rng(3)
    scored = []
    for i in range(5):
        n_prompt, n_response = 3 + i, 1 + 2 * i
        sample = make_sample(prompt_id=f"p{i // 2}", sample_index=i, prompt_tokens=rng.integers(0, 99, n_prompt),
                             response_tokens=rng.integers(0, 99, n_response),
                             rollout_logprobs=-rng.random(n_response),
                             routed_experts=None if i == 1 else rng.integers(0, 8, (n_prompt + n_response, 3, 2)),
                             env_mask=rng.random(n_response) < 0.5 if i == 3 else None, response_text=f"r{i}")
        teacher = dict(teacher="arith", teacher_logprobs=-rng.random(n_response)) if i == 2 else {}
        scored.append(ScoredSample(sample, reward=i / 4, status="ok" if i else "wrong", **teacher))
    return ScoredBatch(tuple(scored))


def test_a_batch_is_written_by_column_and_comes_back_exactly():
    batch = mixed_batch()
    data = batch.to_bytes()
    back = decode(data)
    for a, b in zip(batch.scored, back.scored, strict=True):
        for name in protocol._field_names(ScoredSample):
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, Sample):
                for field in protocol._field_names(Sample):
                    u, v = getattr(x, field), getattr(y, field)
                    assert (u is None and v is None) or np.array_equal(u, v), field
                    assert not isinstance(u, np.ndarray) or u.dtype == v.dtype, field
            else:
                assert (x is None and y is None) or np.array_equal(x, y), name
    header = json.loads(data[10:10 + struct.unpack_from("<4sHI", data)[2]])
    columns = header["fields"]["scored"]
    assert (columns["__columns__"], columns["n"]) == ("ScoredSample", 5)
    sample_columns = columns["fields"]["sample"]["fields"]
    # one array per field for all five samples, split at their lengths
    assert sample_columns["response_tokens"]["lengths"] == [1, 3, 5, 7, 9]
    assert sample_columns["response_tokens"]["__ragged__"][1] == [25]
    # scalar fields are one plain list each
    assert sample_columns["sample_index"] == {"values": [0, 1, 2, 3, 4]}
    # some samples have no routes or env mask: those fields go item by item
    assert [r is None for r in sample_columns["routed_experts"]["rows"]] == [False, True, False, False, False]
    assert sum(r is None for r in sample_columns["env_mask"]["rows"]) == 4


def test_forged_columns_are_rejected_with_the_field_named():
    data = SampleBatch(tuple(make_sample(sample_index=i) for i in range(3))).to_bytes()
    header_len = struct.unpack_from("<4sHI", data)[2]
    header, payload = json.loads(data[10:10 + header_len]), data[10 + header_len:]

    def tampered(edit):
        forged = json.loads(json.dumps(header))
        edit(forged["fields"]["samples"])
        return forge(forged, payload)

    with pytest.raises(ProtocolError, match="Sample.response_tokens column: lengths summing to 7"):
        decode(tampered(lambda c: c["fields"]["response_tokens"].update(lengths=[2, 2, 3])))
    with pytest.raises(ProtocolError, match="Sample.task column: 2 values for 3 items"):
        decode(tampered(lambda c: c["fields"]["task"].update(values=["a", "b"])))
    with pytest.raises(ProtocolError, match="bad item count"):
        decode(tampered(lambda c: c.update(n=0)))
    # every item is still checked by its own schema
    with pytest.raises(ProtocolError, match="Sample.finish_reason = 'eaten'"):
        decode(tampered(lambda c: c["fields"]["finish_reason"].update(values=["stop", "eaten", "stop"])))
    # a plain column carries JSON scalars only: an array descriptor smuggled into one is refused
    with pytest.raises(ProtocolError, match="Sample.prompt_id column: a plain column holds"):
        decode(tampered(lambda c: c["fields"]["prompt_id"].update(values=["0:a", {"__array__": ["<i4", [1], 0, 4]},
                                                                           "2:a"])))
    with pytest.raises(ProtocolError, match="Sample.rollout_logprobs = .*length 2"):
        decode(tampered(lambda c: c["fields"]["rollout_logprobs"].update(lengths=[1, 3, 2])))


def test_decoded_arrays_are_read_only():
    back = Sample.from_bytes(make_sample().to_bytes())
    with pytest.raises(ValueError):
        back.response_tokens[0] = 1


def test_version_mismatch_is_a_clear_error():
    data = bytearray(Shutdown().to_bytes())
    struct.pack_into("<H", data, 4, protocol.PROTOCOL_VERSION + 1)
    version = protocol.PROTOCOL_VERSION
    with pytest.raises(ProtocolVersionError, match=f"protocol version {version + 1}, this process speaks {version}"):
        decode(bytes(data))


def test_malformed_bytes_are_rejected():
    good = Shutdown("x").to_bytes()
    with pytest.raises(ProtocolError, match="magic"):
        decode(b"XXXX" + good[4:])
    with pytest.raises(ProtocolError, match="too short"):
        decode(good[:5])
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(good[:12])
    with pytest.raises(ProtocolError, match="expected a Sample message, got a Shutdown"):
        Sample.from_bytes(good)


def forge(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<4sHI", b"ERL1", protocol.PROTOCOL_VERSION, len(raw)) + raw + payload


def test_forged_headers_cannot_smuggle_objects_or_overrun():
    with pytest.raises(ProtocolError, match="unknown message type 'Evil'"):
        decode(forge({"type": "Evil", "fields": {}}))
    with pytest.raises(ProtocolError, match="bad array descriptor"):
        decode(forge({"type": "PromptRequest", "fields": {"prompt_id": "a", "task": "t", "n_samples": 1,
                                                          "prompt_tokens": {"__array__": ["|O", [1], 0, 8]}}}))
    with pytest.raises(ProtocolError, match="does not fit"):
        decode(forge({"type": "PromptRequest", "fields": {"prompt_id": "a", "task": "t", "n_samples": 1,
                                                          "prompt_tokens": {"__array__": ["<i4", [4], 0, 16]}}},
                     payload=bytes(8)))
    with pytest.raises(ProtocolError, match="unexpected fields"):
        decode(forge({"type": "Shutdown", "fields": {"reason": "", "extra": 1}}))


def test_schema_errors_name_the_field():
    with pytest.raises(ProtocolError, match=r"Sample.rollout_logprobs = .*length 2"):
        make_sample(rollout_logprobs=[-1.0])
    with pytest.raises(ProtocolError, match=r"Sample.routed_experts = .*length 5"):
        make_sample(routed_experts=np.zeros((4, 3, 2), dtype=np.int16))
    with pytest.raises(ProtocolError, match=r"Sample.response_tokens = .*int32"):
        make_sample(response_tokens=[1.5, 2.0])
    with pytest.raises(ProtocolError, match=r"Sample.routed_experts = .*values within int16"):
        make_sample(routed_experts=np.full((5, 3, 2), 40000))
    with pytest.raises(ProtocolError, match=r"Sample.policy_version = -1: expected int >= 0"):
        make_sample(policy_version=-1)
    with pytest.raises(ProtocolError, match=r"ScoredSample.status = 'great'"):
        ScoredSample(make_sample(), 1.0, "great")
    with pytest.raises(ProtocolError, match=r"ScoredSample.reward = nan"):
        ScoredSample(make_sample(), float("nan"), "ok")
    with pytest.raises(ProtocolError, match="bucket indices"):
        WeightsReady(1, [WeightBucket(1, 8, "float32", ["a"])])



def teacher_rows(n: int, vocab: int = 12, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(n, vocab))
    return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)


def test_teacher_fields_round_trip_exactly():
    full = teacher_rows(2)
    sampled = full[np.arange(2), [8, 9]]
    original = ScoredSample(make_sample(), 1.0, "ok", teacher="math", teacher_logprobs=sampled, teacher_full=full)
    back = ScoredSample.from_bytes(original.to_bytes())
    assert back.teacher == "math"
    assert back.teacher_logprobs.dtype == np.float32 and back.teacher_logprobs.tolist() == sampled.tolist()
    assert back.teacher_full.dtype == np.float32 and back.teacher_full.shape == (2, 12)
    assert np.array_equal(back.teacher_full, full)
    plain = ScoredSample.from_bytes(ScoredSample(make_sample(), 0.0, "wrong").to_bytes())
    assert (plain.teacher, plain.teacher_logprobs, plain.teacher_full) == ("", None, None)
    only_sampled = ScoredSample.from_bytes(
        ScoredSample(make_sample(), 0.0, "wrong", teacher="t", teacher_logprobs=[-0.5, -2.0]).to_bytes())
    assert only_sampled.teacher_logprobs.tolist() == [-0.5, -2.0] and only_sampled.teacher_full is None


def test_teacher_fields_with_bad_shapes_are_rejected():
    scored = lambda **kw: ScoredSample(make_sample(), 1.0, "ok", **{"teacher": "math", **kw})
    with pytest.raises(ProtocolError, match=r"ScoredSample.teacher_logprobs = .*length 2"):
        scored(teacher_logprobs=[-1.0, -1.0, -1.0])
    with pytest.raises(ProtocolError, match=r"ScoredSample.teacher_logprobs = .*1-d float32"):
        scored(teacher_logprobs=teacher_rows(2))
    with pytest.raises(ProtocolError, match=r"ScoredSample.teacher_full = .*2-d float32"):
        scored(teacher_full=[-1.0, -1.0])
    with pytest.raises(ProtocolError, match=r"ScoredSample.teacher_full = .*length 2"):
        scored(teacher_full=teacher_rows(3))
    with pytest.raises(ProtocolError, match=r"ScoredSample.teacher_full = .*whole vocabulary \(> token id 9\)"):
        scored(teacher_full=teacher_rows(2, vocab=9))
    with pytest.raises(ProtocolError, match=r"ScoredSample.teacher_logprobs = .*finite log-probabilities"):
        scored(teacher_logprobs=[-1.0, float("-inf")])
    with pytest.raises(ProtocolError, match=r"ScoredSample.teacher_logprobs = .*finite log-probabilities"):
        scored(teacher_logprobs=[0.5, -1.0])
    with pytest.raises(ProtocolError, match=r"ScoredSample.teacher = '': expected the alias"):
        ScoredSample(make_sample(), 1.0, "ok", teacher_logprobs=[-1.0, -1.0])
    with pytest.raises(ProtocolError, match=r"ScoredSample.teacher = 3: expected str"):
        ScoredSample(make_sample(), 1.0, "ok", teacher=3)

def test_messages_are_immutable():
    sample = make_sample()
    with pytest.raises(AttributeError):
        sample.policy_version = 9


# ------------------------------------------------------------------ transport

def test_pipe_channel_carries_messages_and_rejects_garbage():
    controller, worker = pipe_pair()
    controller.send(make_sample())
    assert worker.poll(1.0)
    got = worker.recv()
    assert isinstance(got, Sample) and got.rollout_logprobs.tolist() == [-0.25, -1.5]
    worker.send(ScoredSample(got, 0.5, "wrong", "close"))
    assert controller.recv().reward == 0.5
    assert not controller.poll(0.0)
    worker.send_bytes(b"not a message")
    with pytest.raises(ProtocolError, match="too short|magic"):
        controller.recv()


# Each rank sends a Sample to the other, rank 0 echoes it back as a ScoredSample; each writes what it got.
PEER_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from megatron_ernie.rl.protocol import Sample, ScoredSample
from megatron_ernie.rl import transport
kind, out_dir = sys.argv[2], sys.argv[3]
if kind == "mpi":
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.rank
    channel = transport.MPIChannel(MPI.COMM_WORLD, peer=1 - rank)
else:
    import torch.distributed as dist
    rank = int(sys.argv[4])
    dist.init_process_group("gloo", init_method="file://" + out_dir + "/store", rank=rank, world_size=2)
    channel = transport.TorchChannel(peer=1 - rank)
mine = Sample(f"p{rank}", rank, "t", [rank] * 3, list(range(1000 * (rank + 1))), [-0.5] * 1000 * (rank + 1), rank)
records = []
if rank == 0:
    channel.send(mine)
    theirs = channel.recv()
    channel.send(ScoredSample(theirs, 1.0, "ok"))
else:
    theirs = channel.recv()
    channel.send(mine)
    echoed = channel.recv()
    records.append([echoed.sample.prompt_id, len(echoed.sample.response_tokens), echoed.status])
records.append([rank, theirs.prompt_id, int(theirs.response_tokens.sum()), theirs.policy_version])
with open(f"{out_dir}/rank{rank}.json", "w") as f:
    json.dump(records, f)
"""


def check_peer_outputs(out_dir: Path) -> None:
    assert json.loads((out_dir / "rank0.json").read_text()) == [[0, "p1", sum(range(2000)), 1]]
    assert json.loads((out_dir / "rank1.json").read_text()) == [["p1", 2000, "ok"], [1, "p0", sum(range(1000)), 0]]


@pytest.mark.slow
def test_torch_channel_between_two_processes(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, str(REPO), "torch", str(tmp_path), str(rank)])
             for rank in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    check_peer_outputs(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec")
def test_mpi_channel_between_two_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = subprocess.run(["mpiexec", "--oversubscribe", "-n", "2", sys.executable, "-c", PEER_SCRIPT, str(REPO),
                          "mpi", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    check_peer_outputs(tmp_path)


def test_arrays_of_different_ranks_in_one_column_go_item_by_item():
    payload = bytearray()
    column = protocol._encode_column([np.arange(3, dtype=np.int32), np.array(5, dtype=np.int32)], payload)
    assert list(column) == ["rows"]
    back = [protocol._decode_value(v, memoryview(bytes(payload))) for v in column["rows"]]
    assert back[0].tolist() == [0, 1, 2] and back[1].shape == () and int(back[1]) == 5
