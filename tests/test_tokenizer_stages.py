"""One tokenizer across stages: a run that starts from a checkpoint keeps its ids, and two
models with different tokenizers are refused before they meet."""

import dataclasses

import pytest

from megatron_ernie import config as C
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.config.rl import TaskConfig
from megatron_ernie.data.char_tokenizer import CharTokenizer
from megatron_ernie.data.tokenizer import load_tokenizer, require_same_tokenizer, tokenizer_hash, train_tokenizer
from megatron_ernie.rl.task_tokenizer import TOOL_ALPHABET, task_texts, tokenizer_for

SUBTRACTION = TaskConfig(name="arithmetic", options={"digits": 1, "ops": "-"})
ADDITION = TaskConfig(name="arithmetic", options={"digits": 1, "ops": "+"})


def _cfg(tasks=(SUBTRACTION,), load="", tokenizer=""):
    cfg = C.ErnieConfig()
    return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, tasks=tuple(tasks)),
                               checkpoint=dataclasses.replace(cfg.checkpoint, load=load),
                               data=dataclasses.replace(cfg.data, tokenizer=tokenizer))


def _checkpoint(tmp_path, name, tokenizer):
    path = tmp_path / name
    path.mkdir()
    tokenizer.save(path / "tokenizer.json")
    return str(path)


def test_load_tokenizer_reads_character_and_bpe_files(tmp_path):
    char = CharTokenizer("0123456789+-=")
    char.save(tmp_path / "char.json")
    loaded = load_tokenizer(str(tmp_path / "char.json"))
    assert isinstance(loaded, CharTokenizer)
    assert loaded.encode("7-3=4") == char.encode("7-3=4") and loaded.vocab_size == 15
    assert (loaded.eod_id, loaded.pad_id) == (0, 1)
    bpe = train_tokenizer(["In the beginning God created the heaven and the earth."] * 20, vocab_size=270)
    bpe.save(str(tmp_path / "bpe.json"))
    assert load_tokenizer(str(tmp_path / "bpe.json")).sha256 == bpe.sha256


def test_hash_depends_on_content_not_on_the_file(tmp_path):
    CharTokenizer("abc").save(tmp_path / "a.json")
    CharTokenizer("cba").save(tmp_path / "b.json")  # the same alphabet, sorted
    CharTokenizer("abcd").save(tmp_path / "c.json")
    assert tokenizer_hash(str(tmp_path / "a.json")) == tokenizer_hash(str(tmp_path / "b.json"))
    assert tokenizer_hash(str(tmp_path / "a.json")) != tokenizer_hash(str(tmp_path / "c.json"))
    require_same_tokenizer(str(tmp_path / "a.json"), str(tmp_path / "b.json"), "rl.distill.teachers.x")
    with pytest.raises(ConfigError) as err:
        require_same_tokenizer(str(tmp_path / "a.json"), str(tmp_path / "c.json"), "rl.distill.teachers.x")
    message = str(err.value)
    assert "rl.distill.teachers.x" in message and "a.json" in message and "c.json" in message


def test_a_run_from_a_checkpoint_keeps_the_checkpoints_ids(tmp_path):
    # the SFT model knew both tasks; an expert trained on subtraction alone must keep its ids
    sft = CharTokenizer.train(task_texts([SUBTRACTION, ADDITION]) + [TOOL_ALPHABET])
    own = tokenizer_for(_cfg([SUBTRACTION]))
    assert own.vocab_size < sft.vocab_size  # what the expert would have built for itself
    expert = tokenizer_for(_cfg([SUBTRACTION], load=_checkpoint(tmp_path, "iter_0000010", sft)))
    assert expert.alphabet == sft.alphabet
    assert expert.encode("7-3=4") == sft.encode("7-3=4") != own.encode("7-3=4")


def test_checkpoint_without_tokenizer_and_conflicting_data_tokenizer_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="checkpoint.load.*tokenizer.json"):
        tokenizer_for(_cfg(load=str(tmp_path / "empty")))
    ckpt = _checkpoint(tmp_path, "ckpt", CharTokenizer("0123456789-="))
    CharTokenizer("xyz").save(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        tokenizer_for(_cfg(load=ckpt, tokenizer=str(tmp_path / "other.json")))
    CharTokenizer("=-0123456789").save(tmp_path / "same.json")
    assert tokenizer_for(_cfg(load=ckpt, tokenizer=str(tmp_path / "same.json"))).vocab_size == 14


def test_unreadable_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b"\xff\xfe{caf\xe9}")
    with pytest.raises(ConfigError, match="data.tokenizer.*not a readable tokenizers file"):
        load_tokenizer(str(tmp_path / "latin1.json"))
