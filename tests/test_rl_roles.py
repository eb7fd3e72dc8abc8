"""Role logic that runs in this process: the reward role's loop and the controller's scheduling rules.

Both talk over real multiprocessing connections; nothing is mocked except
that the test itself plays the controller (reward role) or the roles
(controller) at the other end of the pipe.
"""

import json
import threading
from dataclasses import replace

import numpy as np
import pytest

from megatron_ernie import config as C
from megatron_ernie.config.rl import SandboxConfig
from megatron_ernie.rl.control import TrainBatch, listen
from megatron_ernie.rl.controller import Controller, PromptStream, retry_id
from megatron_ernie.rl.metrics import RunMetrics
from megatron_ernie.rl.protocol import Sample, SampleBatch, ScoredBatch, ScoredSample, Shutdown
from megatron_ernie.rl.reward.serve import serve
from megatron_ernie.rl.reward.worker import RewardWorker
from megatron_ernie.rl.system import SystemConfig
from megatron_ernie.rl.task_tokenizer import CharTokenizer, tokenizer_for
from megatron_ernie.rl.transport import pipe_pair


def sample(prompt_id: str, task: str, text: str, reference: str, index: int = 0) -> Sample:
    return Sample(prompt_id, index, task, np.array([2, 3], np.int32), np.array([4], np.int32),
                  np.array([-0.5], np.float32), 0, response_text=text, reference=reference)


def test_reward_role_scores_sandbox_failures_and_keeps_serving():
    ours, theirs = pipe_pair()
    sandbox = SandboxConfig(wall_s=5, cpu_s=2)
    broken = replace(sandbox, python="/nonexistent/python3")  # the sandbox itself cannot start the program
    tests = json.dumps({"tests": [{"stdin": "1 2\n", "stdout": "3"}]})
    results = {}

    def role(config, key):
        with RewardWorker(config, concurrency=2) as worker:
            results[key] = serve(theirs, worker)

    thread = threading.Thread(target=role, args=(broken, "broken"))
    thread.start()
    ours.send(SampleBatch((sample("a", "code", "```python\nprint(1)\n```", tests), sample("b", "arithmetic", "4", "4"))))
    reply = ours.recv()  # one message for the batch
    assert isinstance(reply, ScoredBatch)
    got = list(reply.scored)
    ours.send(Shutdown())
    thread.join(30)
    statuses = {s.sample.prompt_id: (s.status, s.reward) for s in got}
    assert statuses == {"a": ("sandbox_error", 0.0), "b": ("ok", 1.0)}
    assert results["broken"] == 0

    thread = threading.Thread(target=role, args=(sandbox, "crash"))
    thread.start()
    ours.send(SampleBatch((sample("c", "code", "```python\n1/0\n```", tests),
                           sample("d", "code", "```python\na, b = map(int, input().split())\nprint(a + b)\n```", tests))))
    got = {s.sample.prompt_id: s for s in ours.recv().scored}
    ours.send(Shutdown("requeue"))
    thread.join(30)
    assert got["c"].status == "crash" and got["c"].reward == 0.0 and "ZeroDivisionError" in got["c"].detail
    assert got["d"].status == "ok" and got["d"].reward == 1.0
    assert results["crash"] == 75  # a requeue shutdown exits with EXIT_REQUEUE


def test_identical_samples_of_a_deterministic_task_run_once_and_host_failures_run_again():
    tests = json.dumps({"tests": [{"stdin": "1 2\n", "stdout": "3"}]})
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    wrong = "```python\nprint(4)\n```"
    crash = "```python\nprint(1 / 0)\n```"  # an exception is a property of the program too
    batch = [sample(str(i), "code", text, tests) for i, text in enumerate([right] * 6 + [wrong] * 2)]
    with RewardWorker(SandboxConfig(wall_s=5, cpu_s=2), concurrency=2) as worker:
        first = worker.score(batch)
        assert worker.scored == 2  # one run per distinct program, not eight
        assert [(s.sample.prompt_id, s.reward, s.status) for s in first] == \
            [(str(i), 1.0, "ok") for i in range(6)] + [("6", 0.0, "wrong"), ("7", 0.0, "wrong")]
        crashed = worker.score([sample(f"c{i}", "code", crash, tests) for i in range(3)])
        assert [s.status for s in crashed] == ["crash"] * 3 and worker.scored == 3
        again = worker.score(batch[:1] + [sample("x", "code", right, json.dumps({"tests": [
            {"stdin": "2 2\n", "stdout": "4"}]}))])
        assert worker.scored == 4  # the remembered verdict is reused; another reference is a new key
        assert [(s.sample.prompt_id, s.reward) for s in again] == [("0", 1.0), ("x", 1.0)]
    broken = SandboxConfig(python="/nonexistent/python3")  # every run is a sandbox_error: never remembered
    with RewardWorker(broken, concurrency=2) as worker:
        statuses = [s.status for s in worker.score(batch[:3]) + worker.score(batch[:1])]
        assert statuses == ["sandbox_error"] * 4 and worker.scored == 4


