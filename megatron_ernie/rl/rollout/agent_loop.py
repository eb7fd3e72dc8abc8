"""Multi-turn tool-use episodes on a generation engine (rl.system.agent_max_turns > 1).

Each episode alternates model turns and tool replies (rl/agent): the model
generates until it closes a tool call ("</tool>", a stop sequence) or ends its
answer; a call is executed and its reply ("<result>...</result>") appended as
an environment turn; the next model turn is generated on the whole history.
The episode becomes one Sample whose env_mask marks the tool tokens, so the
trainer computes their log-probs in context but never trains on them.

Batching: all episodes of a generation batch advance turn by turn together
(one engine.generate call per turn for the episodes still running). Each turn
re-encodes the history (no KV reuse across turns); the routed experts of the
last turn's call therefore cover the whole history, and tool tokens appended
after the last model turn get -1 rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from megatron_ernie.rl.agent.episode import Episode, Turn, assemble_episode
from megatron_ernie.rl.agent.tools import STOP_STRING, parse_tool_call, run_tool
from megatron_ernie.rl.rollout.engine import Generation, GenerationEngine, SamplingParams

@dataclasses.dataclass
class _Episode:
    prompt: list[int]
    turns: list[Turn] = dataclasses.field(default_factory=list)
    routes: np.ndarray | None = None
    finish_reason: str = "stop"
    done: bool = False

    @property
    def history(self) -> list[int]:
        return self.prompt + [t for turn in self.turns for t in turn.tokens]

    @property
    def response_length(self) -> int:
        return sum(len(turn.tokens) for turn in self.turns)


def _encode_reply(tokenizer, text: str) -> list[int]:
    """Tool reply tokens; characters the tokenizer does not know are left out rather than failing the episode."""
    try:
        return tokenizer.encode(text)
    except ValueError:
        return [t for c in text for t in _encode_char(tokenizer, c)]


def _encode_char(tokenizer, char: str) -> list[int]:
    try:
        return tokenizer.encode(char)
    except ValueError:
        return []


def _model_turn(episode: _Episode, generation: Generation, tokenizer, stop: tuple, budget: int,
                last_turn: bool) -> None:
    tokens = generation.response_tokens.tolist()
    episode.turns.append(Turn("model", tokens, generation.logprobs.tolist()))
    episode.routes = generation.routed_experts
    call = parse_tool_call(tokenizer.decode(generation.response_tokens))
    closed_call = call is not None and tuple(tokens[-len(stop):]) == stop
    if not closed_call or last_turn or episode.response_length >= budget:
        episode.done = True
        episode.finish_reason = "length" if generation.finish_reason == "length" else "stop"
        return
    episode.turns.append(Turn("env", _encode_reply(tokenizer, run_tool(call))))
    if episode.response_length >= budget:
        episode.done, episode.finish_reason = True, "length"


def run_episodes(engine: GenerationEngine, tokenizer, prompts: list[list[int]], params: SamplingParams,
                 max_turns: int) -> list[tuple[Episode, np.ndarray | None]]:
    """(Episode, routed experts [prompt + response, layers, k]) per prompt; params.max_new_tokens bounds
    each episode's response (model and tool tokens together)."""
    stop = tuple(tokenizer.encode(STOP_STRING))
    budget = params.max_new_tokens
    episodes = [_Episode(list(p)) for p in prompts]
    for turn in range(max_turns):
        running = [e for e in episodes if not e.done]
        if not running:
            break
        remaining = min(budget - e.response_length for e in running)
        turn_params = dataclasses.replace(params, max_new_tokens=max(remaining, 1),
                                          stop_sequences=params.stop_sequences + (stop,))
        for episode, generation in zip(running, engine.generate([e.history for e in running], turn_params)):
            _model_turn(episode, generation, tokenizer, stop, budget, turn == max_turns - 1)
    return [(assemble_episode(e.turns, budget), _pad_routes(e, budget)) for e in episodes]


def _pad_routes(episode: _Episode, budget: int) -> np.ndarray | None:
    """The last call's routes, extended with -1 rows for tool tokens appended after it, cut to the episode."""
    if episode.routes is None:
        return None
    total = len(episode.prompt) + min(episode.response_length, budget)
    rows = np.full((total, *episode.routes.shape[1:]), -1, dtype=np.int16)
    n = min(total, len(episode.routes))
    rows[:n] = episode.routes[:n]
    return rows
