"""The trainer's RL step on megatron-core: policy-gradient loss through the pipeline schedules.

Same machinery as pretraining (build_model, megatron's DDP, optimizer,
get_forward_backward_func with calculate_per_token_loss), with a different
forward step: the model returns logits, the loss function turns them into
per-token log-probs of the sampled tokens and applies `algorithms.rl_loss`
(GRPO advantages, PPO clip, TIS against the rollout log-probs, optional K3
to a frozen reference, entropy). Each micro-batch returns its *sum* of
per-token losses and its token count, so megatron divides gradients by the
token count of the whole global batch: "token-mean" aggregation stays exact
whatever the micro-batch / DP / PP split.

Reference policy (kl_coef > 0): a frozen copy with the policy's layout. Before
each step it runs forward-only over the same micro-batches through the same
pipeline schedule, and the last stage keeps its log-probs for the loss; so
the K3 penalty works at any TP/PP/VPP/EP layout.

One optimizer step per batch: pi_old is the current weights (detached), so
the PPO ratio is 1 and the clip only acts through importance correction;
clip fraction is still reported. Stale samples are corrected by TIS, whose
weights use the rollout's log-probs.

On-policy distillation (advantage = "opd"): the last stage turns the
teacher's log-probs of the sampled tokens and the trainer's own detached
log-probs into per-token advantages (algorithms.opd_advantages) for the
clipped loss with TIS. Payload "full" instead adds the exact reverse KL to the
teacher's rows, computed on this rank's vocabulary shard (no gather of the
logits); its advantage keeps only alpha * the GRPO term, since the sampled
estimate and the exact KL have the same expected gradient and together would
count the distillation signal twice. Per-teacher k1/k3/|A|/token share are
summed like the other metrics and named distill/<alias>/...

Routing: with rl.system.routing_replay the trainer replays the rollout's
experts (routing.py, mode "replay"), else it only compares ("compare"). Both
count where the trainer's own router disagrees with the rollout.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.model.build import build_chunks, build_model, padded_vocab_size, transformer_config
from megatron_ernie.model.extensions import extensions_for
from megatron_ernie.precision.model import commit_step_scaling, set_scaling_mode
from megatron_ernie.rl.algorithms import (TEACHER_SUM_COLUMNS, entropy_from_logits, masked_mean, opd_advantages,
                                          rl_loss, rollout_kl_k3, teacher_metrics, teacher_reverse_kl, teacher_sums,
                                          token_logprobs)
from megatron_ernie.rl.batch import PolicyBatch
from megatron_ernie.rl.routing import RoutingReplay
from megatron_ernie.rl.weight_sync import shard_views
from megatron_ernie.train.optim import build_optimizer, build_scheduler

METRICS = ("pg_loss", "clip_fraction", "ratio_mean", "rollout_kl_k3", "entropy", "ref_kl_k3")


class PolicyTrainer:
    """Model, optimizer and the RL train step of one trainer rank."""

    def __init__(self, cfg, groups, vocab_size: int, routing_replay: bool = True, fp8=None,
                 fp8_per_step: bool = False):
        """fp8: the trainer's FP8 settings (rl.system.role_fp8); None takes cfg.fp8.
        fp8_per_step: delayed-scaling amaxes enter the history once per optimizer step, so all
        micro-batches of a step quantise with the scales the rollout engines were sent."""
        if groups.dims.cp > 1:
            raise ConfigError("parallel.context", groups.dims.cp, "RL training supports context = 1 for now")
        self.cfg, self.groups, self.vocab_size = cfg, groups, vocab_size
        self.algorithm, self.temperature = cfg.rl.algorithm, cfg.rl.sampling.temperature
        self.distill = cfg.rl.distill if self.algorithm.advantage == "opd" else None
        ext = extensions_for(cfg.model, cfg.moe, fp8=cfg.fp8 if fp8 is None else fp8)
        self.tconfig, self.model = build_model(cfg.model, cfg.moe, cfg.parallel, groups, vocab_size, cfg.run.seed, ext)
        self.optimizer = build_optimizer(cfg.optimizer, cfg.parallel, self.model, groups.pgs,
                                         bf16=cfg.model.dtype == "bf16")
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, cfg.schedule, cfg.train.iters)
        self.routing = self._routing(self.model)
        self.replay = routing_replay and self.routing is not None
        self.views = shard_views(self.model)
        self.fp8_per_step = fp8_per_step
        if fp8_per_step and not set_scaling_mode(self.model, "per_step"):
            raise ValueError("fp8_per_step needs delayed-scaling FP8 layers (fp8.recipe = \"delayed\")")
        self.reference = self._reference(ext) if self.algorithm.kl_coef > 0 else None
        self._ref_logprobs: list[torch.Tensor] = []  # this step's, per micro-batch (last pipeline stage)
        self.version = 0

    def _routing(self, chunks, tconfig=None) -> RoutingReplay | None:
        if not self.cfg.moe.num_experts:
            return None
        tconfig = tconfig or self.tconfig
        sp = tconfig.sequence_parallel
        return RoutingReplay(chunks, tconfig, self.groups.tp_rank if sp else 0, self.groups.dims.tp if sp else 1)

    def _reference(self, ext):
        """A frozen copy of the initial policy for the K3 penalty: same layout, own routers and replay state.

        One chunk per virtual-pipeline stage of this rank, like the policy, so
        the reference runs through megatron-core's pipeline schedule too.
        """
        # a fresh TransformerConfig: the trainer's carries DDP hooks (process groups), which modules deep-copy
        tconfig = transformer_config(self.cfg.model, self.cfg.moe, self.cfg.parallel, **ext.tconfig)
        chunks = build_chunks(tconfig, self.cfg.model, self.groups,
                              padded_vocab_size(self.vocab_size, self.groups.dims.tp), ext)
        for reference, policy in zip(chunks, self.model):
            reference.load_state_dict(policy.module.state_dict(), strict=True)
            reference.eval()
        return chunks, self._routing(chunks, tconfig)

    # -------------------------------------------------------------- log-probs
    def _vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of the real tokens (padding rows cut), divided by the sampling temperature."""
        if self.groups.dims.tp > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.vocab_size].float() / self.temperature

    def _set_routes(self, routing, mb: dict, mode: str) -> None:
        if routing is not None:
            routing.set_mode(mode)
            routing.set_targets(mb.get("routes"))

    def _reference_step(self, data_iterator, model):
        mb = next(data_iterator)
        self._set_routes(self.reference[1], mb, "replay" if self.replay else "off")
        return model(mb["tokens"], mb["position_ids"], None), partial(self._keep_reference, mb)

    def _keep_reference(self, mb: dict, logits):
        logprobs = token_logprobs(self._vocab_logits(logits), mb["labels"])
        return logits.new_zeros(()), torch.ones((), dtype=torch.int), {"ref_logprobs": logprobs.detach()}

    def _reference_pass(self, micro: list[dict], seq_length: int) -> list[torch.Tensor]:
        """Reference log-probs of every micro-batch, forward-only through the pipeline schedule.

        Returned on the last pipeline stage (where the loss needs them), in
        micro-batch order; empty on the other stages.
        """
        chunks = self.reference[0]
        dims = self.groups.dims
        fb = get_forward_backward_func(pp_size=dims.pp, vp_size=dims.vpp if dims.vpp > 1 else None)
        iterators = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
        with torch.no_grad():
            outputs = fb(forward_step_func=self._reference_step, data_iterator=iterators, model=chunks,
                         num_microbatches=len(micro), seq_length=seq_length,
                         micro_batch_size=self.cfg.train.micro_batch_size, forward_only=True)
        return [o["ref_logprobs"] for o in outputs]

    # ------------------------------------------------------------- the step
    def _forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        ref_logprobs = self._ref_logprobs[mb["index"]] if self._ref_logprobs else None
        self._set_routes(self.routing, mb, "replay" if self.replay else "compare")
        output = model(mb["tokens"], mb["position_ids"], None)
        return output, partial(self._loss, mb, ref_logprobs)

    def _loss(self, mb: dict, ref_logprobs, output):
        logits = self._vocab_logits(output)
        logprobs = token_logprobs(logits, mb["labels"])
        entropy = entropy_from_logits(logits.detach())
        mask = mb["loss_mask"]
        advantages, teacher_kl, extra = mb["advantages"], None, {}
        if self.distill is not None:
            advantages, teacher_kl, extra = self._distillation(mb, output, logprobs.detach())
        loss, metrics = rl_loss(logprobs, logprobs.detach(), mb["rollout_logprobs"], advantages, mask,
                                self.algorithm, ref_logprobs=ref_logprobs, entropy=entropy, teacher_kl=teacher_kl)
        weight = mask.sum() if self.algorithm.loss_agg == "token-mean" else (mask.sum(-1) > 0).sum().float()
        stats = torch.stack([metrics.get(k, torch.tensor(0.0)) * weight for k in METRICS] + [weight])
        return loss * weight, weight.to(torch.int), {"rl": stats.detach(), **extra}

    def _distillation(self, mb: dict, output, student_logprobs):
        """OPD terms of one micro-batch: per-token advantages, exact reverse KL (payload "full"), per-teacher sums."""
        full = self.distill.payload == "full"
        teacher_kl = None
        if full:
            teacher_kl = teacher_reverse_kl(*self._vocab_shard(output, mb["teacher_full"]), self.groups.pgs.tp)
        advantages = opd_advantages(student_logprobs, mb["teacher_logprobs"], mb["advantages"], self.distill.alpha,
                                    distill_term=not full)
        sums = teacher_sums(student_logprobs, mb["teacher_logprobs"], mb["loss_mask"], mb["teacher_index"],
                            len(self.distill.aliases), teacher_kl)
        return advantages, teacher_kl, {"opd": sums}

    def _vocab_shard(self, output, teacher_full):
        """This rank's real vocabulary columns: student logits (padding cut) and the teacher rows sliced to match."""
        local = output.shape[-1]
        start = self.groups.tp_rank * local if self.groups.dims.tp > 1 else 0
        width = max(min(start + local, self.vocab_size) - start, 0)
        return output[..., :width].float() / self.temperature, teacher_full[..., start: start + width]

    def microbatches(self, batch: PolicyBatch) -> list[dict]:
        dims, micro = self.groups.dims, self.cfg.train.micro_batch_size
        if batch.size % (dims.dp * micro):
            raise ConfigError("train.micro_batch_size", micro,
                              f"the batch of {batch.size} samples (prompts_per_step * n_per_prompt) must split into "
                              f"micro-batches of {micro} on {dims.dp} data-parallel ranks")
        per_rank = batch.size // dims.dp
        first = self.groups.dp_rank * per_rank
        return [{**batch.rows(slice(start, start + micro)), "index": i}
                for i, start in enumerate(range(first, first + per_rank, micro))]

    def train_step(self, batch: PolicyBatch) -> dict:
        """Forward/backward over the micro-batches, one optimizer step; returns metrics (same on all ranks)."""
        micro = self.microbatches(batch)
        self._check_teachers(batch)
        self._ref_logprobs = self._reference_pass(micro, batch.seq_length) if self.reference is not None else []
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        dims = self.groups.dims
        fb = get_forward_backward_func(pp_size=dims.pp, vp_size=dims.vpp if dims.vpp > 1 else None)
        iterators = [iter(micro) for _ in self.model] if len(self.model) > 1 else iter(micro)
        outputs = fb(forward_step_func=self._forward_step, data_iterator=iterators, model=self.model,
                     num_microbatches=len(micro), seq_length=batch.seq_length,
                     micro_batch_size=self.cfg.train.micro_batch_size, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        if self.fp8_per_step:
            commit_step_scaling(self.model)
        self.version += 1
        metrics = self._reduce(outputs)
        if self.distill is not None:
            sums = self._sum_over_step(outputs, "opd", (len(self.distill.aliases), len(TEACHER_SUM_COLUMNS)))
            metrics.update(teacher_metrics(sums, self.distill.aliases, self.distill.payload == "full"))
        metrics.update(grad_norm=grad_norm or 0.0, lr=self.optimizer.param_groups[0]["lr"], skipped=float(not ok))
        metrics.update(self._routing_metrics())
        return metrics

    def _check_teachers(self, batch: PolicyBatch) -> None:
        """With OPD the batch must carry teacher log-probs (and rows over our vocabulary for payload "full")."""
        if self.distill is None:
            return
        if batch.teacher_logprobs is None or batch.teacher_aliases != self.distill.aliases:
            raise ValueError(f"advantage = \"opd\" needs a batch built with the teachers {list(self.distill.aliases)} "
                             f"(build_batch(..., distill=cfg.rl.distill)); got {list(batch.teacher_aliases)}")
        if self.distill.payload == "full" and (batch.teacher_full is None
                                               or batch.teacher_full.shape[-1] != self.vocab_size):
            width = None if batch.teacher_full is None else batch.teacher_full.shape[-1]
            raise ValueError(f"payload \"full\" needs teacher rows over the student's {self.vocab_size}-token "
                             f"vocabulary, got {width}: teacher and student must share one tokenizer")

    def _sum_over_step(self, outputs, key: str, shape) -> torch.Tensor:
        """Sum of a per-micro-batch tensor over micro-batches and DP ranks, shared along the pipeline."""
        total = torch.zeros(shape)
        if outputs:
            total = torch.stack([o[key] for o in outputs]).sum(0)
            dist.all_reduce(total, group=self.groups.pgs.dp_cp)
        if self.groups.dims.pp > 1:
            last = dist.get_global_rank(self.groups.pgs.pp, self.groups.dims.pp - 1)
            dist.broadcast(total, src=last, group=self.groups.pgs.pp)
        return total

    def _reduce(self, outputs) -> dict:
        """Token-weighted means over micro-batches and DP ranks, shared along the pipeline."""
        total = self._sum_over_step(outputs, "rl", (len(METRICS) + 1,))
        weight = max(float(total[-1]), 1.0)
        out = {k: float(v) / weight for k, v in zip(METRICS, total[:-1])}
        if self.algorithm.kl_coef == 0:
            out.pop("ref_kl_k3")
        return out

    def _routing_metrics(self) -> dict:
        if self.routing is None:
            return {}
        counts = torch.tensor(self.routing.take_mismatch(), dtype=torch.float64)
        dist.all_reduce(counts)  # layers live on PP stages, tokens on DP ranks; TP copies cancel in the ratio
        own = float(counts[0] / counts[1].clamp(min=1))
        return {"routing_mismatch_own": own, "routing_mismatch_used": 0.0 if self.replay else own}

    # ------------------------------------------------------- measurement
    @torch.no_grad()
    def sequence_logprobs(self, batch: PolicyBatch, mode: str) -> tuple[torch.Tensor, float]:
        """Trainer log-probs [N, S] of the batch (PP = 1), routing mode "off"/"compare"/"replay";
        also the share of (token, MoE layer) rows whose own top-k differs from the rollout's."""
        if self.groups.dims.pp > 1:
            raise ValueError("sequence_logprobs needs parallel.pipeline = 1")
        model = self.model[0]
        model.eval()
        out = []
        for mb in [batch.rows(slice(i, i + 1)) for i in range(batch.size)]:
            self._set_routes(self.routing, mb, mode)
            out.append(token_logprobs(self._vocab_logits(model(mb["tokens"], mb["position_ids"], None)),
                                      mb["labels"]))
        model.train()
        mismatched, compared = self.routing.take_mismatch() if self.routing else (0, 0)
        if self.routing is not None:
            self.routing.set_mode("off")
        return torch.cat(out), mismatched / max(compared, 1)


def rollout_k3(train_logprobs: torch.Tensor, batch: PolicyBatch) -> float:
    """Masked mean K3 (r = pi_rollout / pi_train) over the batch's response tokens."""
    return float(masked_mean(rollout_kl_k3(train_logprobs, batch.rollout_logprobs), batch.loss_mask))

