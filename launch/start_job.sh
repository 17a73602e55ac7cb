#!/usr/bin/env bash
# The part the launch recipes share: start_job.sh LAUNCHER [SCRIPT ARGS...] runs `python -m ds_tutel.launch`
# with the recipes' environment settings (see run_deepspeed.sh) and LAUNCHER (deepspeed | mpirun).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"

launcher="$1"
shift
args=(--launcher "$launcher" --topology "${TOPOLOGY:-local}" --master-port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then args+=(--hostfile "$HOSTFILE"); fi
if [[ -n "${NPROC_PER_NODE:-}" ]]; then args+=(--nproc-per-node "$NPROC_PER_NODE"); fi
if [[ -n "${DEVICE:-}" ]]; then args+=(--device "$DEVICE"); fi
if [[ -n "${DRY_RUN:-}" ]]; then args+=(--dry-run); fi
if [[ $# -eq 0 ]]; then set -- "$HERE/moe_step.py"; fi
exec "${PYTHON:-python}" -m ds_tutel.launch "${args[@]}" -- "$@"
