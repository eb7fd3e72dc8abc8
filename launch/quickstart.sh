#!/usr/bin/env bash
# README command 1: install, then train the embedded default on this CPU.
#
#   bash launch/quickstart.sh [--set section.key=value ...]
#
# A tiny ERNIE-style MoE (configs/tiny_cpu.toml) on the King James Bible,
# 2 processes with expert parallelism, a few minutes on 2 cores.  It writes
# checkpoints and TensorBoard logs under runs/tiny-moe and tells you where; the
# summary ends with the sub-network family table and a line saying whether the
# loss falls with size (rank correlation, largest-minus-smallest gap).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[cpu]'
RUN_DIR=${RUN_DIR:-runs/tiny-moe}
python3 -m torch.distributed.run --standalone --nproc_per_node=2 \
  -m megatron_ernie.cli pretrain --config configs/quickstart_cpu.toml --set "run.dir=\"$RUN_DIR\"" "$@"
python3 -m megatron_ernie.cli summary --run-dir "$RUN_DIR"
