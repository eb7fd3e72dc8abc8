"""Framework overhead per training step: our trainer vs a bare megatron-core loop.

Both sides train the same tiny MoE on the same real-corpus batches in one
process; steps alternate between them (A B A B ...) so machine noise hits
both alike.  The bare side is written directly against megatron-core (GPTModel,
DDP, get_megatron_optimizer, get_forward_backward_func) with nothing of ours
but the CPU compatibility layer, which megatron-core needs on a CPU host.

    python benchmarks/step_overhead.py [--steps 30] [--layers 4] [--hidden 128]

Prints a table and the ratio bare/ours (1.0 = no overhead; goal >= 0.97).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    return p.parse_args()


def our_run(args):
    from megatron_ernie import config as C
    from megatron_ernie.train import loop

    cfg = C.load(None, [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                        f"model.ffn_hidden_size={args.hidden * 2}", f"model.seq_length={args.seq}",
                        "moe.num_experts=4", "moe.router_topk=2", f"moe.expert_ffn_hidden_size={args.hidden}",
                        "train.global_batch_size=8", "train.micro_batch_size=4", "train.iters=100000",
                        "train.eval_interval=0", "checkpoint.resume=\"none\"", "log.tensorboard=false",
                        "log.level=\"WARNING\"", "data.vocab_size=2048", "run.dir=\"/tmp/step_overhead\""])
    return cfg, loop.setup(cfg)


def bare_model(tconfig, vocab_size, seq):
    """Everything below is plain megatron-core."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron_ernie.model.specs import local_replacements, substitute

    spec = substitute(get_gpt_decoder_block_spec(tconfig, use_transformer_engine=False, normalization="RMSNorm"),
                      local_replacements("RMSNorm"))  # torch's norm wrapper has no SP; same module either way
    model = GPTModel(tconfig, spec, vocab_size=vocab_size, max_sequence_length=seq, position_embedding_type="rope")
    ddp = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = ddp.no_sync
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=1.0), [ddp],
                                 use_gloo_process_groups=False)
    return ddp, opt


def bare_step(ddp, opt, batches, seq, micro):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(mask, out):
        total = (out.float().view(-1) * mask.view(-1)).sum()
        n = mask.sum().to(torch.int)
        return total, n, {"lm loss": torch.stack([total.detach(), n.detach().float()])}

    def fwd(it, model):
        b = next(it)
        return model(b["tokens"], b["position_ids"], None, labels=b["labels"]), partial(loss_func, b["loss_mask"])

    ddp.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=fwd, data_iterator=iter(batches), model=[ddp],
                                num_microbatches=len(batches), seq_length=seq, micro_batch_size=micro,
                                forward_only=False)
    opt.step()


def main():
    args = parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    from megatron_ernie.data.loader import BatchLayout, iter_global_batches
    from megatron_ernie.train.step import train_step

    cfg, run = our_run(args)
    from megatron_ernie.model.build import transformer_config

    # a fresh TransformerConfig with the same fields (ours carries hooks bound to our DDP)
    ddp, opt = bare_model(transformer_config(cfg.model, cfg.moe, cfg.parallel), run.model[0].module.vocab_size,
                          args.seq)
    batches = iter_global_batches(run.data.train, BatchLayout(8, 4), 0)
    times = {"ours": [], "bare": []}
    for i in range(args.warmup + args.steps):
        step_batches = next(batches)
        for name in ("ours", "bare") if i % 2 == 0 else ("bare", "ours"):
            t0 = time.perf_counter()
            if name == "ours":
                train_step(run.model, run.optimizer, run.scheduler, step_batches, run.shape, run.groups)
            else:
                bare_step(ddp, opt, step_batches, args.seq, 4)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    report(times, args)


def report(times, args):
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"\nstep overhead: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, {args.steps} steps each")
    print(f"{'loop':<8}{'median ms/step':>16}{'mean ms/step':>14}")
    for k in ("bare", "ours"):
        print(f"{k:<8}{med[k]:>16.1f}{statistics.mean(times[k]) * 1000:>14.1f}")
    print(f"ratio bare/ours (median): {med['bare'] / med['ours']:.3f}   (goal >= 0.97)")


if __name__ == "__main__":
    main()
