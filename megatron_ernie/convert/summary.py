"""``ernie inspect``: what a checkpoint holds, without loading it.

Reads only ``meta.json`` and the DCP index (``.metadata``), so it is instant
even for a huge checkpoint.  Parameter counts come from the stored global
shapes: *total* counts every model tensor (padded embedding and output rows
included); *active* is what one token uses: everything except the routed
experts, plus top-k of the E routed experts' parameters in each MoE layer
(shared experts are always active).

    ernie inspect runs/tiny-moe/checkpoints/latest
    ernie inspect runs/tiny-moe --json | jq .parameters
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from math import prod

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.convert import model_keys as K
from megatron_ernie.convert.dcp_io import DcpReader
from megatron_ernie.convert.errors import ConvertError
from megatron_ernie.convert.source import open_checkpoint

_EXPERT = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.")


def count_parameters(shapes: dict[str, tuple], topk: int, experts: int) -> dict:
    """total / active / per-group counts from model tensor shapes."""
    groups = {"embedding": 0, "output": 0, "routed_experts": 0, "other": 0}
    per_layer_experts: dict[int, int] = {}
    for key, shape in shapes.items():
        n = prod(shape)
        match = _EXPERT.match(key)
        if match:
            groups["routed_experts"] += n
            per_layer_experts[int(match.group(1))] = per_layer_experts.get(int(match.group(1)), 0) + n
        else:
            groups["embedding" if key == K.EMBED else "output" if key == K.OUTPUT else "other"] += n
    total = sum(groups.values())
    inactive = sum(n - n * topk // experts for n in per_layer_experts.values()) if experts else 0
    return {"total": total, "active": total - inactive, **groups}


def describe(path) -> dict:
    """Everything ``inspect`` prints, as a JSON-ready dict."""
    ck = open_checkpoint(path)
    reader = DcpReader(ck.path, checksums=False)  # index and sizes only: inspect stays instant
    tensors = reader.tensors()
    model = {k: t for k, t in tensors.items() if K.is_model_key(k)}
    state = {k: t for k, t in tensors.items() if not K.is_model_key(k)}
    cfg, extra = ck.config, ck.meta.get("extra", {})
    files = [p for p in ck.path.rglob("*") if p.is_file()]
    return {
        "path": str(ck.path), "iteration": ck.meta.get("iteration"),
        "consumed_samples": ck.meta.get("consumed_samples"), "consumed_tokens": ck.meta.get("consumed_tokens"),
        "saved_layout": ck.meta.get("layout"), "weights_only": ck.weights_only, "source": extra.get("source"),
        "resharded_from": extra.get("resharded_from"),
        "model": asdict(cfg.model), "moe": asdict(cfg.moe), "parallel": asdict(cfg.parallel),
        "parameters": count_parameters({k: t.shape for k, t in model.items()}, cfg.moe.router_topk,
                                       cfg.moe.num_experts),
        "optimizer_state": {"tensors": len(state), "bytes": sum(t.nbytes for t in state.values())},
        "files": {"count": len(files), "bytes": sum(p.stat().st_size for p in files)},
        "tensors": [{"key": k, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                     "chunks": t.chunks} for k, t in model.items()],
    }


def _model_line(info: dict) -> str:
    m, moe = info["model"], info["moe"]
    line = (f"{m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads "
            f"({m['num_query_groups']} kv groups), ffn {m['ffn_hidden_size']}, {m['dtype']}")
    if moe["num_experts"]:
        line += (f"; MoE {moe['num_experts']} experts top-{moe['router_topk']}, expert ffn "
                 f"{moe['expert_ffn_hidden_size']}, shared {moe['shared_expert_ffn_hidden_size']}, "
                 f"first {moe['first_dense_layers']} dense")
    return line


def render(info: dict, tensors: bool = False) -> str:
    p, layout = info["parameters"], info["saved_layout"] or {}
    opt = info["optimizer_state"]
    lines = [f"checkpoint   {info['path']}",
             f"iteration    {info['iteration']}  (saved at " + " ".join(f"{k}={v}" for k, v in layout.items()) + ")",
             f"data         {info['consumed_samples']:,} samples, {info['consumed_tokens']:,} tokens consumed",
             f"model        {_model_line(info)}",
             f"parameters   total {p['total']:,} | active {p['active']:,} | embedding {p['embedding']:,} | "
             f"output {p['output']:,} | routed experts {p['routed_experts']:,}",
             "optimizer    " + (f"{opt['tensors']} tensors, {opt['bytes'] / 2**20:.1f} MiB" if opt["tensors"]
                               else "none (weights only)"),
             f"files        {info['files']['count']}, {info['files']['bytes'] / 2**20:.1f} MiB"]
    if tensors:
        width = max(len(t["key"]) for t in info["tensors"])
        lines += [""] + [f"  {t['key']:<{width}}  {str(t['shape']):<18} {t['dtype']:<9} {t['chunks']} chunks"
                         for t in info["tensors"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an iter_* directory, a checkpoints/ root or a run directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    parser.add_argument("--tensors", action="store_true", help="also list every model tensor")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = describe(args.checkpoint)
    except (ConfigError, ConvertError) as err:
        print(f"ernie inspect: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else render(info, args.tensors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
