#!/usr/bin/env bash
# Starts a job through DeepSpeed's launcher, every rank bound to its GPU's NUMA node by ds_tutel.
#
#   CPU ranks on this machine:   DS_ACCELERATOR=cpu DEVICE=cpu NPROC_PER_NODE=2 launch/run_deepspeed.sh
#   NDm A100 v4, 2 nodes:        TOPOLOGY=ndv4 HOSTFILE=launch/hostfile.example launch/run_deepspeed.sh
#   Any script:                  launch/run_deepspeed.sh train.py --epochs 1
#   See the plan, start nothing: DRY_RUN=1 TOPOLOGY=ndv4 launch/run_deepspeed.sh
#
# With no arguments it runs launch/moe_step.py (one MoE training step; each rank reports its binding).
# Settings (environment): TOPOLOGY (local | ndv4, default local), HOSTFILE (multi-node, passwordless ssh and
# pdsh), NPROC_PER_NODE, DEVICE (auto | gpu | cpu), MASTER_PORT (default 29500), PYTHON, DRY_RUN.
exec "$(dirname "${BASH_SOURCE[0]}")/start_job.sh" deepspeed "$@"
