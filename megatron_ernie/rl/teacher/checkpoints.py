"""Which checkpoint each teacher alias serves, checked before any process starts.

A teacher scores the student's token ids with its own model, so the two must
mean the same thing by every id: the teacher checkpoint's tokenizer.json must
hash equal to the run's tokenizer (data.tokenizer, the tokenizer of
checkpoint.load, or the tasks' character tokenizer). It must also carry the
model config it was trained with (config.toml) and see sequences as long as
the student's. Every failure is a ConfigError naming rl.distill.teachers.<alias>
and the file, raised by the launcher (exit 2) and again by each teacher
process before it loads weights.

Aliases are assigned to teacher processes round robin by rank over the sorted
aliases (`alias_for_rank`): the controller and the teacher compute the same
answer, so a teacher's alias is known from its Hello, and on Slurm the
teacher group's tasks spread evenly over the aliases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_ernie.config.errors import ConfigError

# payload = "full" sends [response tokens, V] float32 rows per sample; above this a sample's message
# would be hundreds of MiB (a BPE vocabulary): use payload = "sampled" there.
MAX_FULL_PAYLOAD_BYTES = 64 << 20


def alias_for_rank(distill, rank: int) -> str:
    """Teacher process `rank` serves the (rank mod #aliases)-th alias in sorted order."""
    aliases = distill.aliases
    return aliases[rank % len(aliases)]


@dataclass(frozen=True)
class TeacherCheckpoint:
    alias: str
    path: Path  # the resolved iter_N directory
    tokenizer_sha256: str


def run_tokenizer_file(cfg, agent: bool) -> str:
    """A file holding the run's tokenizer: its own file, or the tasks' tokenizer saved as <run.dir>/tokenizer.json."""
    from megatron_ernie.rl.task_tokenizer import tokenizer_for

    tokenizer = tokenizer_for(cfg, agent=agent)
    if getattr(tokenizer, "path", ""):
        return tokenizer.path
    Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
    path = str(Path(cfg.run.dir) / "tokenizer.json")
    tokenizer.save(path)  # atomic, and the same content the controller writes there
    return path


def scorer_checkpoint(given: str, field: str, run_tokenizer: str, what: str) -> tuple[Path, str]:
    """(resolved iter_N dir, tokenizer sha256) of a checkpoint that will score the run's samples
    (a teacher or the judge): complete, with config.toml, and with exactly the run's tokenizer."""
    from megatron_ernie.checkpoint.store import CheckpointError
    from megatron_ernie.data.tokenizer import require_same_tokenizer, tokenizer_hash
    from megatron_ernie.rl.rollout.checkpoint_engine import CONFIG_FILE, TOKENIZER_FILE, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(given, field)
    except CheckpointError as exc:
        raise ConfigError(field, given, f"{exc}") from None
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if not (ckpt / name).is_file():
            raise ConfigError(field, given, f"{ckpt / name} is missing: a {what} checkpoint carries the model "
                                            "config and the tokenizer it was trained with next to its weights")
    require_same_tokenizer(run_tokenizer, str(ckpt / TOKENIZER_FILE), field)
    return ckpt, tokenizer_hash(str(ckpt / TOKENIZER_FILE), field)


def resolve_teacher(cfg, alias: str, run_tokenizer: str) -> TeacherCheckpoint:
    """The checked checkpoint of `alias`: complete, with config.toml and the run's tokenizer."""
    field = f"rl.distill.teachers.{alias}"
    ckpt, sha256 = scorer_checkpoint(cfg.rl.distill.teachers[alias], field, run_tokenizer, "teacher")
    _check_teacher_model(cfg, field, ckpt)
    return TeacherCheckpoint(alias, ckpt, sha256)


def _check_teacher_model(cfg, field: str, ckpt: Path) -> None:
    """The teacher must fit the student's sequences, and a full payload must stay a sane message size."""
    from megatron_ernie.rl.rollout.checkpoint_engine import checkpoint_config, checkpoint_tokenizer

    teacher = checkpoint_config(ckpt)
    if teacher.model.seq_length < cfg.model.seq_length:
        raise ConfigError(field, str(ckpt), f"its model.seq_length = {teacher.model.seq_length} "
                                            f"({ckpt / 'config.toml'}) is shorter than the student's "
                                            f"model.seq_length = {cfg.model.seq_length}: it cannot score whole "
                                            "samples; lower model.seq_length or use a longer-context teacher")
    if cfg.rl.distill.payload == "full":
        vocab = checkpoint_tokenizer(ckpt, field).vocab_size
        nbytes = 4 * vocab * cfg.rl.sampling.max_new_tokens
        if nbytes > MAX_FULL_PAYLOAD_BYTES:
            raise ConfigError("rl.distill.payload", "full",
                              f"{vocab} x {cfg.rl.sampling.max_new_tokens} float32 rows are {nbytes >> 20} MiB per "
                              "sample; use payload = \"sampled\" with a vocabulary this large")


def check_teachers(cfg, agent: bool = False) -> dict[str, TeacherCheckpoint]:
    """Every teacher of [rl.distill], checked (launcher and teachers call it before starting)."""
    if not cfg.rl.distill.enabled:
        return {}
    check_temperature_one(cfg)
    run_tokenizer = run_tokenizer_file(cfg, agent)
    return {alias: resolve_teacher(cfg, alias, run_tokenizer) for alias in cfg.rl.distill.aliases}


def check_temperature_one(cfg) -> None:
    """Teachers score at temperature 1 only; the student must sample at 1 for the two to be comparable.

    RLConfig.validate refuses this too; the teacher repeats it because its
    log-probs are meaningless against a student sampling at another temperature.
    """
    if cfg.rl.sampling.temperature != 1:
        raise ConfigError("rl.sampling.temperature", cfg.rl.sampling.temperature,
                          "on-policy distillation scores at temperature 1: set rl.sampling.temperature = 1")
