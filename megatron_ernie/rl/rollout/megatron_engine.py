"""Generation with the trainer's megatron-core GPTModel and a KV cache (CPU or GPU).

megatron-core's inference engines assume CUDA, but its model-level KV cache
(`StaticInferenceContext`, passed as `inference_context`) works on CPU once
runtime.cpu_compat is applied: attention appends each step's keys and values
to per-layer buffers and RoPE uses the context's offset. Checked: KV-cached
incremental logits equal full-sequence logits to 2e-7 in fp32.

Static batching, as in megatron's static text-generation controller: every
sequence of a batch shares one cache offset. The batch is prefilled up to the
shortest prompt; from there one token per step is fed for every sequence,
where a sequence still inside its (longer) prompt is fed its prompt token and
the sampled token is discarded. Finished sequences keep being fed padding
until the whole batch is done (or max_new_tokens).

FP8: `ext` carries the `[fp8]` spec rewrite when the rollout runs FP8 (the
same emulated linears the trainer uses). With `share_fp8_scales` (unified FP8,
delayed scaling) every weight update also carries the trainer's forward scales,
which the engine installs and freezes (precision/sharing.py), so generation
quantises exactly like the trainer's next forward.

Routing: the engine's `RoutingReplay` runs in "record" mode; each forward
records [tokens, k] expert ids per MoE layer, which are scattered into
[batch, position, moe_layer, k] and returned per sequence (int16, -1 where a
position was never fed: the last sampled token).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_ernie.config.schema import ParallelConfig
from megatron_ernie.model import init as model_init
from megatron_ernie.model.build import build_chunks, padded_vocab_size, transformer_config
from megatron_ernie.model.extensions import Extensions
from megatron_ernie.precision.sharing import install_scales, scale_names, scaling_holders, split_scales
from megatron_ernie.rl.rollout.engine import Generation, GenerationEngine, SamplingParams
from megatron_ernie.rl.rollout.sampling import sample_next
from megatron_ernie.rl.routing import RoutingReplay
from megatron_ernie.rl.weight_sync import global_shapes, load_global, shard_views


class MegatronEngine(GenerationEngine):
    """This process's part of one model replica: the whole model, or one of `tensor` TP shards.

    With tensor > 1 the replica's processes must run every call together
    (rollout/replica.py). Sequence parallelism stays off: a decode step feeds
    one token per sequence, which cannot be split over TP ranks, and
    megatron-core allows MoE with TP but without SP outside training.
    """

    def __init__(self, model_cfg, moe_cfg, groups, vocab_size: int, dtype: str = "bf16", seed: int = 0,
                 ext: Extensions = Extensions(), share_fp8_scales: bool = False, tensor: int = 1):
        model_cfg = dataclasses.replace(model_cfg, dtype=dtype)
        self.tconfig = transformer_config(model_cfg, moe_cfg, ParallelConfig(tensor=tensor),
                                          **{**ext.tconfig, "sequence_parallel": False})
        chunks = build_chunks(self.tconfig, model_cfg, groups, padded_vocab_size(vocab_size, tensor), ext)
        model_init.init_layout_invariant(chunks, seed, model_cfg.init_method_std, model_cfg.num_layers)
        self.model = chunks[0]
        self.model.eval()
        self.routing = RoutingReplay(chunks, self.tconfig) if moe_cfg.num_experts else None
        self.views = shard_views(chunks)
        self.scale_holders = scaling_holders(chunks) if share_fp8_scales else {}
        if share_fp8_scales and not self.scale_holders:
            raise ValueError("share_fp8_scales needs a model with delayed-scaling FP8 linears (fp8.recipe = "
                             "\"delayed\" in the rollout's extensions)")
        self.vocab_size, self.max_seq_length = vocab_size, model_cfg.seq_length
        self.generator = torch.Generator().manual_seed(seed)
        self.policy_version = -1

    # ---------------------------------------------------------------- weights
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**global_shapes(self.views), **{name: (1,) for name in scale_names(self.scale_holders)}}

    def load_weights(self, tensors: Mapping[str, torch.Tensor], version: int) -> None:
        weights, scales = split_scales(tensors)
        load_global(self.views, weights)
        if self.scale_holders:
            install_scales(self.scale_holders, scales)
        self.policy_version = version

    # ------------------------------------------------------------- generation
    def _forward(self, tokens: torch.Tensor, start: int, context) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        logits = self.model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
        return logits[:, -1, : self.vocab_size].float()

    def _record(self, routes: torch.Tensor, start: int, length: int) -> None:
        if self.routing is None:
            return
        for layer, recorded in self.routing.take_recorded().items():
            ids = recorded[-1].view(length, routes.shape[0], -1).transpose(0, 1)
            routes[:, start:start + length, layer] = ids.to(routes.dtype)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        batch = _Batch(prompts, params, self.max_seq_length)
        routes = self._route_buffer(batch)
        if self.routing is not None:
            self.routing.set_mode("record")
        context = StaticInferenceContext(len(prompts), batch.total)
        first = batch.shortest_prompt
        logits = self._forward(batch.tokens[:, :first], 0, context)
        self._record(routes, 0, first)
        context.sequence_len_offset = first
        context.enable_decode_mode()
        for pos in range(first, batch.total):
            tokens, logprobs = sample_next(logits, params.temperature, params.top_k, params.top_p, self.generator)
            batch.place(pos, tokens, logprobs)
            if batch.all_done() or pos + 1 == batch.total:
                break
            logits = self._forward(batch.tokens[:, pos:pos + 1], pos, context)
            self._record(routes, pos, 1)
            context.sequence_len_offset = pos + 1
        if self.routing is not None:
            self.routing.set_mode("off")
        return batch.results(routes)

    def _route_buffer(self, batch: "_Batch") -> torch.Tensor | None:
        if self.routing is None:
            return None
        shape = (batch.size, batch.total, self.routing.num_moe_layers, self.routing.topk)
        return torch.full(shape, -1, dtype=torch.int16)


class _Batch:
    """Token buffer and per-sequence progress of one static batch."""

    def __init__(self, prompts, params: SamplingParams, max_seq_length: int):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs at least one prompt, and prompts must not be empty")
        self.params = params
        self.lengths = torch.tensor([len(p) for p in prompts])
        self.total = int(self.lengths.max()) + params.max_new_tokens
        if self.total > max_seq_length:
            raise ValueError(f"longest prompt ({int(self.lengths.max())} tokens) + max_new_tokens "
                             f"({params.max_new_tokens}) = {self.total} exceeds model.seq_length = {max_seq_length}: "
                             "shorten rl.sampling.max_new_tokens or raise model.seq_length")
        self.size = len(prompts)
        self.shortest_prompt = int(self.lengths.min())
        self.tokens = torch.ones((self.size, self.total), dtype=torch.long)  # 1 = pad
        for i, prompt in enumerate(prompts):
            self.tokens[i, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
        self.logprobs = torch.zeros((self.size, self.total), dtype=torch.float32)
        self.generated = torch.zeros(self.size, dtype=torch.long)
        self.done = torch.zeros(self.size, dtype=torch.bool)
        self.stopped = torch.zeros(self.size, dtype=torch.bool)

    def place(self, pos: int, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Write the sampled tokens of sequences that are generating at `pos`; update stop state."""
        active = (pos >= self.lengths) & ~self.done
        self.tokens[active, pos] = tokens[active]
        self.logprobs[active, pos] = logprobs[active]
        self.generated += active.long()
        for i in torch.nonzero(active).flatten().tolist():
            if self._stops(i, pos):
                self.done[i] = self.stopped[i] = True
        self.done |= self.generated >= self.params.max_new_tokens

    def _stops(self, i: int, pos: int) -> bool:
        if int(self.tokens[i, pos]) in self.params.stop_token_ids:
            return True
        response = self.tokens[i, int(self.lengths[i]): pos + 1].tolist()
        return any(len(s) <= len(response) and tuple(response[-len(s):]) == s for s in self.params.stop_sequences)

    def all_done(self) -> bool:
        return bool(self.done.all())

    def results(self, routes: torch.Tensor | None) -> list[Generation]:
        out = []
        for i in range(self.size):
            start, n = int(self.lengths[i]), int(self.generated[i])
            route = None if routes is None else routes[i, : start + n].numpy().copy()
            out.append(Generation(self.tokens[i, start:start + n].numpy().astype(np.int32),
                                  self.logprobs[i, start:start + n].numpy().copy(), route,
                                  "stop" if bool(self.stopped[i]) else "length"))
        return out
