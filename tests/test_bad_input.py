"""Malformed input, as a new user would give it, at every entry point (issue 17).

One table, one row per case: which files to break, which ``ernie`` command to run
(in this process, through ``megatron_ernie.cli.main``), and what the one-line error
must name.  Each case asserts: a non-zero exit, no traceback, no "internal error"
fallback (the problem was recognised at its entry point), the expected words in
the message, and for some cases that nothing was damaged or written.  A case is a
``Case(...)`` row: to add one, write a ``setup`` that returns the argv.

Classes (the ``cls`` column): encoding, output, indexed, checkpoint, damage,
silent (invalid input that used to be accepted), handler.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from harness import ROOT, torchrun

TINY = ROOT / "configs" / "tiny_cpu.toml"
# a 4-iteration single-process supernet run: checkpoints at 2 and 4
TINY_RUN = ["--set", "parallel.expert=1", "--set", "train.iters=4", "--set", "train.global_batch_size=4",
            "--set", "train.micro_batch_size=2", "--set", "train.eval_interval=2", "--set", "train.eval_iters=1",
            "--set", "checkpoint.save_interval=2", "--set", "elastic.eval_subnets=2"]


def _cli(argv, env=None, timeout=300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "megatron_ernie.cli", *map(str, argv)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, data_cache) -> Path:
    """A complete small run directory (the thing the checkpoint cases damage copies of)."""
    run_dir = tmp_path_factory.mktemp("bad-input") / "run"
    proc = _cli(["pretrain", "--config", TINY, "--set", f'run.dir="{run_dir}"', *TINY_RUN])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run_dir / "checkpoints" / "iter_0000004" / "meta.json").is_file()
    return run_dir


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    """A small preprocessed dataset (<dir>/data.bin/.idx + tokenizer)."""
    d = tmp_path_factory.mktemp("indexed")
    text = "\n\n".join(f"In the beginning {i} was the word and the word was {i * 7}." for i in range(400))
    (d / "corpus.txt").write_text(text)
    from megatron_ernie.data.preprocess import preprocess

    preprocess(str(d / "corpus.txt"), str(d / "data"), vocab_size=300, tokenizer_out=str(d / "tok.json"))
    return d


@dataclass
class Ctx:
    tmp: Path
    run: Callable[[], Path]  # a fresh copy of the good run (built on first use)
    data: Callable[[], Path]  # a fresh copy of the indexed dataset directory
    notes: dict = field(default_factory=dict)


@dataclass
class Case:
    id: str
    cls: str
    setup: Callable[[Ctx], list]
    expect: tuple[str, ...]  # all must appear in the error output (case-insensitive)
    after: Callable[[Ctx], None] | None = None  # extra checks: nothing damaged, nothing written


# --- helpers that make bad files ----------------------------------------------------------

FINE50 = b"fine\n" * 50
NOTEXT = json.dumps({"body": "x"}) + "\n"
LATIN1 = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1")


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _random(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def _shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.distcp"))[0]


def _truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _flip_weights(path: Path) -> None:
    """Overwrite bytes in the middle of a shard, keeping its size (silent corruption)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))


def _tiny(*sets) -> list:
    return ["show-config", "--config", str(TINY), *[a for s in sets for a in ("--set", s)]]


def _unchanged(path_key: str):
    def check(ctx: Ctx) -> None:
        path, before = ctx.notes[path_key]
        assert Path(path).read_bytes() == before, f"{path} was changed by a command that failed"
    return check


def _remember(ctx: Ctx, key: str, path: Path) -> None:
    ctx.notes[key] = (path, path.read_bytes())


# --- the cases ------------------------------------------------------------------------------

def _eval(run: Path) -> list:
    return ["eval", "--run-dir", str(run)]


def _resume(ctx: Ctx, run: Path, *sets) -> list:
    _remember(ctx, "config", run / "config.toml")
    return ["pretrain", "--config", str(run / "config.toml"), "--resume", "auto", "--set", f'run.dir="{run}"',
            *[a for s in sets for a in ("--set", s)]]


def _pretrain_data(ctx: Ctx, *sets) -> list:
    return ["pretrain", "--config", str(TINY), "--set", f'run.dir="{ctx.tmp / "r"}"', *TINY_RUN,
            *[a for s in sets for a in ("--set", s)]]


def _prefix_sets(d: Path) -> tuple:
    return (f'data.prefixes=["{d / "data"}"]', f'data.tokenizer="{d / "tok.json"}"')


