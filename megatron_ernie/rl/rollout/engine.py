"""The interface between a rollout worker and an inference backend.

A rollout worker only needs three things from a backend: generate a batch of
responses with per-token log-probs (and, for MoE, the experts each token was
routed to), tell which weight tensors it expects, and take new weights
between generations. `MegatronEngine` implements it with the trainer's own
megatron-core model code; a vLLM or SGLang engine would implement the same
three methods (generate through its LLM object with logprobs and routed
experts returned, load_weights through its weight-update API).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from megatron_ernie.config.rl import SamplingConfig


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (rl.sampling plus the stop tokens of the task/agent).

    stop_sequences: token sequences that end a response (kept in it), e.g. the
    agent's "</tool>"; stop_token_ids end it too (the end-of-text id).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_config(cls, sampling: SamplingConfig, eos_id: int, max_new_tokens: int = 0,
                    stop_sequences: Sequence[Sequence[int]] = ()) -> "SamplingParams":
        return cls(sampling.temperature, sampling.top_p, sampling.top_k,
                   max_new_tokens or sampling.max_new_tokens, (eos_id,),
                   tuple(tuple(int(t) for t in s) for s in stop_sequences))


@dataclass(frozen=True, eq=False)
class Generation:
    """One response: its tokens, log pi_rollout of each, routed experts, why it ended."""

    response_tokens: np.ndarray        # int32 [R]
    logprobs: np.ndarray               # float32 [R]
    routed_experts: np.ndarray | None  # int16 [prompt + R, moe_layers, top-k], -1 = not routed
    finish_reason: str                 # "stop" | "length"


class GenerationEngine(ABC):
    """An inference backend serving one policy version at a time."""

    policy_version: int = -1  # -1: no weights received yet

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """One Generation per prompt, in order (repeat a prompt to sample it several times)."""

    @abstractmethod
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Global (unsharded) shape of every weight tensor the engine loads, by checkpoint key."""

    @abstractmethod
    def load_weights(self, tensors: Mapping[str, "object"], version: int) -> None:
        """Replace the weights (global tensors by checkpoint key) and serve `version` from now on."""

    def close(self) -> None:
        """Release what the engine holds beyond this process (a sharded replica's peers); default: nothing."""
