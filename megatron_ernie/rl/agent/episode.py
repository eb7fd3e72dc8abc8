"""Assemble a multi-turn episode into one response sequence with an env-token mask.

In an agent episode the model's turns alternate with environment turns (tool
output, a user simulator). The trainer sees one sequence: prompt + all turns
in order, because later model tokens attend to earlier tool output. But only
the model's own tokens are actions: training on environment tokens would teach
the policy to predict the tool instead of using it. So each token carries a
mask bit (True = environment), the loss mask is its negation, and environment
positions carry a placeholder log-prob of 0.0 that the mask removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megatron_ernie.rl.protocol import Sample

ROLES = ("model", "env")


@dataclass(frozen=True)
class Turn:
    """One turn: who produced it, its tokens, and (model turns) the rollout log-prob of each."""

    role: str
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        if self.role not in ROLES:
            raise ValueError(f"Turn.role = {self.role!r}: use one of {ROLES}")
        if self.role == "model":
            if self.logprobs is None or len(self.logprobs) != len(self.tokens):
                raise ValueError(f"a model turn of {len(self.tokens)} tokens needs as many rollout log-probs, "
                                 f"got {None if self.logprobs is None else len(self.logprobs)}")
            object.__setattr__(self, "logprobs", tuple(float(x) for x in self.logprobs))


@dataclass(frozen=True, eq=False)
class Episode:
    response_tokens: np.ndarray   # int32 [R]: all turns, in order
    env_mask: np.ndarray          # bool  [R]: True where the environment wrote the token
    rollout_logprobs: np.ndarray  # float32 [R]: 0.0 at environment tokens
    truncated: bool               # cut at max_tokens

    def loss_mask(self) -> np.ndarray:
        return (~self.env_mask).astype(np.float32)


def assemble_episode(turns: Sequence[Turn], max_tokens: int | None = None) -> Episode:
    """Concatenate turns; cut at max_tokens (the sequence budget after the prompt)."""
    if not turns:
        raise ValueError("an episode needs at least one turn")
    tokens, env, logps = [], [], []
    for turn in turns:
        tokens.extend(turn.tokens)
        env.extend([turn.role == "env"] * len(turn.tokens))
        logps.extend(turn.logprobs if turn.role == "model" else [0.0] * len(turn.tokens))
    truncated = max_tokens is not None and len(tokens) > max_tokens
    end = max_tokens if truncated else len(tokens)
    return Episode(np.asarray(tokens[:end], dtype=np.int32), np.asarray(env[:end], dtype=bool),
                   np.asarray(logps[:end], dtype=np.float32), truncated)


def episode_sample(episode: Episode, *, prompt_id: str, sample_index: int, task: str,
                   prompt_tokens: Sequence[int], policy_version: int, response_text: str = "",
                   reference: str = "") -> Sample:
    """The protocol Sample of an episode (finish_reason "length" when truncated)."""
    return Sample(prompt_id=prompt_id, sample_index=sample_index, task=task, prompt_tokens=prompt_tokens,
                  response_tokens=episode.response_tokens, rollout_logprobs=episode.rollout_logprobs,
                  policy_version=policy_version, env_mask=episode.env_mask, response_text=response_text,
                  reference=reference, finish_reason="length" if episode.truncated else "stop")