def _extract_with_tmp(ctx: Ctx) -> list:
    out = ctx.tmp / "x" / "sub"
    mine = _write(out.with_name("sub.tmp") / "precious.txt", "not yours")
    _remember(ctx, "precious", mine)
    return ["extract", "--run-dir", str(ctx.run()), "--subnet", "depth=3", "--out", str(out)]


def _bad_hf(ctx: Ctx, config_json: str) -> list:
    hf = ctx.tmp / "hf"
    _write(hf / "config.json", config_json)
    _write(hf / "model.safetensors", b"")
    return ["convert", "from-hf", str(hf), str(ctx.tmp / "imported")]


CASES = [
    # --- files that are not UTF-8 text, JSONL without the field ---
    Case("config-latin1", "encoding", lambda c: ["show-config", "--config", _write(c.tmp / "a.toml", b"# " + LATIN1)],
         ("a.toml", "utf-8", "line 1")),
    Case("config-binary", "encoding", lambda c: ["show-config", "--config", _write(c.tmp / "b.toml", _random(300))],
         ("b.toml", "utf-8")),
    Case("preprocess-txt-latin1", "encoding",
         lambda c: ["preprocess", "--input", _write(c.tmp / "in.txt", b"ok line\n" + LATIN1),
                    "--output-prefix", c.tmp / "out" / "p"], ("in.txt:2", "utf-8")),
    Case("preprocess-jsonl-latin1", "encoding",
         lambda c: ["preprocess", "--input", _write(c.tmp / "in.jsonl", b'{"text": "ok"}\n{"text": "' + LATIN1[:-1]
                                                                                      + b'"}\n'),
                    "--output-prefix", c.tmp / "out" / "p"], ("in.jsonl:2", "utf-8")),
    Case("preprocess-jsonl-binary", "encoding",
         lambda c: ["preprocess", "--input", _write(c.tmp / "bin.jsonl", _random(2000, 1)),
                    "--output-prefix", c.tmp / "out" / "p"], ("bin.jsonl", "utf-8")),
    Case("preprocess-tokenizer-binary", "encoding",
         lambda c: ["preprocess", "--input", _write(c.tmp / "in.txt", "hello world\n"),
                    "--tokenizer", _write(c.tmp / "tok.json", _random(500, 2)),
                    "--output-prefix", c.tmp / "out" / "p"], ("tok.json",)),
    Case("corpus-latin1-pretrain", "encoding",
         lambda c: _pretrain_data(c, f'data.corpus="{_write(c.tmp / "l1.txt", FINE50 + LATIN1)}"',
                                  f'data.cache_dir="{c.tmp / "cache"}"'), ("l1.txt:51", "utf-8")),
    Case("corpus-jsonl-no-text-pretrain", "encoding",
         lambda c: _pretrain_data(c, f'data.corpus="{_write(c.tmp / "nt.jsonl", NOTEXT)}"',
                                  f'data.cache_dir="{c.tmp / "cache"}"'), ("nt.jsonl:1", "'text'")),
    # --- output locations that cannot be written ---
    Case("preprocess-out-under-file", "output",
         lambda c: ["preprocess", "--input", _write(c.tmp / "in.txt", "hello world\n"),
                    "--output-prefix", _write(c.tmp / "file", "x") / "sub" / "p"], ("--output-prefix", "not a directory")),
    Case("preprocess-out-unwritable", "output",
         lambda c: ["preprocess", "--input", _write(c.tmp / "in.txt", "hello world\n"),
                    "--output-prefix", "/proc/ernie-no-such/p"], ("--output-prefix", "/proc/ernie-no-such")),
    Case("pretrain-rundir-under-file", "output",
         lambda c: ["pretrain", "--config", TINY, *TINY_RUN, "--set", f'run.dir="{_write(c.tmp / "f", "x") / "run"}"'],
         ("run.dir", "not a directory")),
    Case("extract-out-under-file", "output",
         lambda c: ["extract", "--run-dir", c.run(), "--subnet", "depth=3", "--out", _write(c.tmp / "f", "x") / "s"],
         ("--out", "not a directory")),
    Case("search-out-unwritable", "output",
         lambda c: ["search", "--run-dir", c.run(), "--out", "/proc/ernie-no-such/out"], ("--out", "/proc")),
    Case("reshard-out-under-file", "output",
         lambda c: ["convert", "reshard", _latest(c.run()), _write(c.tmp / "f", "x") / "o"], ("not a directory",)),
    # --- indexed data that does not match its index, reached from pretrain ---
    Case("bin-half", "indexed", lambda c: (_truncate(c.data() / "data.bin"), _pretrain_data(c, *_prefix_sets(c.tmp)))[1],
         ("data.bin", "bytes", ".idx")),
    Case("bin-odd", "indexed",
         lambda c: (_truncate(c.data() / "data.bin", (c.tmp / "data.bin").stat().st_size - 3),
                    _pretrain_data(c, *_prefix_sets(c.tmp)))[1], ("data.bin", "bytes")),
    Case("idx-cut", "indexed", lambda c: (_truncate(c.data() / "data.idx"), _pretrain_data(c, *_prefix_sets(c.tmp)))[1],
         ("data.idx",)),
    Case("idx-random", "indexed",
         lambda c: (_write(c.data() / "data.idx", _random(4000, 3)), _pretrain_data(c, *_prefix_sets(c.tmp)))[1],
         ("data.idx",)),
    Case("bin-missing", "indexed",
         lambda c: ((c.data() / "data.bin").unlink(), _pretrain_data(c, *_prefix_sets(c.tmp)))[1], ("data.bin",)),
    # --- damaged checkpoints, from every command that reads one ---
    Case("eval-shard-truncated", "checkpoint", lambda c: (_truncate(_shard(_latest(r := c.run()))), _eval(r))[1],
         ("distcp", "truncated")),
    Case("eval-shard-deleted", "checkpoint", lambda c: (_shard(_latest(r := c.run())).unlink(), _eval(r))[1],
         ("distcp", "missing")),
    Case("eval-meta-corrupt", "checkpoint",
         lambda c: (_write(_latest(r := c.run()) / "meta.json", "{not json"), _eval(r))[1], ("meta.json",)),
    Case("eval-metadata-random", "checkpoint",
         lambda c: (_write(_latest(r := c.run()) / ".metadata", _random(5000, 4)), _eval(r))[1], (".metadata",)),
    Case("eval-latest-missing-iter", "checkpoint",
         lambda c: (_write((r := c.run()) / "checkpoints" / "latest", "iter_0000099\n"), _eval(r))[1],
         ("iter_0000099",)),
    Case("eval-weights-overwritten", "checkpoint",
         lambda c: (_flip_weights(_shard(_latest(r := c.run()))), _eval(r))[1], ("distcp", "checksum")),
    Case("eval-data-of-another-tokenizer", "silent", lambda c: _eval(c.run()) + ["--set", "data.vocab_size=512"],
         ("vocab_size=512", "tokenizer.json", "another vocabulary", "ernie preprocess", "data.prefixes")),
    Case("extract-shard-truncated", "checkpoint",
         lambda c: (_truncate(_shard(_latest(r := c.run()))),
                    ["extract", "--run-dir", r, "--subnet", "depth=3", "--out", c.tmp / "sub"])[1],
         ("distcp", "truncated")),
    Case("search-meta-corrupt", "checkpoint",
         lambda c: (_write(_latest(r := c.run()) / "meta.json", _random(100, 5)), ["search", "--run-dir", r])[1],
         ("meta.json",)),
    Case("summary-meta-corrupt", "checkpoint",
         lambda c: (_write(_latest(r := c.run()) / "meta.json", "[1, 2"), ["summary", "--run-dir", r])[1],
         ("meta.json",)),
    Case("summary-latest-missing-iter", "checkpoint",
         lambda c: (_write((r := c.run()) / "checkpoints" / "latest", "iter_0000099\n"),
                    ["summary", "--run-dir", r])[1], ("iter_0000099",)),
    Case("resume-shard-truncated", "checkpoint",
         lambda c: (_truncate(_shard(_latest(r := c.run()))), _resume(c, r))[1], ("distcp", "truncated"),
         _unchanged("config")),
    Case("resume-weights-overwritten", "checkpoint",
         lambda c: (_flip_weights(_shard(_latest(r := c.run()))), _resume(c, r))[1], ("distcp", "checksum")),
    Case("resume-other-size", "checkpoint", lambda c: _resume(c, c.run(), "model.hidden_size=32"),
         ("model.hidden_size", "64", "32"), _unchanged("config")),
    Case("load-other-size", "checkpoint",
         lambda c: _pretrain_data(c, f'checkpoint.load="{_latest(c.run())}"', "model.num_layers=2",
                                  "elastic.depth=[1, 2]"), ("model.num_layers", "4")),
    Case("load-missing-folder", "checkpoint",
         lambda c: _pretrain_data(c, f'checkpoint.load="{c.tmp / "nowhere"}"'), ("checkpoint.load", "nowhere")),
    Case("reshard-weights-overwritten", "checkpoint",
         lambda c: (_flip_weights(_shard(ck := _latest(c.run()))), ["convert", "reshard", ck, c.tmp / "o"])[1],
         ("distcp", "checksum")),
    Case("to-hf-weights-overwritten", "checkpoint",
         lambda c: (_flip_weights(_shard(ck := _latest(c.run()))), ["convert", "to-hf", ck, c.tmp / "o"])[1],
         ("distcp", "checksum")),
    Case("from-hf-config-garbage", "checkpoint", lambda c: _bad_hf(c, "{garbage"), ("config.json",)),
    Case("from-hf-config-wrong-types", "checkpoint",
         lambda c: _bad_hf(c, json.dumps({"hidden_size": "big", "num_hidden_layers": -1})), ("config.json",)),
    # --- nothing may be destroyed by a command that fails or that did not create it ---
    Case("extract-keeps-foreign-tmp", "damage", _extract_with_tmp, ("sub.tmp",), _unchanged("precious")),
    # --- invalid input that used to be accepted ---
    Case("elastic-depth-too-deep", "silent", lambda c: _tiny("elastic.depth=[2, 5]"), ("elastic.depth", "5")),
    Case("elastic-experts-too-many", "silent", lambda c: _tiny("elastic.experts=[2, 8]"), ("elastic.experts", "8")),
    Case("elastic-topk-too-big", "silent", lambda c: _tiny("elastic.topk=[1, 3]"), ("elastic.topk", "3")),
    Case("elastic-ffn-not-dividing", "silent", lambda c: _tiny("elastic.ffn=[0.3, 1.0]"), ("elastic.ffn", "0.3")),
    Case("pretrain-elastic-depth", "silent", lambda c: _pretrain_data(c, "elastic.depth=[2, 6]"), ("elastic.depth",)),
    Case("lr-inf", "silent", lambda c: _tiny("optimizer.lr=inf"), ("optimizer.lr", "inf")),
    Case("norm-eps-nan", "silent", lambda c: _tiny("model.norm_epsilon=nan"), ("model.norm_epsilon", "nan")),
    Case("toml-file-nan", "silent",
         lambda c: ["show-config", "--config", _write(c.tmp / "n.toml", "[optimizer]\nweight_decay = inf\n")],
         ("optimizer.weight_decay", "inf")),
    Case("world-size-negative", "silent", lambda c: [*_tiny(), "--world-size", "-4"], ("--world-size", "-4")),
    Case("reshard-world-negative", "silent", lambda c: ["convert", "reshard", _latest(c.run()), c.tmp / "o",
                                                        "--world", "-2"], ("--world", "-2")),
    Case("submit-dry-run-bad-model", "silent",
         lambda c: ["submit", "pretrain", "--config", TINY, "--dry-run", "--set", "model.hidden_size=-64"],
         ("model.hidden_size", "-64")),
    Case("submit-dry-run-unknown-key", "silent",
         lambda c: ["submit", "pretrain", "--config", TINY, "--dry-run", "--set", "model.bogus=1"],
         ("model.bogus", "unknown key")),
    Case("submit-dry-run-bad-elastic", "silent",
         lambda c: ["submit", "pretrain", "--config", TINY, "--dry-run", "--set", "slurm.gpus_per_node=2",
                    "--set", "elastic.depth=[9]"],
         ("elastic.depth", "9")),
    Case("rl-task-unknown", "silent",
         lambda c: ["show-config", "--config", ROOT / "configs" / "rl_tiny_cpu.toml", "--set",
                    'rl.tasks=[{name = "no_such_task"}]'], ("no_such_task",)),
]


