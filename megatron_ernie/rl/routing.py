"""Rollout routing replay (R3): the trainer routes every token to the experts the rollout engine chose.

Why: an MoE router is a discontinuous function (top-k). The rollout engine
(bf16, KV-cached decoding, other kernels) and the trainer (fp32, whole
sequences) compute slightly different router logits, so for tokens near a tie
they pick different experts, and the trainer's log-prob of the sampled token
then comes from a different sub-network than the one that produced it. That
mismatch dominates the train/inference KL of MoE RL. Replaying the rollout's
choices makes the routing identical and leaves only numerical noise (Ma et
al., "Stabilizing MoE Reinforcement Learning by Aligning Training and
Inference Routers", arXiv:2510.11370).

Built on megatron-core 0.16.1's `RouterReplay` hook (TopKRouter calls
`router_replay.get_replay_topk(scores, ...)` when the attribute is set), with
its pitfalls fixed:
  * megatron keeps ONE process-global list of replay objects in construction
    order and matches replay data to it by position. Two models in one process
    (trainer + reference, or trainer + rollout in a test) would interleave in
    that list, and with virtual pipeline chunks construction order is not layer
    order. Here each model gets its own `RoutingReplay`, our replay objects are
    removed from the global list, and routers are addressed by their global
    layer number, so a pipeline stage picks exactly the layers it owns.
  * the replayed gate weights are recomputed: probs = scores.gather(replayed
    indices) from the router's current logits (megatron's REPLAY_FORWARD does
    the same), so the router still receives gradients under replay.
  * rows without a recorded choice (the last response token is never fed
    through the rollout model; padding) are marked -1 and fall back to the
    router's own top-k instead of indexing out of range.
  * alignment: routers see tokens flattened sequence-major ([s, b] -> s*b);
    `set_targets` takes [b, s, moe_layers, k] like the Sample arrays and
    transposes; under sequence parallelism each TP rank takes its s-slice.

Modes: "off" (plain top-k), "record" (plain top-k, remember the choices: the
rollout engine), "compare" (plain top-k, count where it differs from the
targets), "replay" (use the targets, also count where plain top-k would have
differed).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay
from megatron.core.utils import unwrap_model

MODES = ("off", "record", "compare", "replay")


class LayerReplay(RouterReplay):
    """Replay state of one router; not registered in megatron's global list."""

    def __init__(self, moe_index: int):
        super().__init__()
        RouterReplay.global_router_replay_instances.remove(self)
        self.moe_index = moe_index
        self.mode = "off"
        self.recorded: list[torch.Tensor] = []
        self.mismatched_rows = 0
        self.compared_rows = 0
        self.key, self.batch_size = None, 0  # the micro-batch whose targets are set (set_targets)
        self.sequence_flips: dict = {}  # key -> bool [batch]: some token of the sequence routed differently

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, computed = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.mode in ("compare", "replay") and self.target_topk_idx is not None:
            target = self._checked_target(scores.shape[0], topk).to(scores.device)
            valid = (target >= 0).all(dim=-1)
            self._count(computed, target, valid)
            if self.mode == "replay":
                computed = torch.where(valid.unsqueeze(-1), target, computed)
                probs = scores.gather(1, computed)
        if self.mode != "off":
            self.recorded.append(computed.detach())
        return probs, computed

    def _checked_target(self, num_tokens: int, topk: int) -> torch.Tensor:
        target = self.target_topk_idx
        if tuple(target.shape) != (num_tokens, topk):
            raise ValueError(f"routing replay for MoE layer {self.moe_index}: targets of shape "
                             f"{tuple(target.shape)} for {num_tokens} tokens x top-{topk}; the routed "
                             "experts must cover every token of the batch (prompt + response)")
        return target.long()

    def _count(self, computed, target, valid) -> None:
        same = (computed.sort(dim=-1).values == target.sort(dim=-1).values).all(dim=-1)
        flipped = ~same & valid
        self.mismatched_rows += int(flipped.sum())
        self.compared_rows += int(valid.sum())
        if self.key is not None:  # rows are sequence-major [s, b]: a sequence flipped if any of its rows did
            per_sequence = flipped.reshape(-1, self.batch_size).any(dim=0).cpu()
            previous = self.sequence_flips.get(self.key)
            self.sequence_flips[self.key] = per_sequence if previous is None else previous | per_sequence


