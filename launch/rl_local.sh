#!/usr/bin/env bash
# Every RL role on one node, as one MPI job: mpirun starts one app context per
# role (MPMD, "a : b : c"), the single-node twin of slurm/rl_hetjob.sbatch.
#
#   launch/rl_local.sh CONFIG.toml [--set section.key=value ...]
#
#   TRAINER_GPUS=4 ROLLOUT_GPUS=4  ranks (one per GPU); the trainer sees GPUs
#                                  0..T-1, the rollout the next R
#   REWARD_WORKERS=1               CPU reward ranks (0: rewards in the controller)
#   ERNIE=ernie                    the ernie command
#   MPIRUN=mpirun MPIRUN_ARGS=     the launcher and its extra options
#
# Contract with the roles (megatron_ernie/runtime/env.py, same as on Slurm):
#   ERNIE_HET_ROLES lists the roles in group order; a rank's group is its MPI
#   app context (MPI_APPNUM) and ERNIE_ROLE names its role; MPI_COMM_WORLD spans
#   all roles, discover_mpi() + split_by_group() give each role its own world.
set -euo pipefail
CONFIG=${1:?usage: launch/rl_local.sh CONFIG.toml [--set section.key=value ...]}
shift
T=${TRAINER_GPUS:-4} R=${ROLLOUT_GPUS:-4} W=${REWARD_WORKERS:-1}
read -r -a ERNIE_CMD <<< "${ERNIE:-ernie}"
read -r -a EXTRA <<< "${MPIRUN_ARGS:-}"
CMD=("${ERNIE_CMD[@]}" rl --config "$CONFIG" "$@" --resume auto)

gpu_range() { seq -s, "$1" $(($1 + $2 - 1)); }
app() {  # app ROLE NPROC GPUS: one MPMD context
  APPS+=(${APPS:+:} -n "$2" env ERNIE_ROLE="$1" CUDA_VISIBLE_DEVICES="$3" "${CMD[@]}")
  ROLES+=("$1")
}
APPS=() ROLES=()
app trainer "$T" "$(gpu_range 0 "$T")"
app rollout "$R" "$(gpu_range "$T" "$R")"
((W > 0)) && app reward "$W" ""
app controller 1 ""
ERNIE_HET_ROLES=$(IFS=,; echo "${ROLES[*]}")
export ERNIE_HET_ROLES
exec "${MPIRUN:-mpirun}" "${EXTRA[@]}" "${APPS[@]}"
