"""The rollout role: takes prompts from the controller, generates, returns Samples; new weights in between.

Loop: drain the controller's messages (prompt requests queue up; a SyncPlan is
served at once: join the broadcast, load the weights, report), then generate
one batch of queued prompts with the weights of the version currently held,
send the batch's Samples as one SampleBatch and a RolloutStats. Weights therefore change
only between generation batches, and every Sample carries the version that
produced it. A worker holds no state the run needs: when it dies, the
controller reissues its prompts elsewhere.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque

import torch.distributed as dist

from megatron_ernie.rl.control import Heartbeats, Hello, SyncDone, SyncPlan, RolloutStats, connect, recv_or_none
from megatron_ernie.rl.protocol import PromptRequest, Sample, SampleBatch, Shutdown
from megatron_ernie.rl.rollout.engine import GenerationEngine, SamplingParams
from megatron_ernie.rl.task_tokenizer import tokenizer_for
from megatron_ernie.rl.weight_sync import GroupAddress, connect_group, receive_weights

log = logging.getLogger("megatron_ernie.rl.rollout")


def init_solo_world(seed: int):
    """This process as a torch world of one (megatron-core needs its groups even unsharded)."""
    from megatron_ernie.runtime import cpu_compat, distributed, groups as G
    from megatron_ernie.runtime.dims import ParallelDims

    cpu_compat.apply()
    if not dist.is_initialized():
        distributed.init_world_of_one()
    groups = G.build_groups(ParallelDims(world=1))
    G.model_parallel_seed(seed)
    return groups


class RolloutWorker:
    def __init__(self, engine: GenerationEngine, tokenizer, sampling, system, channel, rank: int = 0):
        self.engine, self.tokenizer, self.sampling = engine, tokenizer, sampling
        self.system, self.channel, self.rank = system, channel, rank
        self.queue: deque[PromptRequest] = deque()
        self._group, self._generation = None, -1
        self.shutdown: Shutdown | None = None

    def run(self) -> int:
        while self.shutdown is None:
            self._drain(timeout_s=0.0 if self._can_generate() else 0.2)
            if self.shutdown is None and self._can_generate():
                self._gather_batch()
            if self.shutdown is None and self._can_generate():
                self._generate_batch()
        return 75 if self.shutdown.reason == "requeue" else 0

    def _can_generate(self) -> bool:
        return bool(self.queue) and self.engine.policy_version >= 0

    def _drain(self, timeout_s: float) -> None:
        message = recv_or_none(self.channel, timeout_s)
        while message is not None:
            self._handle(message)
            if self.shutdown is not None:
                return
            message = recv_or_none(self.channel, 0.0)

    def _gather_batch(self) -> None:
        """Wait briefly for the rest of a batch before generating a part of one.

        The controller sends prompts one message at a time, in a burst. A worker
        that generated as soon as the first arrived would run the round as one
        batch of a single prompt and another of the rest; a decode step costs
        almost the same for 8 sequences as for 64 (measured 1.19 s vs 1.52 s for
        56 new tokens at the benchmark's model on CPU), so waiting for the burst
        to end (no message for rollout_batch_wait_s, or a full batch) is cheaper.
        """
        while self.shutdown is None and len(self.queue) < self.system.rollout_batch_prompts:
            message = recv_or_none(self.channel, self.system.rollout_batch_wait_s)
            if message is None:
                return
            self._handle(message)

    def _handle(self, message) -> None:
        if isinstance(message, PromptRequest):
            self.queue.append(message)
        elif isinstance(message, SyncPlan):
            self._sync(message)
        elif isinstance(message, Shutdown):
            self.shutdown = message
        else:
            log.warning(f"rollout {self.rank}: ignoring unexpected {type(message).__name__}")

    # ---------------------------------------------------------------- weights
    def _sync(self, plan: SyncPlan) -> None:
        try:
            if plan.generation != self._generation:
                self._group = None  # the old group's members changed; never reuse it
                self._group = connect_group(GroupAddress(plan.host, plan.port, plan.generation, plan.rank,
                                                         plan.size), self.system.sync_timeout_s)
                self._generation = plan.generation
            tensors, stats = receive_weights(self._group, plan.ready, self.engine.weight_shapes())
            self.engine.load_weights(tensors, plan.ready.version)
            self.channel.send(SyncDone(plan.ready.version, plan.generation, True, stats.nbytes, stats.seconds))
        except (RuntimeError, ValueError) as exc:  # gloo reports a dead peer or a timeout as RuntimeError
            self._group, self._generation = None, -1
            self.channel.send(SyncDone(plan.ready.version, plan.generation, False, detail=str(exc)[:300]))

    # ------------------------------------------------------------- generation
    def _take_batch(self) -> list[PromptRequest]:
        first = self.queue.popleft()
        batch = [first]
        while self.queue and len(batch) < self.system.rollout_batch_prompts \
                and self.queue[0].max_new_tokens == first.max_new_tokens:
            batch.append(self.queue.popleft())
        return batch

    def _generate_batch(self) -> None:
        requests = self._take_batch()
        params = SamplingParams.from_config(self.sampling, self.tokenizer.eod_id, requests[0].max_new_tokens)
        prompts = [r.prompt_tokens.tolist() for r in requests for _ in range(r.n_samples)]
        version, start = self.engine.policy_version, time.perf_counter()
        if self.system.agent_max_turns > 1:
            samples = iter(self._episodes(requests, prompts, params, version))
        else:
            generations = iter(self.engine.generate(prompts, params))
            samples = (self._sample(r, i, next(generations), version) for r in requests for i in range(r.n_samples))
        samples = tuple(samples)
        tokens = sum(int(sample.loss_mask().sum()) for sample in samples)
        self.channel.send(SampleBatch(samples))
        self.channel.send(RolloutStats(version, len(prompts), tokens, time.perf_counter() - start))

    def _sample(self, request: PromptRequest, index: int, generation, version: int) -> Sample:
        return Sample(prompt_id=request.prompt_id, sample_index=index, task=request.task,
                      prompt_tokens=request.prompt_tokens, response_tokens=generation.response_tokens,
                      rollout_logprobs=generation.logprobs, policy_version=version,
                      routed_experts=generation.routed_experts,
                      response_text=self.tokenizer.decode(generation.response_tokens),
                      reference=request.reference, finish_reason=generation.finish_reason)

    def _episodes(self, requests, prompts, params, version: int) -> list[Sample]:
        """Multi-turn tool-use episodes (agent_loop.py), one Sample each with env-token masks."""
        from megatron_ernie.rl.rollout.agent_loop import run_episodes

        results = iter(run_episodes(self.engine, self.tokenizer, prompts, params, self.system.agent_max_turns))
        samples = []
        for request in requests:
            for index in range(request.n_samples):
                episode, routes = next(results)
                samples.append(Sample(
                    prompt_id=request.prompt_id, sample_index=index, task=request.task,
                    prompt_tokens=request.prompt_tokens, response_tokens=episode.response_tokens,
                    rollout_logprobs=episode.rollout_logprobs, policy_version=version, routed_experts=routes,
                    env_mask=episode.env_mask, response_text=self.tokenizer.decode(episode.response_tokens),
                    reference=request.reference, finish_reason="length" if episode.truncated else "stop"))
        return samples


def run_rollout(cfg, system, rank: int, address, authkey: bytes) -> int:
    """The rollout role's main: a whole model per process, or one member of a TP replica.

    With rl.system.rollout_tensor = t, rollout processes [k*t, (k+1)*t) form
    replica k (rollout/replica.py): followers serve their leader, and the
    leader alone serves the controller, as rollout `k`.
    """
    from megatron_ernie.rl.rollout.replica import ReplicaEngine, init_replica_world, serve_replica

    tokenizer = tokenizer_for(cfg, agent=system.agent_max_turns > 1)
    if system.rollout_tensor == 1:
        engine = _build_engine(cfg, system, init_solo_world(_replica_seed(cfg, rank)), rank, tokenizer.vocab_size)
        return _serve_controller(engine, tokenizer, cfg, system, rank, address, authkey)
    groups, control = init_replica_world(system, _replica_seed(cfg, 0))
    replica, member = divmod(dist.get_rank(), system.rollout_tensor)
    engine = _build_engine(cfg, system, groups, replica, tokenizer.vocab_size)
    if member:
        return serve_replica(engine, control)
    leader = ReplicaEngine(engine, control, system.rollout_dtype, system.sync_bucket_mb)
    return _serve_controller(leader, tokenizer, cfg, system, replica, address, authkey)


def _serve_controller(engine, tokenizer, cfg, system, rank: int, address, authkey: bytes) -> int:
    from megatron_ernie.rl.rollout.replica import ReplicaLost

    channel = connect(address, authkey, Hello("rollout", rank, os.getpid(), socket.gethostname()))
    beats = Heartbeats(channel, "rollout", rank, system.heartbeat_s)
    try:
        return RolloutWorker(engine, tokenizer, cfg.rl.sampling, system, channel, rank).run()
    except EOFError:
        log.error(f"rollout {rank}: the controller closed the connection; exiting")
        return 1
    except ReplicaLost as exc:  # exiting makes the controller declare this rollout dead and reissue its prompts
        log.error(f"rollout replica {rank}: a member is gone ({exc}); exiting")
        return 1
    finally:
        beats.stop()
        engine.close()


def _replica_seed(cfg, replica: int) -> int:
    return cfg.run.seed + 7919 * (replica + 1)


def _build_engine(cfg, system, groups, replica: int, vocab_size: int):
    from megatron_ernie.model.extensions import extensions_for
    from megatron_ernie.rl.rollout.megatron_engine import MegatronEngine

    return MegatronEngine(cfg.model, cfg.moe, groups, vocab_size,
                          dtype=system.rollout_dtype, seed=_replica_seed(cfg, replica),
                          ext=extensions_for(cfg.model, cfg.moe, fp8=system.role_fp8(cfg.fp8, "rollout")),
                          share_fp8_scales=system.shares_fp8_scales(cfg.fp8), tensor=system.rollout_tensor)
