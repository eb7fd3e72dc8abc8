"""Checkpoint conversion: Hugging Face export/import checked by ``transformers`` itself,
offline resharding, inspection, and clear errors for bad inputs.

Fast tests use a model that ``transformers`` creates and saves (a third-party
ERNIE 4.5 checkpoint) and the checkpoint we import from it.  Slow tests train
our megatron-core model at TP1/TP2/PP2/EP2/TP2PP2 (one 4-process launch),
export, and compare ``transformers``' logits and greedy tokens with what our
model computed at the saved layout; then reshard/import and reload at a new
layout (one 2-process launch).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from harness import ROOT, torchrun
from megatron_ernie.config.errors import ConfigError
from megatron_ernie.convert import ernie45 as hf
from megatron_ernie.convert import model_keys as K
from megatron_ernie.convert.dcp_io import DcpReader
from megatron_ernie.convert.errors import ConvertError
from megatron_ernie.convert.export import export_hf
from megatron_ernie.convert.importer import import_hf
from megatron_ernie.convert.reshard import reshard
from megatron_ernie.convert.summary import describe

transformers = pytest.importorskip("transformers")

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void."


# --- helpers ---------------------------------------------------------------------------------------


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def hf_logits(model_dir, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(tokens).logits


def edit_meta(ckpt: Path, section: str, **fields) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["extra"]["config"][section].update(fields)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial" in p.name)


# --- a third-party ERNIE 4.5 model, made and saved by transformers ---------------------------------

MOE = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, use_bias=False,
           moe_num_experts=4, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=2,
           moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _tokenizer_file(path: Path) -> Path:
    from megatron_ernie.data.tokenizer import train_tokenizer

    train_tokenizer([TEXT] * 20, vocab_size=300).save(str(path))
    return path


def make_hf_model(out: Path, moe: bool = True, tied: bool = False, **changes) -> Path:
    """A randomly initialised ERNIE 4.5 saved with save_pretrained (plus our tokenizer)."""
    torch.manual_seed(0)
    fields = dict(MOE, tie_word_embeddings=tied, **changes)
    if moe:
        config = transformers.Ernie4_5_MoeConfig(**fields)
        model = transformers.Ernie4_5_MoeForCausalLM(config)
    else:
        dense = {k: v for k, v in fields.items() if not k.startswith("moe_")}
        model = transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config(head_dim=8, **dense))
    with torch.no_grad():  # make norms and router non-trivial so mistakes show in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("mlp.gate.weight"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    model.save_pretrained(str(out))
    _tokenizer_file(out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf") / "ernie45")


@pytest.fixture(scope="module")
def imported(hf_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    import_hf(hf_model, out, overrides=["data.vocab_size=300"], max_chunk_bytes=4096)
    return out


@pytest.fixture
def ckpt_copy(imported, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(imported, dst)
    return dst


# --- fast: layouts and transforms ------------------------------------------------------------------


def test_qkv_split_merge_are_inverse_and_follow_megatron_grouping():
    heads, groups, d, h = 8, 2, 4, 6
    qkv = torch.arange((heads + 2 * groups) * d * h, dtype=torch.float32).reshape(-1, h)
    q, k, v = hf.split_qkv(qkv, heads, groups, d)
    assert (q.shape, k.shape, v.shape) == ((heads * d, h), (groups * d, h), (groups * d, h))
    # group 1 starts after group 0's 4 query heads + k + v = 6 heads of rows
    assert torch.equal(q[4 * d], qkv[6 * d]) and torch.equal(k[d], qkv[10 * d]) and torch.equal(v[0], qkv[5 * d])
    assert torch.equal(hf.merge_qkv(q, k, v, groups), qkv)


def test_rope_row_permutation_turns_megatron_rotary_into_ernie45_rotary():
    """Scores of megatron's rotate-half RoPE equal ERNIE 4.5's interleaved RoPE on permuted rows."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.models.ernie4_5_moe import modeling_ernie4_5_moe as ernie

    torch.manual_seed(0)
    seq, d, hidden = 7, 8, 12
    x = torch.randn(seq, hidden)
    wq, wk = torch.randn(d, hidden), torch.randn(d, hidden)
    rotary = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    half = rotary.get_freqs_non_repeated(seq)  # what RotaryEmbedding.forward builds, minus its move to CUDA
    freqs = torch.cat((half, half), dim=-1)[:, None, None, :]
    mq = _apply_rotary_pos_emb_bshd((x @ wq.T)[:, None, None], freqs)[:, 0, 0]
    mk = _apply_rotary_pos_emb_bshd((x @ wk.T)[:, None, None], freqs)[:, 0, 0]
    cfg = transformers.Ernie4_5_MoeConfig(**MOE)
    cos, sin = ernie.Ernie4_5_MoeRotaryEmbedding(cfg)(x, torch.arange(seq)[None])
    pq, pk = (hf.halves_to_interleaved(w, d) for w in (wq, wk))
    hq, hk = ernie.apply_rotary_pos_emb((x @ pq.T)[None, None], (x @ pk.T)[None, None], cos[:, :, :d], sin[:, :, :d])
    assert torch.allclose(mq @ mk.T, hq[0, 0] @ hk[0, 0].T, atol=1e-5)
    wrong, _ = ernie.apply_rotary_pos_emb((x @ wq.T)[None, None], (x @ wk.T)[None, None], cos[:, :, :d], sin[:, :, :d])
    assert not torch.allclose(mq @ mk.T, wrong[0, 0] @ hk[0, 0].T, atol=1e-3)  # the permutation matters
    assert torch.equal(hf.interleaved_to_halves(pq, d), wq)


