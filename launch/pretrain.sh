#!/usr/bin/env bash
# Single-node pretraining: torchrun starts one process per GPU.
#
#   launch/pretrain.sh CONFIG.toml [--set section.key=value ...]
#
#   NPROC  processes (default: the GPUs nvidia-smi lists, else 1)
#   ERNIE  the ernie command (default: ernie; e.g. "python -m megatron_ernie.cli")
#
# Ranks come from torchrun's variables (megatron_ernie/runtime/env.py); the run
# resumes from its `latest` checkpoint when there is one.  For several nodes use
# `ernie submit pretrain` (slurm/pretrain.sbatch).
set -euo pipefail
CONFIG=${1:?usage: launch/pretrain.sh CONFIG.toml [--set section.key=value ...]}
shift
if [[ -z ${NPROC:-} ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  (( NPROC > 0 )) || NPROC=1
fi
read -r -a ERNIE_CMD <<< "${ERNIE:-ernie}"
exec torchrun --standalone --nproc-per-node="$NPROC" --no-python \
  "${ERNIE_CMD[@]}" pretrain --config "$CONFIG" "$@" --resume auto