@pytest.fixture
def ctx(request, tmp_path, data_cache):
    copies = []

    def run() -> Path:
        if not copies:
            copies.append(shutil.copytree(request.getfixturevalue("good_run"), tmp_path / "run"))
        return copies[0]

    def data() -> Path:
        src = request.getfixturevalue("indexed")
        for name in ("data.bin", "data.idx", "tok.json"):
            shutil.copy(src / name, tmp_path / name)
        return tmp_path

    return Ctx(tmp_path, run, data)


def call_cli(argv) -> tuple[int, str]:
    """``ernie ARGV`` in this process: (exit code, stdout + stderr).  An exception escaping
    the CLI is returned as code -1 with its traceback (what a user would have seen)."""
    from megatron_ernie import cli

    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - that is what this test looks for
            import traceback

            code = -1
            traceback.print_exc(file=out)
        finally:
            _reset_distributed()
    return code, out.getvalue()


def _reset_distributed() -> None:
    """A case that failed half-way through start-up must not leak its process group into the next."""
    import torch.distributed as dist

    if "megatron.core" in sys.modules:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.cls}:{c.id}" for c in CASES])
def test_bad_input_is_refused_clearly(case: Case, ctx: Ctx):
    argv = case.setup(ctx)
    code, output = call_cli(argv)
    assert code not in (0, None), f"accepted silently (exit {code}):\n{output[-3000:]}"
    assert "Traceback" not in output, output[-6000:]
    assert "internal error" not in output, f"not recognised at its entry point:\n{output[-3000:]}"
    for word in case.expect:
        assert word.lower() in output.lower(), f"{word!r} not in the error:\n{output[-3000:]}"
    if case.after:
        case.after(ctx)