def test_router_normalisation_maps_both_ways():
    base = dict(architectures=[hf.MOE_ARCH], num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-5, moe_num_experts=4, moe_k=2,
                moe_intermediate_size=16)
    assert hf.config_from_hf({**base, "moe_norm_min": 1e-12})["moe.router_pre_softmax"] is False
    assert hf.config_from_hf({**base, "moe_norm_min": 1.0})["moe.router_pre_softmax"] is True
    with pytest.raises(ConfigError, match="config.json:moe_norm_min = 0.7: .*only some tokens are renormalised"):
        hf.config_from_hf({**base, "moe_norm_min": 0.7})
    with pytest.raises(ConfigError, match="config.json:moe_layer_interval = 2"):
        hf.config_from_hf({**base, "moe_layer_interval": 2})


# --- fast: import -> export with a third-party model -----------------------------------------------


@pytest.mark.parametrize("variant", ["moe", "moe_tied", "dense"])
def test_hf_import_then_export_gives_the_same_model_to_transformers(tmp_path, variant):
    src = make_hf_model(tmp_path / "src", moe=variant != "dense", tied=variant == "moe_tied")
    import_hf(src, tmp_path / "ckpt", overrides=["data.vocab_size=300"])
    report = export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert report["architecture"] == (hf.DENSE_ARCH if variant == "dense" else hf.MOE_ARCH)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 384  # 300 padded to a multiple of 128 (zero rows)
    tokens = torch.tensor([[3, 17, 250, 299, 42, 7, 8, 100, 5, 77]])
    a, b = hf_logits(src, tokens), hf_logits(tmp_path / "out", tokens)
    assert (a - b[..., :300]).abs().max().item() <= 1e-5
    assert a.std().item() > 0.1  # a non-degenerate comparison
    # round trip through our format is bit-identical once the vocabulary is padded
    import_hf(tmp_path / "out", tmp_path / "ckpt2", overrides=["data.vocab_size=300"])
    export_hf(tmp_path / "ckpt2", tmp_path / "out2")
    assert files_of(tmp_path / "out") == files_of(tmp_path / "out2")


