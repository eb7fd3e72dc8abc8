#!/usr/bin/env bash
# README command 2: install everything and run the whole test suite (CPU only).
#
#   bash tests/run.sh [pytest args...]
#
# Installs the package with the CPU torch pin and the test extras, the system
# parts the tests start for real (Slurm daemons, munge, Open MPI: see
# .ci/slurm_cluster.sh), then runs pytest.  The slow multi-process tests are
# included; `bash tests/run.sh -m "not slow"` runs the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q -e '.[cpu,test]'
bash .ci/slurm_cluster.sh install
export ERNIE_TEST_DATA_CACHE=${ERNIE_TEST_DATA_CACHE:-$(mktemp -d)/ernie-data}
exec python3 -m pytest -q -p no:cacheprovider --durations=40 "$@"