# --- the top-level handler ----------------------------------------------------------------

def test_unexpected_error_is_one_line_with_a_hint(monkeypatch):
    from megatron_ernie import config as C

    def broken(*a, **k):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(C, "dumps", broken)
    code, output = call_cli(_tiny())
    assert code not in (0, None) and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "simulated bug" in lines[0] and "--debug" in lines[0], output
    code, output = call_cli(["--debug", *_tiny()])
    assert code not in (0, None) and "Traceback" in output and "simulated bug" in output, output


def test_torchrun_prints_the_error_once(tmp_path, data_cache):
    corpus = _write(tmp_path / "l1.txt", b"fine\n" * 20 + LATIN1)
    cmd = ["-m", "megatron_ernie.cli", "pretrain", "--config", TINY, "--set", f'run.dir="{tmp_path / "r"}"',
           "--set", f'data.corpus="{corpus}"', "--set", f'data.cache_dir="{tmp_path / "cache"}"']
    with pytest.raises(AssertionError) as failed:
        torchrun(2, cmd, timeout=300)
    text = str(failed.value)  # the launcher's own ChildFailedError report follows; ranks print no traceback
    assert "UnicodeDecodeError" not in text and "CorpusError" not in text, text[-4000:]
    assert text.count("l1.txt:21: not UTF-8") == 1, text[-4000:]


