"""A frozen distillation teacher for pretraining: checked, loaded once, run forward-only per step.

The teacher is a checkpoint of ours (any size; the frozen supernet of an
extracted sub-network is the motivating case). It is built at the *student's*
parallel layout — the same process groups, so its vocabulary-parallel logits
of a micro-batch sit on the same TP ranks and the same last pipeline stage as
the student's — from its own ``config.toml`` (model and MoE sections), and its
weights load through the project's checkpoint loading (checkpoint/store.py,
checksums verified; megatron-core reshards on load, so any saved layout
works). It holds no gradients, no optimizer state and no DDP buffers, and
runs in eval mode (no dropout, no router aux losses or bias updates).

A supernet checkpoint is built as a plain model: its weights carry the same
keys, and its largest sub-network is the whole network (elastic/subnet.py
``choices`` always include the full size), whose loss equals the plain
model's (elastic/extract.py).

Everything that can be refused is refused before any training work, as a
ConfigError naming ``distill.teacher``: a missing or unreadable checkpoint, a
model that does not fit the student's layout, precision combinations not
tested (bf16, FP8), a tokenizer other than the student's data tokenizer
(content hash) and saved weights whose shapes (the padded vocabulary
included) differ from what this layout builds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ernie import config as C
from megatron_ernie.checkpoint import rng, store
from megatron_ernie.checkpoint.errors import CheckpointError
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.train import step as S

FIELD = "distill.teacher"


@dataclass
class Teacher:
    chunks: list  # this rank's GPTModel chunks (no DDP wrapper), eval mode, frozen
    checkpoint: Path
    cfg: C.ErnieConfig  # the student's config with the teacher's model and moe sections


def resolve(given: str) -> Path:
    """The complete iter_N directory meant by ``distill.teacher`` (itself, or what `latest` names)."""
    from megatron_ernie.rl.rollout.checkpoint_engine import resolve_checkpoint

    try:
        return resolve_checkpoint(given, FIELD)
    except CheckpointError as err:
        raise ConfigError(FIELD, given, f"{err}") from None


def saved_config(given: str, ckpt: Path) -> C.ErnieConfig:
    """The config the teacher was trained with (its config.toml); its tokenizer.json must be there too."""
    from megatron_ernie.rl.rollout.checkpoint_engine import TOKENIZER_FILE, checkpoint_config

    if not (ckpt / TOKENIZER_FILE).is_file():
        raise ConfigError(FIELD, given, f"{ckpt / TOKENIZER_FILE} is missing: a teacher checkpoint must carry "
                                        "the tokenizer it was trained with (every checkpoint of ours does)")
    try:
        return checkpoint_config(ckpt)
    except (CheckpointError, ConfigError) as err:
        raise ConfigError(FIELD, given, f"its config cannot be read: {err}") from None


def at_student_layout(cfg: C.ErnieConfig, teacher: C.ErnieConfig) -> C.ErnieConfig:
    """The student's config with the teacher's model and MoE (elastic off: a supernet's whole network)."""
    model = dataclasses.replace(teacher.model, seq_length=cfg.model.seq_length)
    return dataclasses.replace(cfg, model=model, moe=teacher.moe, elastic=C.schema.ElasticConfig())


def _refuse_untested(cfg: C.ErnieConfig, teacher: C.ErnieConfig, given: str) -> None:
    """Distillation is tested with fp32 weights on both sides; other precisions are refused, not guessed."""
    fp32 = "model.dtype = \"fp32\", fp8.recipe = \"off\""
    if cfg.model.dtype != "fp32":
        raise ConfigError("model.dtype", cfg.model.dtype, f"distillation from {FIELD} is tested for fp32 students "
                                                          f"only; train in fp32 ({fp32}) or set {FIELD} = \"\"")
    if cfg.fp8.recipe != "off":
        raise ConfigError("fp8.recipe", cfg.fp8.recipe, f"distillation from {FIELD} is tested for fp32 students "
                                                        f"only; train in fp32 ({fp32}) or set {FIELD} = \"\"")
    if teacher.model.dtype != "fp32" or teacher.fp8.recipe != "off":
        raise ConfigError(FIELD, given, f"the teacher was trained with model.dtype = {teacher.model.dtype!r}, "
                                        f"fp8.recipe = {teacher.fp8.recipe!r}; distillation is tested for fp32 "
                                        f"teachers only: use a checkpoint trained with {fp32}")


def check(cfg: C.ErnieConfig, world: int) -> tuple[Path, C.ErnieConfig]:
    """Every refusal that needs no data and no model: (resolved checkpoint, teacher config at this layout)."""
    given = cfg.distill.teacher
    if cfg.elastic.enabled:
        raise ConfigError(FIELD, given, "an elastic supernet distils in place from its own largest sub-network "
                                        "(elastic.distill_weight); set distill.teacher = \"\" for a supernet, or "
                                        "distil an extracted sub-network (a plain model) from it")
    ckpt = resolve(given)
    teacher = saved_config(given, ckpt)
    _refuse_untested(cfg, teacher, given)
    if teacher.model.seq_length < cfg.model.seq_length:
        raise ConfigError(FIELD, given, f"its model.seq_length = {teacher.model.seq_length} is shorter than the "
                                        f"student's {cfg.model.seq_length}; use a teacher trained on sequences at "
                                        "least as long, or lower model.seq_length")
    placed = at_student_layout(cfg, teacher)
    try:
        C.validate(placed, world)
    except ConfigError as err:
        raise ConfigError(FIELD, given, f"the teacher's model does not fit the student's parallel layout "
                                        f"({err}); choose a layout both models fit") from None
    return ckpt, placed


def check_tokenizer(ckpt: Path, data_tokenizer, given: str) -> None:
    """The teacher must mean by every token id what the student's data means (content hashes)."""
    from megatron_ernie.data.tokenizer import tokenizer_hash

    theirs = tokenizer_hash(str(ckpt / "tokenizer.json"), FIELD)
    if theirs != data_tokenizer.sha256:
        raise ConfigError(FIELD, given, f"its tokenizer ({ckpt / 'tokenizer.json'}, sha256 {theirs[:12]}) differs "
                                        f"from the student's data tokenizer (sha256 {data_tokenizer.sha256[:12]}): "
                                        "its probabilities would be over other tokens; use a teacher trained on "
                                        "data of the same tokenizer, or tokenize the data with the teacher's "
                                        "(ernie preprocess ... --tokenizer)")


def check_vocabulary(placed: C.ErnieConfig, ckpt: Path, chunks, vocab_size: int, given: str) -> None:
    """The saved weights have the shapes this layout builds (the padded vocabulary: lcm(128, TP) multiples)."""
    from megatron_ernie.model.build import padded_vocab_size
    from megatron_ernie.rl.rollout.checkpoint_engine import check_saved_shapes
    from megatron_ernie.rl.weight_sync import global_shapes, shard_views

    try:
        check_saved_shapes(ckpt, global_shapes(shard_views(chunks)))
    except CheckpointError as err:
        padded = padded_vocab_size(vocab_size, placed.parallel.tensor)
        raise ConfigError(FIELD, given, f"{err} (the student's padded vocabulary at TP{placed.parallel.tensor} "
                                        f"is {padded})") from None


def load(placed: C.ErnieConfig, ckpt: Path, groups, data_tokenizer) -> Teacher:
    """Build the teacher at the student's layout and load its weights; the RNG streams are left as they were
    (building initialises weights randomly first, which must not shift the student's dropout or sampling)."""
    from megatron_ernie.model.build import build_chunks, padded_vocab_size, transformer_config

    given = placed.distill.teacher
    check_tokenizer(ckpt, data_tokenizer, given)
    state = rng.capture()
    tconfig = transformer_config(placed.model, placed.moe, placed.parallel)
    chunks = build_chunks(tconfig, placed.model, groups,
                          padded_vocab_size(data_tokenizer.vocab_size, placed.parallel.tensor))
    rng.restore(state)
    check_vocabulary(placed, ckpt, chunks, data_tokenizer.vocab_size, given)
    store.load(ckpt, chunks, None, restore_rng=False)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return Teacher(chunks, ckpt, placed)


def _keep_logits(logits, non_loss_data: bool = False):
    return logits.detach()


def _forward(data_iterator, model):
    batch = next(data_iterator)
    return model(batch["tokens"], batch["position_ids"], None), _keep_logits


@torch.no_grad()
def logits(teacher: Teacher, batches: list, shape, dims) -> list:
    """The teacher's vocabulary-parallel logits [b, s, V/TP] of each micro-batch, in order, on the last
    pipeline stage (empty elsewhere): megatron-core's forward-only schedule over the step's micro-batches."""
    return S.run_schedule(teacher.chunks, batches, shape, dims, forward_only=True, forward_step_func=_forward,
                          collect_non_loss_data=True)

