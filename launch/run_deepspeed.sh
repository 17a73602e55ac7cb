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
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"

args=(--launcher deepspeed --topology "${TOPOLOGY:-local}" --master-port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then args+=(--hostfile "$HOSTFILE"); fi
if [[ -n "${NPROC_PER_NODE:-}" ]]; then args+=(--nproc-per-node "$NPROC_PER_NODE"); fi
if [[ -n "${DEVICE:-}" ]]; then args+=(--device "$DEVICE"); fi
if [[ -n "${DRY_RUN:-}" ]]; then args+=(--dry-run); fi
if [[ $# -eq 0 ]]; then set -- "$HERE/moe_step.py"; fi
exec "${PYTHON:-python}" -m ds_tutel.launch "${args[@]}" -- "$@"