class RoutingReplay:
    """The replay objects of one model's local routers, keyed by MoE layer index (0-based among MoE layers)."""

    def __init__(self, chunks, tconfig, sp_rank: int = 0, sp_size: int = 1):
        freq = tconfig.moe_layer_freq
        freq = freq if isinstance(freq, list) else [1 if i % freq == 0 else 0 for i in range(tconfig.num_layers)]
        self.moe_layer_numbers = [i + 1 for i, f in enumerate(freq) if f]  # global, 1-based
        self.topk = tconfig.moe_router_topk
        self.sp_rank, self.sp_size = sp_rank, sp_size
        self.layers: dict[int, LayerReplay] = {}
        for chunk in chunks:
            for module in unwrap_model(chunk).modules():
                if isinstance(module, TopKRouter):
                    index = self.moe_layer_numbers.index(module.layer_number)
                    module.router_replay = self.layers[index] = LayerReplay(index)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_numbers)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"routing replay mode {mode!r}: choose one of {MODES}")
        for layer in self.layers.values():
            layer.mode = mode

    def set_targets(self, routes: torch.Tensor | None, key=None) -> None:
        """routes: int [b, s, moe_layers, k] (-1 = no recorded choice), or None to clear.

        key: names the micro-batch (e.g. its index) to record, per sequence, whether
        any of its tokens routed differently from the target (take_sequence_flips)."""
        for index, layer in self.layers.items():
            layer.key = None if routes is None else key
            if routes is None:
                layer.target_topk_idx = None
                continue
            layer.batch_size = routes.shape[0]
            if routes.dim() != 4 or routes.shape[2:] != (self.num_moe_layers, self.topk):
                raise ValueError(f"routed experts of shape {tuple(routes.shape)}: expected "
                                 f"[batch, seq, {self.num_moe_layers} MoE layers, top-{self.topk}]")
            per_layer = routes[:, :, index].transpose(0, 1)  # [s, b, k], the router's token order
            if self.sp_size > 1:
                per_layer = per_layer.chunk(self.sp_size, dim=0)[self.sp_rank]
            layer.target_topk_idx = per_layer.reshape(-1, self.topk)

    def take_recorded(self) -> dict[int, list[torch.Tensor]]:
        """Choices made since the last call, per MoE layer, one [tokens, k] tensor per forward."""
        taken = {}
        for index, layer in self.layers.items():
            taken[index], layer.recorded = layer.recorded, []
        return taken

    def take_sequence_flips(self) -> dict:
        """key -> bool [b]: sequences with at least one route flip in this rank's MoE layers, since the last call.

        A flip is a (token, layer) whose own top-k set differs from the target. Few
        sequences hold most of the train/inference mismatch when their tokens sit at
        a router near-tie, so the share of sequences with any flip says how
        concentrated it is. Other pipeline stages and TP (sequence-parallel) ranks see
        other layers and tokens: callers OR the flags across ranks."""
        taken: dict = {}
        for layer in self.layers.values():
            for key, flags in layer.sequence_flips.items():
                taken[key] = flags if key not in taken else taken[key] | flags
            layer.sequence_flips = {}
        return taken

    def take_mismatch(self) -> tuple[int, int]:
        """(rows whose own top-k set differs from the target, rows compared) since the last call."""
        mismatched = compared = 0
        for layer in self.layers.values():
            mismatched, compared = mismatched + layer.mismatched_rows, compared + layer.compared_rows
            layer.mismatched_rows = layer.compared_rows = 0
        return mismatched, compared