# --- a resumed run: TensorBoard without the killed run's extra steps, summary without duplicates ----

def test_resume_purges_tensorboard_steps_beyond_the_checkpoint(good_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Path(shutil.copytree(good_run, tmp_path / "run"))
    _write(run / "checkpoints" / "latest", "iter_0000002\n")  # as if killed after logging steps 3, 4
    shutil.rmtree(run / "checkpoints" / "iter_0000004")
    proc = _cli(["pretrain", "--config", run / "config.toml", "--resume", "auto", "--set", f'run.dir="{run}"'])
    assert proc.returncode == 0, proc.stderr[-4000:]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4], steps
    code, output = call_cli(["summary", "--run-dir", run])
    assert code == 0, output
    assert output.count("validation loss at iteration 4") == 1, output
    assert output.count("validation loss at iteration 2") == 1, output


# --- eval on any checkpoint, full precision, clean exit -----------------------------------------

def test_eval_json_full_precision_and_plain_checkpoints(good_run, tmp_path):
    proc = _cli(["eval", "--run-dir", good_run, "--subnet", "depth=3,topk=1", "--json"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(repr(row["valid_loss"])) > 8, row  # not rounded to 4 decimals
    sub = tmp_path / "sub"
    proc = _cli(["extract", "--run-dir", good_run, "--subnet", "depth=3,topk=1", "--out", sub])
    assert proc.returncode == 0, proc.stderr[-4000:]
    plain = _cli(["eval", "--run-dir", sub, "--json"])
    assert plain.returncode == 0, plain.stderr[-4000:]
    plain_row = json.loads(plain.stdout.strip().splitlines()[-1])
    # the extracted model is that sub-network: the same validation loss
    assert plain_row["valid_loss"] == pytest.approx(row["valid_loss"], abs=1e-5)