def test_user_tasks_are_scored_every_time_unless_they_declare_themselves_deterministic():
    from megatron_ernie.rl.tasks import TaskExample, register_task

    calls = []

    def reward(response, reference, sandbox):
        calls.append(response)
        return float(response == reference)

    make = lambda seed, index, options: TaskExample("q", "a")  # noqa: E731
    register_task("roles_counting", make, reward, replace=True)
    register_task("roles_counting_pure", make, reward, replace=True, deterministic=True)
    with RewardWorker() as worker:
        worker.score([sample(str(i), "roles_counting", "a", "a") for i in range(4)])
        assert len(calls) == 4
        worker.score([sample(str(i), "roles_counting_pure", "a", "a") for i in range(4)])
        assert len(calls) == 5


@pytest.fixture()
def controller(tmp_path):
    def make(lag: int, per_step: int = 2, steps: int = 3, inline: bool = False):
        cfg = C.load(None, [f'run.dir="{tmp_path}"', "rl.sampling.n_per_prompt=2", "rl.sampling.max_new_tokens=4",
                            f"train.iters={steps}", f"rl.buffer.max_policy_lag={lag}",
                            "rl.tasks=[{name='arithmetic'}]"])
        system = SystemConfig(prompts_per_step=per_step, rollout_batch_prompts=1, inline_rewards=inline)
        return Controller(cfg, system, listen(0, b"k"), ("127.0.0.1", 1), RunMetrics(str(tmp_path), False), 1,
                          tokenizer_for(cfg))
    return make


def drain_rounds(ctl: Controller, version: int) -> list[int]:
    rounds = []
    while (item := ctl._next_prompt(version)) is not None:
        rounds.append(item[1])
    return rounds


def test_sync_mode_issues_a_round_only_to_its_own_version(controller):
    ctl = controller(lag=0)
    assert drain_rounds(ctl, version=0) == [0, 0]  # round 0 only; round 1 needs version 1
    assert drain_rounds(ctl, version=1) == [1, 1]
    assert drain_rounds(ctl, version=2) == [2, 2]
    assert drain_rounds(ctl, version=3) == []  # train.iters = 3 rounds in all


def test_async_mode_runs_lag_rounds_ahead(controller):
    ctl = controller(lag=2, steps=10)
    assert drain_rounds(ctl, version=0) == [0, 0, 1, 1, 2, 2]
    assert drain_rounds(ctl, version=1) == [3, 3]


def test_lost_prompts_are_reissued_with_new_attempt_ids(controller):
    ctl = controller(lag=0)
    request, round_ = ctl._next_prompt(0)
    assert retry_id(request.prompt_id) == request.prompt_id + "#1"
    assert retry_id(request.prompt_id + "#1").endswith("#2")
    ctl.reissue.append((replace_id(request), round_))
    state = ctl.state_dict(0)
    fresh = controller(lag=0)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert fresh.prompts.index == 1 and fresh.issued_useful == 1
    item = fresh._next_prompt(0)
    assert item[0].prompt_id.endswith("#2") and item[1] == 0  # the saved reissue comes first, same round


def replace_id(request):
    from megatron_ernie.rl.controller import reissued

    return reissued(request)


def test_prompt_stream_is_deterministic_and_checks_lengths():
    cfg = C.load(None, ["model.seq_length=8"])
    tok = tokenizer_for(cfg)
    a = PromptStream(cfg.rl.tasks, tok, 4, 2, 8)
    b = PromptStream(cfg.rl.tasks, tok, 4, 2, 8, index=5)
    first = [a.next() for _ in range(6)]
    assert b.next().prompt_tokens.tolist() == first[5].prompt_tokens.tolist()
    with pytest.raises(ValueError, match="exceeds model.seq_length"):
        PromptStream(cfg.rl.tasks, tok, 4, 6, 8).next()


