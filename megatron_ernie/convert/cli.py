"""``ernie convert``: move a model between megatron_ernie layouts and Hugging Face.

    ernie convert to-hf   CHECKPOINT OUT_DIR [--dtype bf16] [--max-shard-size 5GB]
    ernie convert from-hf HF_DIR OUT_CKPT [--config base.toml] [--set section.key=value ...]
    ernie convert reshard CHECKPOINT OUT_CKPT --set parallel.tensor=1 --set parallel.pipeline=1
                          [--world N] [--drop-optimizer] [--no-verify]

All three run in one process (no torchrun), stream tensor by tensor, and
write OUT to a hidden directory renamed only when complete.  CHECKPOINT may
be an iter_* directory, a checkpoints/ root or a run directory (``latest``).
Start training from an imported model with
``ernie pretrain --set checkpoint.load=OUT_CKPT``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.convert.errors import ConvertError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (Hugging Face's units; KiB/MiB/GiB are binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError("--max-shard-size", text, "write a size like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_tensors_to_the_os(threshold: int = 1 << 20) -> bool:
    """Give every buffer above ``threshold`` its own memory mapping (glibc only).

    glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), so
    tensor buffers then come from the heap, whose fragmented free space is not
    returned: converting tensor after tensor grew RSS by ~8% of the model size.
    With a fixed threshold each buffer is unmapped when freed and RSS stays flat.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


def cmd_to_hf(args) -> dict:
    from megatron_ernie.convert.export import export_hf

    return export_hf(args.checkpoint, args.out, args.dtype, parse_size(args.max_shard_size))


def cmd_from_hf(args) -> dict:
    from megatron_ernie.convert.importer import import_hf

    return import_hf(args.hf_dir, args.out, args.config, args.overrides, args.dtype)


def cmd_reshard(args) -> dict:
    from megatron_ernie.convert.reshard import reshard

    return reshard(args.checkpoint, args.out, args.overrides, args.world, args.drop_optimizer, not args.no_verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-hf", help="export to a Hugging Face ERNIE 4.5 directory")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast weights (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="split safetensors files above this size")
    p.set_defaults(func=cmd_to_hf)
    p = sub.add_parser("from-hf", help="import a Hugging Face ERNIE 4.5 model as a weights-only checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--config", help="TOML with the training settings (data, optimizer, parallel...); default: "
                                    "those an export of ours carries (megatron_ernie_training.toml), else defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="cast weights (default: config.json's torch_dtype)")
    p.set_defaults(func=cmd_from_hf)
    p = sub.add_parser("reshard", help="re-target a checkpoint at another parallel layout, verified")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="parallel.KEY=VALUE")
    p.add_argument("--world", type=int, help="the target world size (default: the smallest that fits)")
    p.add_argument("--drop-optimizer", action="store_true", help="keep model weights only")
    p.add_argument("--no-verify", action="store_true", help="skip re-reading the output for a bitwise check")
    p.set_defaults(func=cmd_reshard)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return_freed_tensors_to_the_os()
    try:
        report = args.func(args)
    except ConfigError as err:
        print(f"ernie convert: bad argument: {err}", file=sys.stderr)
        return 2
    except ConvertError as err:
        print(f"ernie convert: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
