"""RL sizing: a rollout replica's memory per process and the trainer group's layout.

Rollout (estimate, not yet checked against a measured engine): one replica
holds the whole model split over ``rl.system.rollout_tensor`` TP ranks
(rollout/replica.py; no PP, no EP), in ``rollout_dtype``; megatron-core's
StaticInferenceContext keeps K and V of every layer for the batch it
generates: 2 x layers x (query_groups / TP) x head_dim x length x sequences
elements, where a batch is ``rollout_batch_prompts`` prompts x
``n_per_prompt`` samples and the length at most ``model.seq_length`` (the
engine refuses longer); plus the fp32 logits of one decode step.

Trainer: the configured ``[parallel]`` layout on the trainer het group's
devices (``slurm.trainer``), planned like pretraining.
"""

from __future__ import annotations

import dataclasses

from megatron_ernie.plan.inventory import padded_vocab, rank_chunks

DTYPE_BYTES = {"bf16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class RolloutMemory:
    weights: int
    kv_cache: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.logits


def rollout_memory(model, moe, system, sampling, vocab_size: int) -> RolloutMemory:
    """Bytes per rollout process of one TP-sharded replica (see the module docstring)."""
    from megatron_ernie.config.schema import ParallelConfig

    t = system.rollout_tensor
    par = ParallelConfig(tensor=t, expert_tensor=t, sequence_parallel=False)
    e = DTYPE_BYTES.get(system.rollout_dtype, 4)
    weights = sum(p.numel for chunk in rank_chunks(model, moe, par, vocab_size, 0) for p in chunk) * e
    head_dim = model.hidden_size // model.num_attention_heads
    sequences = system.rollout_batch_prompts * sampling.n_per_prompt
    kv = 2 * model.num_layers * (model.num_query_groups // t) * head_dim * model.seq_length * sequences * e
    logits = sequences * padded_vocab(vocab_size, t) // t * 4
    return RolloutMemory(weights, kv, logits)


def trainer_world(slurm) -> int:
    """Devices of the trainer het group (GPUs, or tasks on a CPU group)."""
    g = slurm.trainer
    return g.nodes * g.ntasks_per_node