def test_train_batch_keeps_groups_whole():
    s = [ScoredSample(sample("p", "arithmetic", "1", "1", i), 1.0, "ok") for i in range(4)]
    batch = TrainBatch.from_bytes(TrainBatch(3, 2, tuple(s)).to_bytes())
    assert [len(g) for g in batch.groups()] == [2, 2] and batch.step == 3
    with pytest.raises(ValueError, match="multiple of group_size"):
        TrainBatch(0, 3, tuple(s))


class ScriptedEngine:
    """A GenerationEngine that answers each call with the next scripted text (the agent loop's other side)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, list(script), []

    def generate(self, prompts, params):
        from megatron_ernie.rl.rollout.engine import Generation

        self.calls.append((len(prompts), params.max_new_tokens))
        out = []
        for prompt in prompts:
            text = self.script.pop(0)
            tokens = self.tokenizer.encode(text)[: params.max_new_tokens]
            stopped = any(tuple(tokens[-len(s):]) == s for s in params.stop_sequences)
            routes = np.zeros((len(prompt) + len(tokens), 1, 2), np.int16)
            out.append(Generation(np.array(tokens, np.int32), np.full(len(tokens), -0.1, np.float32), routes,
                                  "stop" if stopped else "length"))
        return out


def test_agent_episode_masks_tool_tokens_and_keeps_routes_aligned():
    from megatron_ernie.rl.rollout.agent_loop import run_episodes
    from megatron_ernie.rl.rollout.engine import SamplingParams
    from megatron_ernie.rl.task_tokenizer import TOOL_ALPHABET

    tok = CharTokenizer(TOOL_ALPHABET + "0123456789+-=")
    engine = ScriptedEngine(tok, ["<tool>calc\n2+3</tool>", "9", "5"])  # episode A calls, episode B answers
    params = SamplingParams(max_new_tokens=40, stop_token_ids=(tok.eod_id,))
    (a, routes_a), (b, routes_b) = run_episodes(engine, tok, [tok.encode("2+3="), tok.encode("4+5=")], params, 3)
    assert tok.decode(a.response_tokens) == "<tool>calc\n2+3</tool><result>5</result>5"
    reply = len("<result>5</result>")
    call = len("<tool>calc\n2+3</tool>")
    assert a.env_mask.tolist() == [False] * call + [True] * reply + [False]
    assert (a.rollout_logprobs[a.env_mask] == 0).all() and (a.rollout_logprobs[~a.env_mask] < 0).all()
    assert tok.decode(b.response_tokens) == "9" and not b.env_mask.any()
    assert engine.calls == [(2, 40), (1, 40 - call - reply)]  # turn 2 only for the episode that called a tool
    assert routes_a.shape[0] == 4 + len(a.response_tokens) and routes_b.shape[0] == 4 + 1



def test_silent_rollout_is_declared_dead_and_its_prompts_reissued(controller):
    from megatron_ernie.rl.controller import Peer
    from megatron_ernie.rl.control import LockedChannel
    import multiprocessing
    import time

    ctl = controller(lag=1)
    ours, theirs = multiprocessing.Pipe()
    peer = Peer("rollout", 0, 1, "h", LockedChannel(ours), time.monotonic(), version=0)
    ctl.peers.append(peer)
    ctl._issue_prompts()
    issued = sorted(peer.in_flight)
    assert len(issued) == 2 * ctl.system.rollout_batch_prompts == 2
    assert [type(theirs.recv_bytes()) for _ in issued] == [bytes, bytes]  # the requests really went out
    ctl._check_heartbeats()
    assert peer.alive  # within heartbeat_timeout_s
    peer.last_seen -= ctl.system.heartbeat_timeout_s + 1
    ctl._check_heartbeats()
    assert not peer.alive and ctl.counters.rollouts_died == 1 and ctl.counters.prompts_reissued_lost == 2
    assert sorted(r.prompt_id for r, _ in ctl.reissue) == sorted(p + "#1" for p in issued)
    assert not ctl.pending  # late samples of the lost attempts will be discarded


def test_rollout_tensor_errors_name_the_field_and_the_fix():
    from megatron_ernie.config.errors import ConfigError

    assert SystemConfig(rollout_workers=4, rollout_tensor=2).rollout_replicas(4, "rl.system") == 2
    with pytest.raises(ConfigError, match="rl.system.rollout_tensor = 2") as info:
        SystemConfig(rollout_workers=3, rollout_tensor=2).validate("rl.system")
    assert "multiple of rollout_tensor" in str(info.value)
    with pytest.raises(ConfigError, match="rl.system.rollout_tensor"):  # a Slurm rollout group of 3 tasks
        SystemConfig(rollout_workers=2, rollout_tensor=2).rollout_replicas(3, "rl.system")
    cfg = C.load(None, ["model.num_attention_heads=6", "model.num_query_groups=3", "model.ffn_hidden_size=96",
                        "moe.num_experts=4", "moe.expert_ffn_hidden_size=48"])
    with pytest.raises(ConfigError, match="model.num_query_groups = 3 is not divisible"):
        SystemConfig(rollout_workers=2, rollout_tensor=2).check_rollout_tensor(cfg.model, cfg.moe, "rl.system")
    SystemConfig(rollout_workers=3, rollout_tensor=3).check_rollout_tensor(cfg.model, cfg.moe, "rl.system")


def test_a_failed_weight_sync_is_retried_in_a_new_generation(controller):
    """Rebuilding a gloo group under a used store prefix waits on the old group's sockets (measured:
    connectFullMesh fails after the timeout), so a retry with the same members must get a new generation."""
    from megatron_ernie.rl.control import LockedChannel, SyncDone, SyncPlan
    from megatron_ernie.rl.controller import Peer
    from megatron_ernie.rl.protocol import WeightsReady
    import multiprocessing
    import time

    ctl = controller(lag=0)
    ends = {}
    for role in ("trainer", "rollout"):
        ours, theirs = multiprocessing.Pipe()
        peer = Peer(role, 0, 1, "h", LockedChannel(ours), time.monotonic(), version=0)
        ctl.peers.append(peer)
        ends[role] = (peer, LockedChannel(theirs))
    ctl.trainer = ends["trainer"][0]
    ctl._on_weights_ready(WeightsReady(1, ()))

    def plans() -> list[int]:
        ctl._maybe_plan_sync()
        return [end.recv().generation for _, end in ends.values()]

    assert plans() == [1, 1]
    ctl._on_sync_done(ends["rollout"][0], SyncDone(1, 1, False, detail="Connection closed by peer"))
    assert plans() == [2, 2]  # same members, new rendezvous namespace
    # the trainer's report of the same (generation 1) failure comes late: generation 2 is already out, so
    # no third generation (members working through stale plans would each wait out the others' timeouts)
    ctl._on_sync_done(ends["trainer"][0], SyncDone(1, 1, False, detail="Connection reset by peer"))
    ctl._maybe_plan_sync()
    assert not any(end.poll(0.05) for _, end in ends.values())
    assert ctl.counters.sync_failures == 2
    ctl._on_sync_done(ends["rollout"][0], SyncDone(1, 2, True))
    ctl._on_weights_ready(WeightsReady(2, ()))
    assert plans() == [2, 2]  # after a success the group is reused


def test_a_worker_still_loading_weights_gets_its_share_of_the_round(controller):
    """The first worker to finish a weight sync takes one batch, not two, while another is
    still loading the same version; once that one reports, both fill up to two batches."""
    from types import SimpleNamespace
    from megatron_ernie.rl.controller import Peer
    from megatron_ernie.rl.control import LockedChannel
    import multiprocessing
    import time

    ctl = controller(lag=0, per_step=4)
    pipes = [multiprocessing.Pipe() for _ in range(2)]
    first, second = (Peer("rollout", i, 1, "h", LockedChannel(ours), time.monotonic(), version=v)
                     for i, ((ours, _), v) in enumerate(zip(pipes, (0, -1))))
    ctl.peers += [first, second]
    ctl.latest_ready = SimpleNamespace(version=0)
    ctl._issue_prompts()
    assert (len(first.in_flight), len(second.in_flight)) == (1, 0)  # rollout_batch_prompts = 1
    second.version = 0
    ctl._issue_prompts()
    assert (len(first.in_flight), len(second.in_flight)) == (2, 2)


def test_the_next_rounds_prompts_follow_the_sync_plan_at_once(controller):
    """A rollout handles its messages in order, so prompts sent right behind a SyncPlan are generated
    with the planned weights: at lag 0 the next round goes out with the plan, not one round trip later
    (issue 14's hand-off), split evenly; a failed sync takes the promise back."""
    from megatron_ernie.rl.control import LockedChannel, SyncDone, SyncPlan
    from megatron_ernie.rl.controller import Peer
    from megatron_ernie.rl.protocol import PromptRequest, WeightsReady
    import multiprocessing
    import time

    ctl = controller(lag=0, per_step=4)
    ends = []
    for role, rank in (("trainer", 0), ("rollout", 0), ("rollout", 1)):
        ours, theirs = multiprocessing.Pipe()
        ctl.peers.append(Peer(role, rank, 1, "h", LockedChannel(ours), time.monotonic(), version=0))
        ends.append(LockedChannel(theirs))
    ctl.trainer, rollouts = ctl.peers[0], ctl.peers[1:]
    ctl.issued_useful = ctl.per_step  # round 0 is done: round 1 needs version 1
    ctl._issue_prompts()
    assert [len(r.in_flight) for r in rollouts] == [0, 0]
    ctl._on_weights_ready(WeightsReady(1, ()))  # plans version 1 at once
    ctl._issue_prompts()
    assert [len(r.in_flight) for r in rollouts] == [2, 2] and [r.version for r in rollouts] == [0, 0]
    for end in ends[1:]:
        kinds = [type(end.recv()) for _ in range(3)]
        assert kinds == [SyncPlan, PromptRequest, PromptRequest]  # the plan first: loaded before generating
    ctl._on_sync_done(rollouts[0], SyncDone(1, ctl.generation, False, detail="reset"))
    assert rollouts[0].next_version == 0 and rollouts[1].next_version == 1
    ctl._on_sync_done(rollouts[1], SyncDone(1, ctl.generation, True))
    assert rollouts[1].version == 1


def test_an_asynchronous_round_waits_for_the_sync_to_finish(controller):
    """At lag >= 1 prompts do not follow the plan (measured slower: see Controller._maybe_plan_sync)."""
    from megatron_ernie.rl.control import LockedChannel
    from megatron_ernie.rl.controller import Peer
    from megatron_ernie.rl.protocol import WeightsReady
    import multiprocessing
    import time

    ctl = controller(lag=1, per_step=4)
    for role in ("trainer", "rollout"):
        ours, _ = multiprocessing.Pipe()
        ctl.peers.append(Peer(role, 0, 1, "h", LockedChannel(ours), time.monotonic(), version=0))
    ctl.trainer, rollout = ctl.peers
    ctl.issued_useful = 2 * ctl.per_step  # rounds 0 and 1 are out: round 2 needs version 1
    ctl._on_weights_ready(WeightsReady(1, ()))
    ctl._issue_prompts()
    assert rollout.next_version == 0 and not rollout.in_flight


def test_samples_travel_as_one_message_per_batch_and_split_among_reward_workers(controller):
    """A rollout's batch is one SampleBatch; the controller gives each reward worker one contiguous
    share (one message each) and takes each worker's verdicts back as one ScoredBatch."""
    from megatron_ernie.rl.controller import Peer
    from megatron_ernie.rl.control import LockedChannel
    import multiprocessing
    import time

    ctl = controller(lag=1, per_step=2)
    ours, _ = multiprocessing.Pipe()
    rollout = Peer("rollout", 0, 1, "h", LockedChannel(ours), time.monotonic(), version=0)
    rewards, ends = [], []
    for rank in range(2):
        ours, theirs = multiprocessing.Pipe()
        rewards.append(Peer("reward", rank, 1, "h", LockedChannel(ours), time.monotonic()))
        ends.append(LockedChannel(theirs))
    ctl.peers += [rollout, *rewards]
    ctl._issue_prompts()
    requests = [request for request, _ in rollout.in_flight.values()]
    assert len(requests) == 2
    samples = tuple(sample(r.prompt_id, "arithmetic", "1", r.reference, i) for r in requests for i in range(2))
    ctl._dispatch(rollout, SampleBatch(samples))
    shares = [end.recv() for end in ends]
    assert [type(m) for m in shares] == [SampleBatch, SampleBatch]
    assert not any(end.poll(0.05) for end in ends)  # nothing else was sent
    assert [[(s.prompt_id, s.sample_index) for s in m.samples] for m in shares] == \
        [[(s.prompt_id, s.sample_index) for s in samples[:2]], [(s.prompt_id, s.sample_index) for s in samples[2:]]]
    for peer, share in zip(rewards, shares):
        assert len(peer.in_flight) == 2
        ctl._dispatch(peer, ScoredBatch(tuple(ScoredSample(s, float(s.sample_index), "ok") for s in share.samples)))
        assert not peer.in_flight
    assert not ctl.pending and ctl.buffer.ready(2)


def test_inline_tasks_are_scored_by_the_controller_and_the_rest_reach_workers_without_arrays(controller):
    """rl.system.inline_rewards: exact-match tasks are checked where their samples arrive; the reward
    worker gets the other samples stripped of their arrays, and its verdicts are joined back to the
    controller's own samples (arrays intact) before they enter the buffer."""
    from megatron_ernie.rl.controller import Peer
    from megatron_ernie.rl.control import LockedChannel
    import multiprocessing
    import time

    ctl = controller(lag=1, per_step=2, inline=True)
    ours, _ = multiprocessing.Pipe()
    rollout = Peer("rollout", 0, 1, "h", LockedChannel(ours), time.monotonic(), version=0)
    ours, theirs = multiprocessing.Pipe()
    reward, end = Peer("reward", 0, 1, "h", LockedChannel(ours), time.monotonic()), LockedChannel(theirs)
    ctl.peers += [rollout, reward]
    ctl._issue_prompts()
    (arith, _), (other, _) = list(rollout.in_flight.values())
    samples = [sample(arith.prompt_id, "arithmetic", arith.reference, arith.reference, i) for i in range(2)] + \
              [sample(other.prompt_id, "code", "print(1)", "{}", i) for i in range(2)]
    ctl._dispatch(rollout, SampleBatch(tuple(samples)))
    share = end.recv()
    assert [(s.task, s.sample_index) for s in share.samples] == [("code", 0), ("code", 1)]
    assert all(len(s.response_tokens) == len(s.prompt_tokens) == 0 and s.routed_experts is None
               for s in share.samples)
    assert arith.prompt_id not in ctl.pending and other.prompt_id in ctl.pending  # arithmetic done here
    ctl._dispatch(reward, ScoredBatch(tuple(ScoredSample(s, 0.25, "wrong") for s in share.samples)))
    assert not reward.in_flight and not ctl.pending and ctl.buffer.ready(2)
    groups = ctl.buffer.pop_batch(2)
    by_task = {g[0].sample.task: g for g in groups}
    assert [s.reward for s in by_task["arithmetic"]] == [1.0, 1.0]
    assert [s.reward for s in by_task["code"]] == [0.25, 0.25]
    assert all(list(s.sample.prompt_tokens) == [2, 3] and list(s.sample.response_tokens) == [4]
               for g in groups for s in g)  # the verdicts carry the controller's whole samples



def test_the_controller_scores_a_batch_itself_with_the_memo_when_no_reward_worker_is_alive(controller):
    from megatron_ernie.config.errors import ConfigError
    from megatron_ernie.rl.controller import Peer
    from megatron_ernie.rl.control import LockedChannel
    import multiprocessing
    import time

    with pytest.raises(ConfigError, match=r"rl.system.reward_concurrency = 0"):
        SystemConfig(reward_concurrency=0).validate("rl.system")
    ctl = controller(lag=1, per_step=1)
    ours, _ = multiprocessing.Pipe()
    rollout = Peer("rollout", 0, 1, "h", LockedChannel(ours), time.monotonic(), version=0)
    ctl.peers.append(rollout)
    ctl._issue_prompts()
    (request, _), = list(rollout.in_flight.values())[:1]
    assert ctl.n == 2
    ctl._dispatch(rollout, SampleBatch(tuple(sample(request.prompt_id, "arithmetic", request.reference,
                                                    request.reference, i) for i in range(2))))
    assert ctl._local_scorer().scored == 1  # the same answer twice, of a deterministic task: verified once
    assert ctl.counters.samples_discarded == 0 and request.prompt_id not in ctl.pending


def test_console_line_says_none_for_a_step_without_same_version_samples():
    """A step whose samples were all stale has no numerics K3; the console says so instead of "nan"."""
    from megatron_ernie.rl.metrics import _console_line
    row = {"step": 3, "reward/mean": 0.5, "policy/rollout_kl_k3": 2e-3, "trainer/idle_fraction": 0.1,
           "rollout/tokens_per_s": 100.0}
    assert "(same-version none)" in _console_line(row)
    assert "(same-version 4.0e-06)" in _console_line({**row, "policy/rollout_kl_k3_numerics": 4e-6})
