#!/usr/bin/env bash
# GPU readiness in one command (<= 8 minutes on one H100): megatron-core on CUDA,
# bf16 MFU of a ~1B dense and an MoE of similar active size through `ernie pretrain`,
# FP8 with real FP8 GEMMs (fp8.backend = "torch") vs bf16, rollout-vs-trainer K3
# with and without routing replay, the CPU compat layer off on CUDA.
#
#   benchmarks/gpu_check.sh [--cpu-dry-run] [--out DIR] [more benchmarks/gpu_check.py arguments]
#
# Report: DIR/gpu_check.md, DIR/gpu_check.json and DIR/gpu_check.log (DIR: --out, else
# $OUT as the device tool sets it, else ./gpu_check_out). On the lent machine (no
# megatron-core, nothing downloadable) the wheels that benchmarks/gpu_wheels.sh put
# in .whl/ are installed first; carry `.whl` with the call:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# --cpu-dry-run runs every section on CPU with tiny sizes (CI: tests/test_gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import megatron.core" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "megatron-core is not installed and .whl/ holds no wheels: run benchmarks/gpu_wheels.sh here first" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export ERNIE_DATA_CACHE="${ERNIE_DATA_CACHE:-/tmp/ernie-gpu-check-data}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>/dev/null \
  || echo "nvidia-smi not available"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" python3 benchmarks/gpu_check.py "$@"
