#!/usr/bin/env bash
# FP8 vs bf16 on one GPU (a few minutes at most on an H100/H200).
#
#   benchmarks/gpu_fp8.sh [extra gpu_fp8.py arguments, e.g. --steps 50]
#
# Prints the GPU, torch and Transformer Engine versions, then runs
# benchmarks/gpu_fp8.py: a small MoE-like TE stack trained in bf16 and in every
# FP8 recipe this TE/GPU supports. The table goes to stdout, the JSON to
# $OUT/gpu_fp8.json (or ./gpu_fp8.json when OUT is unset).
# FP8_GPU_TESTS=1 afterwards also runs the GPU-marked FP8 tests (emulation vs TE
# per recipe, and 20 training steps of the tiny MoE with backend "te" vs bf16),
# log in $OUT/gpu_fp8_tests.log.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-.}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv \
  || echo "nvidia-smi not available"
python - <<'PY'
import torch
print(f"torch {torch.__version__} cuda {torch.version.cuda} gpu {torch.cuda.is_available()}")
try:
    import transformer_engine
    print(f"transformer_engine {transformer_engine.__version__}")
except Exception as error:  # ImportError, or RuntimeError/OSError from a partial install
    print(f"transformer_engine not importable ({type(error).__name__}: {error}); "
          "FP8 recipes will be reported as skipped")
PY
timeout "${FP8_BENCH_TIMEOUT:-420}" python benchmarks/gpu_fp8.py --json "$out/gpu_fp8.json" "$@" \
  2>&1 | tee "$out/gpu_fp8.log"
if [[ "${FP8_GPU_TESTS:-0}" == "1" ]]; then
  timeout "${FP8_TESTS_TIMEOUT:-300}" python -m pytest -q -m gpu tests/test_fp8.py tests/test_fp8_training.py \
    2>&1 | tee "$out/gpu_fp8_tests.log"
fi