def test_model_without_our_tokenizer_keeps_its_special_ids(hf_model, tmp_path):
    src = tmp_path / "no-tokenizer"
    shutil.copytree(hf_model, src)
    (src / "tokenizer.json").unlink()
    import_hf(src, tmp_path / "ckpt", overrides=["data.vocab_size=300"])
    report = export_hf(tmp_path / "ckpt", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert report["tokenizer"] == []
    assert (config["eos_token_id"], config["pad_token_id"]) == (original["eos_token_id"], original["pad_token_id"])


def test_imported_checkpoint_is_weights_only_with_model_config(imported):
    meta = json.loads((imported / "meta.json").read_text())
    assert meta["extra"]["weights_only"] is True and meta["iteration"] == 0
    model = meta["extra"]["config"]["model"]
    moe = meta["extra"]["config"]["moe"]
    assert (model["num_layers"], model["hidden_size"], model["num_query_groups"]) == (3, 32, 2)
    assert (moe["num_experts"], moe["router_topk"], moe["shared_expert_ffn_hidden_size"],
            moe["first_dense_layers"]) == (4, 2, 32, 1)
    reader = DcpReader(imported)
    assert not [k for k in reader.tensors() if not K.is_model_key(k)]  # no optimizer state
    # the expert tensor was written one expert per chunk (streaming)
    assert reader.tensors()["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"].chunks == 4


def test_export_shards_with_an_index_that_transformers_loads(imported, tmp_path):
    report = export_hf(imported, tmp_path / "out", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and report["files"] == shards + ["model.safetensors.index.json"]
    assert index["metadata"]["total_size"] == report["bytes"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_export_casts_to_bf16(imported, tmp_path):
    export_hf(imported, tmp_path / "out", dtype="bf16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.moe_statics.e_score_correction_bias").dtype == torch.float32


def test_tokenizer_loads_in_transformers_with_our_ids(imported, tmp_path):
    from megatron_ernie.data.tokenizer import load_tokenizer

    export_hf(imported, tmp_path / "out")
    ours = load_tokenizer(str(imported / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ours.encode(TEXT)
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eod, ours.pad)
    assert theirs.decode(ours.encode(TEXT)) == TEXT


# --- fast: bad inputs --------------------------------------------------------------------------------


def test_missing_shard_is_named(ckpt_copy, tmp_path):
    (ckpt_copy / "__0_0.distcp").unlink()
    with pytest.raises(ConvertError, match=r"__0_0\.distcp is missing; it holds \d+ tensors"):
        export_hf(ckpt_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_truncated_shard_is_named(ckpt_copy, tmp_path):
    data = ckpt_copy / "__0_0.distcp"
    os.truncate(data, data.stat().st_size - 100)
    with pytest.raises(ConvertError, match=r"__0_0\.distcp is truncated: \d+ bytes, the index needs at least"):
        reshard(ckpt_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_damaged_shard_fails_midway_and_leaves_nothing_that_looks_complete(ckpt_copy, tmp_path):
    reader = DcpReader(ckpt_copy)
    last = reader.metadata.storage_data  # damage the bytes of a tensor that is exported late
    info = next(v for k, v in last.items() if k.fqn == K.FINAL_NORM)
    with open(ckpt_copy / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\0" * info.length)
    (ckpt_copy / "checksums.json").unlink()  # a checkpoint from before the manifest: caught mid-export
    with pytest.raises(ConvertError, match="cannot read 'decoder.final_layernorm.weight'.*damaged"):
        export_hf(ckpt_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_checkpoint_from_a_different_model_config_is_refused(ckpt_copy, tmp_path):
    edit_meta(ckpt_copy, "model", ffn_hidden_size=64)
    with pytest.raises(ConvertError, match=r"decoder.layers.0.mlp.linear_fc1.weight is \[96, 32\] in the files, "
                                           r"the config needs \[128, 32\]"):
        export_hf(ckpt_copy, tmp_path / "out")
    with pytest.raises(ConvertError, match="do not match its config"):
        reshard(ckpt_copy, tmp_path / "out2")


@pytest.mark.parametrize("section,field,value,message", [
    ("moe", "score_function", "sigmoid", "moe.score_function = 'sigmoid'"),
    ("model", "normalization", "LayerNorm", "model.normalization = 'LayerNorm'"),
    ("moe", "shared_expert_ffn_hidden_size", 24, "in units of moe.expert_ffn_hidden_size=16"),
])
def test_unsupported_option_is_refused_with_its_field(ckpt_copy, tmp_path, section, field, value, message):
    edit_meta(ckpt_copy, section, **{field: value})
    with pytest.raises(ConfigError, match=message):
        export_hf(ckpt_copy, tmp_path / "out")


def test_elastic_supernet_exports_its_full_network(ckpt_copy, tmp_path):
    edit_meta(ckpt_copy, "elastic", enabled=True, depth=[2, 3], topk=[1, 2])
    report = export_hf(ckpt_copy, tmp_path / "out")
    assert "largest sub-network" in report["note"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["moe_k"] == 2


def test_existing_output_is_refused_before_any_work(imported, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    for convert in (lambda: export_hf(imported, tmp_path / "out"), lambda: reshard(imported, tmp_path / "out")):
        with pytest.raises(ConfigError, match="already exists; remove it or choose a new directory"):
            convert()
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_import_refuses_what_our_model_lacks(tmp_path, hf_model):
    biased = make_hf_model(tmp_path / "biased", use_bias=True)
    with pytest.raises(ConfigError, match="config.json:use_bias = True: our layers have no biases"):
        import_hf(biased, tmp_path / "a")
    with pytest.raises(ConfigError, match="model.hidden_size = 64: the Hugging Face model has 32"):
        import_hf(hf_model, tmp_path / "b", overrides=["model.hidden_size=64"])
    corrected = tmp_path / "corrected"
    shutil.copytree(hf_model, corrected)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(corrected / "model.safetensors"))
    tensors["model.layers.2.mlp.moe_statics.e_score_correction_bias"] += 0.5
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(corrected / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"experts.3.up_proj.weight is missing.*layers.2.mlp.moe_statics.*non-zero"):
        import_hf(corrected, tmp_path / "c")
    os.truncate(corrected / "model.safetensors", 5000)
    with pytest.raises(ConvertError, match=r"model.safetensors is not a complete safetensors file"):
        import_hf(corrected, tmp_path / "d")
    assert not leftovers(tmp_path) and not (tmp_path / "c").exists()


def test_reshard_refuses_model_changes_and_layouts_that_do_not_fit(imported, tmp_path):
    with pytest.raises(ConfigError, match="reshard changes only the layout"):
        reshard(imported, tmp_path / "a", ["model.num_layers=6"])
    with pytest.raises(ConfigError, match="model.num_attention_heads = 4: must be divisible by parallel.tensor=8"):
        reshard(imported, tmp_path / "a", ["parallel.tensor=8", "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="moe.num_experts = 4: must be divisible by parallel.expert=3"):
        reshard(imported, tmp_path / "a", ["parallel.expert=3"])


def test_optimizer_groups_merge_for_ep1_and_split_for_ep2():
    from megatron_ernie.convert import optimizer_chains as chains

    group = lambda wd, expert: {"wd_mult": wd, "lr_mult": 1.0, "is_decoupled_lr": False, "lr": 3e-4,  # noqa: E731
                                "is_expert_parallel": expert}
    chained = {"optimizer": {0: {"state": {"common_step": 4}, "param_groups": [group(1.0, False), group(0.0, False)]},
                             1: {"state": {"common_step": 4}, "param_groups": [group(1.0, True)]}}}
    single = chains.convert_common(chained, to_chained=False)["optimizer"]
    assert single == chained["optimizer"][0]
    again = chains.convert_common({"optimizer": single}, to_chained=True)["optimizer"]
    assert again == chained["optimizer"]
    assert chains.convert_common(chained, to_chained=True) is chained  # already in the target form
    assert chains.rename("chained_1.optimizer.state.exp_avg.decoder.layers.1.mlp.experts.experts.linear_fc1.weight") \
        == "optimizer.state.exp_avg.decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
    distributed = {"optimizer": {0: {"optimizer": {"param_groups": [group(0.0, False)]}},
                                 1: {"optimizer": {"param_groups": [group(1.0, True)]}}}}
    with pytest.raises(ConvertError, match="has no dense counterpart"):
        chains.convert_common(distributed, to_chained=False)


def test_inspect_counts_total_and_active_parameters(imported):
    info = describe(imported)
    h, v, layers = 32, 384, 3
    attention = 2 * h + (4 + 2 * 2) * 8 * h + h * h  # two norms, qkv, proj
    dense_mlp = 3 * 48 * h
    expert = 3 * 16 * h
    moe_layer = 4 * h + 4 * expert + 3 * 32 * h  # router, 4 experts, shared (2 x 16)
    total = 2 * v * h + layers * attention + dense_mlp + 2 * moe_layer + h
    p = info["parameters"]
    assert p["total"] == total
    assert p["active"] == total - 2 * (4 - 2) * expert
    assert p["routed_experts"] == 2 * 4 * expert and p["embedding"] == v * h
    assert info["weights_only"] and info["optimizer_state"]["tensors"] == 0
    assert info["iteration"] == 0 and info["source"]["architecture"] == hf.MOE_ARCH


def test_cli_entry_points(imported, tmp_path, capsys):
    from megatron_ernie.convert import cli, summary

    assert summary.main([str(imported), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["routed_experts"] == 2 * 4 * 3 * 16 * 32
    assert cli.main(["to-hf", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "checkpoint = " in capsys.readouterr().err
    assert cli.main(["reshard", str(imported), str(tmp_path / "r"), "--set", "parallel.expert=2",
                     "--drop-optimizer"]) == 0
    assert json.loads(capsys.readouterr().out)["to_layout"]["ep"] == 2
    assert cli.main(["to-hf", str(imported), str(tmp_path / "h"), "--max-shard-size", "40KB"]) == 0
    assert len(json.loads(capsys.readouterr().out)["files"]) > 3
    assert cli.parse_size("5GB") == 5 * 10**9 and cli.parse_size("2GiB") == 2 << 30
    with pytest.raises(ConfigError, match="--max-shard-size"):
        cli.parse_size("lots")


# --- ernie eval of an import: a foreign vocabulary is refused in one line, with the fix that works ---


def ernie_in_process(argv) -> tuple[int, str, str]:
    """``ernie ARGV`` in this process, as a user runs it: (exit code, stdout, stderr).  The launcher
    variables it exports and the process group it opens do not outlive the call."""
    import contextlib
    import io

    import torch.distributed as dist

    from megatron_ernie import cli

    saved, out, err = dict(os.environ), io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if dist.is_initialized():
            dist.destroy_process_group()
    return code, out.getvalue(), err.getvalue()


def eval_json(checkpoint, *sets) -> dict:
    code, out, err = ernie_in_process(["eval", "--run-dir", checkpoint, "--json", *[a for s in sets for a in ("--set", s)]])
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def assert_one_line_error(code: int, err: str, *words: str) -> str:
    line = err.strip()
    assert code == 2, err[-3000:]
    assert "\n" not in line and "Traceback" not in line and line.startswith("ernie eval: error: "), err[-3000:]
    for word in words:
        assert word in line, line
    return line


def transformers_valid_loss(hf_dir: Path, config: Path, sets: list) -> float:
    """Mean next-token loss of ``transformers``' model on the validation samples `ernie eval` reads
    (the same data pipeline and sample order), over our vocabulary padded to a multiple of 128
    (the import's padding rows are zero, so those logits are 0 and take part in the softmax)."""
    from megatron_ernie import config as C
    from megatron_ernie.data.pipeline import setup_data

    cfg = C.load(config, sets)
    t = cfg.train
    n = t.eval_iters * t.global_batch_size
    data = setup_data(cfg.data, cfg.model.seq_length, (t.iters * t.global_batch_size, n, n))
    samples = [data.valid[i] for i in range(n)]
    tokens, labels, mask = (torch.stack([torch.as_tensor(x[k]) for x in samples]) for k in ("tokens", "labels",
                                                                                            "loss_mask"))
    logits = hf_logits(hf_dir, tokens.long())
    padded = torch.cat([logits, torch.zeros(*logits.shape[:2], 384 - logits.shape[-1])], dim=-1)
    ce = torch.nn.functional.cross_entropy(padded.flatten(0, 1), labels.long().flatten(), reduction="none")
    return ((ce * mask.flatten().float()).sum() / mask.float().sum()).item()


def test_eval_of_a_foreign_vocabulary_import_names_the_checkpoint_and_the_fix(imported, hf_model, tmp_path,
                                                                               data_cache):
    """The third-party model's tokenizer (trained on TEXT) is not the one any corpus of ours trains:
    eval must refuse to score it on such data, and the fix it prints must give a result."""
    corpus = tmp_path / "valid.txt"
    corpus.write_text("\n\n".join(f"And the evening and the morning were the day {i}." for i in range(300)))
    small = f'data.corpus="{corpus}"'  # a corpus of its own: tokenizer trained at vocab 300 in seconds
    split = 'data.split="8,2,0"'
    code, _, err = ernie_in_process(["eval", "--run-dir", imported, "--json", "--set", small, "--set", split])
    line = assert_one_line_error(code, err, f"data = 'corpus={corpus}, vocab_size=300'", str(imported),
                                 str(imported / "tokenizer.json"), "ernie preprocess", "data.prefixes")
    # the fix it names: the text tokenized with the checkpoint's own tokenizer, passed with --set
    from megatron_ernie.data.preprocess import preprocess

    preprocess(str(corpus), str(tmp_path / "P"), tokenizer_path=str(imported / "tokenizer.json"))
    fixed = eval_json(imported, f'data.prefixes=["{tmp_path / "P"}"]', f"data.tokenizer={imported / 'tokenizer.json'}",
                      split)
    # ... and it is the loss transformers computes for the Hugging Face model on the same validation samples
    reference_loss = transformers_valid_loss(hf_model, imported / "config.toml",
                                             [f'data.prefixes=["{tmp_path / "P"}"]',
                                              f"data.tokenizer={imported / 'tokenizer.json'}", split])
    print(f"foreign import, fixed data: ernie eval {fixed['valid_loss']!r}, transformers {reference_loss!r}")
    assert fixed["valid_loss"] == pytest.approx(reference_loss, rel=1e-5), line
    # a Hugging Face model without a tokenizer we read: nothing to tokenize a corpus with
    bare = tmp_path / "bare"
    shutil.copytree(hf_model, bare)
    (bare / "tokenizer.json").unlink()
    import_hf(bare, tmp_path / "bare_ckpt", overrides=["data.vocab_size=300"])
    code, _, err = ernie_in_process(["eval", "--run-dir", tmp_path / "bare_ckpt", "--set", small, "--set", split])
    assert_one_line_error(code, err, str(tmp_path / "bare_ckpt"), "has no tokenizer.json", "data.prefixes")


# --- slow: our trained model at several layouts vs transformers ------------------------------------

LAYOUTS = {
    "tp1": [],
    "tp2": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline=2"],
    "ep2": ["parallel.expert=2"],
    "tp2pp2": ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2"],
    # BASE routes with router_pre_softmax=true; this one with megatron's default (softmax over the top-k)
    "ep2_renorm": ["parallel.expert=2", "moe.router_pre_softmax=false"],
    # an elastic supernet (the quickstart's mode) exports as its full network
    "ep2_elastic": ["parallel.expert=2", "elastic.enabled=true", "elastic.depth=[3, 4]", "elastic.experts=[2, 4]",
                    "elastic.topk=[1, 2]", "elastic.eval_subnets=0"],
}
COMMON = ["moe.first_dense_layers=1", "moe.shared_expert_ffn_hidden_size=128", "train.iters=3"]
SEQ, PROMPT, STEPS = 32, 8, 6


def run_convert_worker(scenario: str, tmp: Path, case: dict, nproc: int) -> dict:
    out = tmp / "result.json"
    torchrun(nproc, [ROOT / "tests" / "dist" / "convert_worker.py", scenario, out, json.dumps(case)])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> dict:
    rng = random.Random(0)
    tokens = [[rng.randrange(2, 500) for _ in range(SEQ)] for _ in range(2)]
    case = {"tokens": tokens, "prompt": [t[:PROMPT] for t in tokens], "steps": STEPS, "common": COMMON,
            "layouts": LAYOUTS}
    tmp = tmp_path_factory.mktemp("convert-ref")
    results = run_convert_worker("reference", tmp, case, nproc=4)
    for name, r in results.items():
        r["hf"] = tmp / f"hf_{name}"
        r["export"] = export_hf(r["checkpoint"], r["hf"])
    return {"case": case, "layouts": results, "tmp": tmp}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "ep2", "ep2_renorm", "ep2_elastic"])
def test_transformers_logits_equal_ours_at_the_saved_layout(reference, layout):
    r = reference["layouts"][layout]
    ours = torch.tensor(r["logits"])
    theirs = hf_logits(r["hf"], torch.tensor(reference["case"]["tokens"]))
    diff = (theirs - ours).abs().max().item()
    print(f"{layout}: max |logits diff| = {diff:.3g} (logits std {ours.std().item():.3g})")
    assert diff <= 1e-5
    assert ours.std().item() > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "ep2", "ep2_renorm", "ep2_elastic"])
def test_transformers_greedy_generation_equals_ours(reference, layout):
    r = reference["layouts"][layout]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(r["hf"])).eval()
    prompt = torch.tensor(reference["case"]["prompt"])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=STEPS, do_sample=False)
    assert out[:, PROMPT:].tolist() == r["greedy"]


@pytest.mark.slow
def test_export_import_export_is_bit_identical(reference):
    r, tmp = reference["layouts"]["ep2"], reference["tmp"]
    import_hf(r["hf"], tmp / "imported_ep2", overrides=COMMON + ["data.vocab_size=512"])
    export_hf(tmp / "imported_ep2", tmp / "hf_again")
    assert files_of(r["hf"]) == files_of(tmp / "hf_again")


@pytest.fixture(scope="module")
def reloaded(reference) -> dict:
    """Resharded, original and imported checkpoints loaded at new layouts (one 2-process launch)."""
    tmp, layouts = reference["tmp"], reference["layouts"]
    tp1 = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.sequence_parallel=false"]
    reshard(layouts["tp2pp2"]["checkpoint"], tmp / "tp2pp2_to_tp1", tp1, world=2)
    reshard(layouts["ep2"]["checkpoint"], tmp / "ep2_to_ep1", ["parallel.expert=1"], world=2)
    if not (tmp / "imported_ep2").exists():
        import_hf(layouts["ep2"]["hf"], tmp / "imported_ep2", overrides=COMMON + ["data.vocab_size=512"])
    run = lambda load, over=(), iters=5: {"load": str(load), "overrides": list(over), "iters": iters}  # noqa: E731
    ep2 = layouts["ep2"]["checkpoint"]
    runs = {"orig_tp2pp2": run(layouts["tp2pp2"]["checkpoint"]),
            "resharded_tp2pp2": run(tmp / "tp2pp2_to_tp1"),
            "orig_ep2_at_ep2": run(ep2, ["parallel.expert=2"]),  # continue at the saved layout
            "orig_ep2_fresh_adam": run(ep2, ["checkpoint.load_optimizer=false"]),  # what EP1 allows without reshard
            "resharded_ep2": run(tmp / "ep2_to_ep1"),
            "imported": run(tmp / "imported_ep2", iters=1),
            "imported_at_ep2": run(tmp / "imported_ep2", ["parallel.expert=2"], iters=1)}
    case = {"common": [c for c in COMMON if not c.startswith("train.iters")], "runs": runs}
    (tmp / "reload").mkdir()
    return run_convert_worker("reload", tmp / "reload", case, nproc=2)


@pytest.mark.slow
def test_tp2pp2_resharded_to_tp1_keeps_eval_loss_exactly_and_resumes(reference, reloaded):
    orig, resh = reloaded["orig_tp2pp2"], reloaded["resharded_tp2pp2"]
    assert resh["eval"] == orig["eval"]  # bit-identical weights at the same layout
    assert resh["eval"] == pytest.approx(reference["layouts"]["tp2pp2"]["eval"], rel=1e-6)  # vs the saved layout
    assert (resh["start"], resh["end"], resh["consumed_samples"]) == (3, 5, 5 * 8)
    assert resh["losses"] == orig["losses"] and len(resh["losses"]) == 2


@pytest.mark.slow
def test_ep2_resharded_to_ep1_keeps_eval_loss_and_adam_state(reference, reloaded):
    """EP2 -> EP1 regroups megatron-core's dense/expert optimizers, which a direct load cannot."""
    resh, fresh, at_ep2 = reloaded["resharded_ep2"], reloaded["orig_ep2_fresh_adam"], reloaded["orig_ep2_at_ep2"]
    assert resh["eval"] == fresh["eval"]  # same weights, same layout: exactly equal
    assert resh["eval"] == pytest.approx(reference["layouts"]["ep2"]["eval"], rel=1e-6)
    assert (resh["start"], resh["end"], resh["consumed_samples"]) == (3, 5, 5 * 8)
    # with the optimizer state carried over, training continues as it would have at EP2 ...
    assert resh["losses"] == pytest.approx(at_ep2["losses"], rel=1e-5)
    # ... and measurably unlike a restart of Adam's moments
    assert abs(resh["losses"][-1] - fresh["losses"][-1]) > 1e-4


@pytest.mark.slow
def test_reshard_reports_layouts_and_verification(reference, reloaded):
    meta = json.loads((reference["tmp"] / "tp2pp2_to_tp1" / "meta.json").read_text())
    assert meta["layout"] == {"world": 2, "tp": 1, "pp": 1, "vpp": 1, "ep": 1, "etp": 1}
    assert meta["extra"]["resharded_from"]["tp"] == 2 and meta["extra"]["resharded_from"]["pp"] == 2
    assert meta["extra"]["config"]["parallel"]["tensor"] == 1 and meta["iteration"] == 3
    info = describe(reference["tmp"] / "tp2pp2_to_tp1")
    assert info["optimizer_state"]["tensors"] > 0 and not info["weights_only"]


@pytest.mark.slow
def test_imported_model_loads_at_any_layout_and_trains(reloaded):
    a, b, orig = reloaded["imported"], reloaded["imported_at_ep2"], reloaded["orig_ep2_fresh_adam"]
    assert a["eval"] == orig["eval"]  # same weights as the checkpoint it was exported from
    assert b["eval"] == pytest.approx(orig["eval"], rel=1e-6)
    for r in (a, b):
        assert (r["start"], r["end"]) == (0, 1) and len(r["losses"]) == 1
        assert 0 < r["losses"][0] < 20


@pytest.mark.slow
def test_real_checkpoint_with_a_missing_rank_file_is_refused(reference, tmp_path):
    src = Path(reference["layouts"]["tp2"]["checkpoint"])
    shutil.copytree(src, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "__1_0.distcp").unlink()
    with pytest.raises(ConvertError, match=r"__1_0\.distcp is missing"):
        export_hf(tmp_path / "ckpt", tmp_path / "out")


@pytest.mark.slow
def test_inspect_real_checkpoint(reference):
    info = describe(reference["layouts"]["ep2"]["checkpoint"])
    assert info["iteration"] == 3 and info["consumed_samples"] == 24 and info["consumed_tokens"] == 24 * SEQ
    assert info["saved_layout"]["ep"] == 2 and info["optimizer_state"]["tensors"] > 0
    p = info["parameters"]
    assert p["active"] < p["total"] and p["routed_experts"] == 3 * 4 * 3 * 64 * 64


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ep2", "ep2_elastic"])
def test_import_of_our_export_evaluates_exactly_like_the_original(reference, layout, tmp_path):
    """`ernie convert to-hf`, `ernie convert from-hf` with no options, `ernie eval`: the original's loss
    (the export carries the data and evaluation settings; a supernet exports its full network)."""
    r = reference["layouts"][layout]
    assert r["export"]["training_settings"] == "megatron_ernie_training.toml"
    code, _, err = ernie_in_process(["convert", "from-hf", r["hf"], tmp_path / "imported"])
    assert code == 0, err[-3000:]
    original = eval_json(r["checkpoint"])["valid_loss"]
    imported = eval_json(tmp_path / "imported")["valid_loss"]
    print(f"{layout}: ernie eval original {original!r}, import {imported!r}, at training time {r['eval']!r}")
    assert imported == pytest.approx(original, rel=1e-6)
    assert original == pytest.approx(r["eval"], rel=1e-5)  # what the training run measured at EP2 x DP2
    assert 3 < imported < 8  # a trained model on a 512-token vocabulary, not a degenerate number


@pytest.mark.slow
def test_import_without_the_carried_settings_is_refused_then_evaluates_with_the_runs_config(reference, tmp_path):
    """An export from before the settings travelled: imported with another vocabulary size, eval names
    the mismatch; imported again with the run's config.toml (the fix it names), eval gives the loss."""
    r = reference["layouts"]["ep2"]
    hf_dir = tmp_path / "hf"
    shutil.copytree(r["hf"], hf_dir)
    (hf_dir / "megatron_ernie_training.toml").unlink()
    import_hf(hf_dir, tmp_path / "a", overrides=["data.vocab_size=2048"])
    code, _, err = ernie_in_process(["eval", "--run-dir", tmp_path / "a"])
    assert_one_line_error(code, err, "data = 'corpus=kjv, vocab_size=2048'", str(tmp_path / "a" / "tokenizer.json"),
                          "import it again with --config")
    run_config = Path(r["checkpoint"]).parents[1] / "config.toml"
    code, _, err = ernie_in_process(["convert", "from-hf", hf_dir, tmp_path / "b", "--config", run_config])
    assert code == 0, err[-3000:]
    assert eval_json(tmp_path / "b")["valid_loss"] == pytest.approx(r["eval"], rel=1e-5)
