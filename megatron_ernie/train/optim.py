"""Optimizer and learning-rate schedule, both from megatron-core.

AdamW via ``get_megatron_optimizer`` (optionally the distributed optimizer,
which shards optimizer state over data-parallel ranks) and megatron-core's
``OptimizerParamScheduler`` for linear warmup followed by cosine/linear decay.
"""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_optimizer(optim, par, model_chunks, pgs, bf16: bool = False):
    config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16, fp16=False,
        use_distributed_optimizer=par.distributed_optimizer,
    )
    # The gloo side groups are for CPU-offloaded optimizer state; we pass our groups instead.
    return get_megatron_optimizer(config, model_chunks, use_gloo_process_groups=False, pg_collection=pgs)


def build_scheduler(optimizer, optim, schedule, total_iters: int) -> OptimizerParamScheduler:
    warmup = min(schedule.warmup_iters, max(total_iters - 1, 0))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_iters, 1), lr_decay_style=schedule.decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(total_iters, 1),
        wd_incr_style="constant",
    )
