"""One training (or evaluation) step through megatron-core's pipeline schedules.

The loss is computed per token (``calculate_per_token_loss``): each
micro-batch returns the *sum* of its token losses and its token count, and
megatron-core divides gradients by the total token count of the global batch
in ``finalize_model_grads``.  The step is therefore the same mathematical
function whatever the split into micro-batches, DP ranks and pipeline stages,
which is what the cross-layout equivalence tests rely on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being a finite number."""


@dataclass
class StepResult:
    loss: float  # mean per-token LM loss over the global batch (same on every rank)
    tokens: int
    grad_norm: float | None = None
    skipped: bool = False


def _masked_loss_sum(loss_mask, output_tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    total = torch.sum(losses * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), count.detach().float()])}


def forward_step(data_iterator, model):
    """megatron-core's forward_step_func: run the model, return the loss function."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_masked_loss_sum, batch["loss_mask"])


def _reduce_loss(loss_dicts, groups) -> tuple[float, int]:
    """Sum (loss, tokens) over micro-batches and DP ranks, then share it along the pipeline.

    Only the last pipeline stage computes losses; broadcasting them lets every
    rank take the same decision (log, stop on NaN) without a hang.
    """
    total = torch.zeros(2)
    if loss_dicts:
        total = torch.stack([d["lm loss"] for d in loss_dicts]).sum(dim=0)
        dist.all_reduce(total, group=groups.pgs.dp_cp)
    if groups.dims.pp > 1:
        src = dist.get_global_rank(groups.pgs.pp, groups.dims.pp - 1)
        dist.broadcast(total, src=src, group=groups.pgs.pp)
    tokens = int(total[1].item())
    return (total[0] / total[1]).item() if tokens else float("nan"), tokens


def run_schedule(model_chunks, batches, shape, dims, forward_only, forward_step_func=forward_step,
                 collect_non_loss_data=False):
    """Pick megatron-core's schedule for our (explicit) PP/VPP sizes and run it.

    ``collect_non_loss_data`` (forward-only): the last stage keeps what each micro-batch's
    loss function returns when called with ``non_loss_data=True`` (a distillation teacher's logits)."""
    num_microbatches, seq_length, micro_batch_size = shape
    fb = get_forward_backward_func(pp_size=dims.pp, vp_size=dims.vpp if dims.vpp > 1 else None)
    iterators = [iter(batches) for _ in model_chunks] if len(model_chunks) > 1 else iter(batches)
    return fb(forward_step_func=forward_step_func, data_iterator=iterators, model=model_chunks,
              num_microbatches=num_microbatches, seq_length=seq_length,
              micro_batch_size=micro_batch_size, forward_only=forward_only,
              collect_non_loss_data=collect_non_loss_data)


def reduce_token_means(loss_dicts, groups, keys) -> tuple[dict[str, float], int]:
    """Per-token means of several (sum, count) pairs over micro-batches and DP ranks, shared along the
    pipeline (only the last stage has them); returns ({key: mean}, tokens of the first key)."""
    totals = torch.zeros(len(keys), 2)
    if loss_dicts:  # summed as _reduce_loss sums "lm loss", so the two agree bit for bit
        totals = torch.stack([torch.stack([d[k] for d in loss_dicts]).sum(dim=0) for k in keys])
        dist.all_reduce(totals, group=groups.pgs.dp_cp)
    if groups.dims.pp > 1:
        dist.broadcast(totals, src=dist.get_global_rank(groups.pgs.pp, groups.dims.pp - 1), group=groups.pgs.pp)
    means = {k: (t[0] / t[1]).item() if t[1] > 0 else float("nan") for k, t in zip(keys, totals)}
    return means, int(totals[0, 1].item())


def forward_backward_update(model_chunks, optimizer, scheduler, batches, shape, groups,
                            forward_step_func=forward_step) -> tuple[list, bool, float | None]:
    """Forward+backward over the micro-batches, then one optimizer step: (loss dicts, ok, grad norm)."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss_dicts = run_schedule(model_chunks, batches, shape, groups.dims, forward_only=False,
                              forward_step_func=forward_step_func)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return loss_dicts, ok, grad_norm


def train_step(model_chunks, optimizer, scheduler, batches, shape, groups) -> StepResult:
    """Forward+backward over the micro-batches, then one optimizer step."""
    loss_dicts, ok, grad_norm = forward_backward_update(model_chunks, optimizer, scheduler, batches, shape, groups)
    loss, tokens = _reduce_loss(loss_dicts, groups)
    return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, skipped=not ok)


@torch.no_grad()
def eval_step(model_chunks, batches, shape, groups) -> StepResult:
    for chunk in model_chunks:
        chunk.eval()
    loss_dicts = run_schedule(model_chunks, batches, shape, groups.dims, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    loss, tokens = _reduce_loss(loss_dicts, groups)
    return StepResult(loss=loss, tokens=tokens)


def check_finite(result: StepResult, iteration: int) -> None:
    """Stop with a clear message instead of training on NaNs (the loss is known on log ranks)."""
    if result.tokens > 0 and not math.isfinite(result.loss):
        raise TrainingDiverged(
            f"iteration {iteration}: loss is {result.loss}. Lower optimizer.lr, raise "
            f"schedule.warmup_iters or set optimizer.clip_grad; resume from the last checkpoint.")
    if result.grad_norm is not None and not math.isfinite(result.grad_norm):
        raise TrainingDiverged(
            f"iteration {iteration}: gradient norm is {result.grad_norm}. Lower optimizer.lr or "
            f"set optimizer.clip_grad; resume from the last checkpoint.")
