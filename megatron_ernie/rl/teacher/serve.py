"""The teacher role: a frozen checkpoint that adds teacher log-probs to the controller's ScoredSamples.

Start-up, in this order, so that a bad teacher is refused before it scores
anything and the controller always hears why:
  1. import torch and megatron-core (seconds of CPU that could starve the heartbeat thread), then
     connect to the controller (Hello "teacher", rank) and start heartbeats —
     loading a large model takes a while, and a failure below is then reported
     as a Failure message instead of a silent absence;
  2. check the checkpoint (teacher/checkpoints.py): complete, config.toml and
     tokenizer.json present, tokenizer hash equal to the run's, long enough,
     run sampling at temperature 1;
  3. load the weights into a forward-only megatron-core model
     (rollout/checkpoint_engine.py) and send TeacherReady.
Then: every ScoredSample that arrives is scored in batches (teacher/engine.py)
and sent back with its teacher fields, followed by a TeacherStats. A teacher
holds no state the run needs: when it dies, the controller sends its samples
to another teacher of the same alias.
"""

from __future__ import annotations

import logging
import os
import socket

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.rl.control import Failure, Heartbeats, Hello, TeacherReady, TeacherStats, connect, receive_work
from megatron_ernie.rl.protocol import ScoredSample

log = logging.getLogger("megatron_ernie.rl.teacher")


def serve(channel, scorer, rank: int = 0) -> int:
    """Score until Shutdown; returns the exit code (75 when the controller asks for a requeue)."""
    while True:
        samples, code = receive_work(channel, ScoredSample, f"{scorer.alias} scorer {rank}", log)
        if code is not None:
            return code
        if samples:
            scored, seconds = scorer.score(samples)
            for item in scored:
                channel.send(item)
            tokens = sum(len(s.sample.response_tokens) for s in samples)
            channel.send(TeacherStats(scorer.alias, len(samples), tokens, seconds))


def run_scorer_role(role: str, rank: int, label: str, system, address, authkey: bytes, start) -> int:
    """Connect, build the scorer with `start()` (a failure is reported to the controller first),
    announce it ready and serve until Shutdown. Shared by the teacher and the judge roles."""
    channel = connect(address, authkey, Hello(role, rank, os.getpid(), socket.gethostname()))
    beats = Heartbeats(channel, role, rank, system.heartbeat_s)
    try:
        try:
            scorer, ready = start()
        except Exception as exc:
            channel.send(Failure(role, f"{label}: {type(exc).__name__}: {exc}"[:2000]))
            raise
        channel.send(ready)
        return serve(channel, scorer, rank)
    except EOFError:
        log.error(f"{label}: the controller closed the connection; exiting")
        return 1
    finally:
        beats.stop()


def start_scorer(cfg, system, alias: str):
    """(TeacherScorer, TeacherReady) after every check of the teacher's checkpoint."""
    from megatron_ernie.rl.teacher.checkpoints import check_temperature_one, resolve_teacher, run_tokenizer_file
    from megatron_ernie.rl.teacher.engine import load_scorer

    check_temperature_one(cfg)
    checked = resolve_teacher(cfg, alias, run_tokenizer_file(cfg, system.agent_max_turns > 1))
    scorer, _, _ = load_scorer(checked.path, alias, cfg.rl.distill.payload, system.teacher_dtype,
                               system.teacher_batch_samples, seed=cfg.run.seed)
    log.info(f"teacher {alias!r} ready: {checked.path} ({system.teacher_dtype}, payload "
             f"{cfg.rl.distill.payload!r})")
    return scorer, TeacherReady(alias, str(checked.path), checked.tokenizer_sha256)


def run_teacher(cfg, system, rank: int, address, authkey: bytes) -> int:
    """The teacher role's main: process `rank` serves alias_for_rank(rank)."""
    from megatron_ernie.rl.teacher.checkpoints import alias_for_rank

    if not cfg.rl.distill.enabled:
        raise ConfigError("rl.distill.teachers", {}, "a teacher process needs teachers: set rl.distill.teachers "
                                                     "or do not start the teacher role")
    alias = alias_for_rank(cfg.rl.distill, rank)
    import megatron_ernie.rl.rollout.checkpoint_engine  # noqa: F401 - torch and megatron-core imports take seconds
    import megatron_ernie.rl.teacher.engine  # noqa: F401 - of CPU and the GIL: finish them before heartbeats count

    return run_scorer_role("teacher", rank, f"teacher {rank} ({alias})", system, address, authkey,
                           lambda: start_scorer(cfg, system, alias))
