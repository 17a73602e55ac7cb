#!/usr/bin/env bash
# Creates .venv with the CPU build of torch first, then everything else; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, deepspeed, triton, pytest, hypothesis" 2>/dev/null || [ ! -f .venv/.ds_tutel_installed ]; then
    python -m pip install -q --upgrade pip
    # The CPU build of torch must come before anything that depends on torch.
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -r requirements-cpu.txt
    python -m pip install -q --no-deps -e .
    touch .venv/.ds_tutel_installed
fi
