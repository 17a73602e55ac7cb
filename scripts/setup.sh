#!/usr/bin/env bash
# Creates .venv with the CPU build of torch first, then the pinned packages and ds_tutel with all its extras
# (train, cpu, triton, mpi, test, hf), and transformers 4 beside them in .venv/transformers4 (tests of its per-expert
# MoE layouts); idempotent, and installs again when the pins or pyproject.toml change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
STAMP=$(cat requirements-cpu.txt requirements-transformers4.txt pyproject.toml | sha1sum | cut -c1-12)
if ! python -c "import torch, deepspeed, triton, pytest, hypothesis, transformers" 2>/dev/null \
        || [ ! -d .venv/transformers4/transformers ] \
        || [ "$(cat .venv/.ds_tutel_installed 2>/dev/null)" != "$STAMP" ]; then
    python -m pip install -q --upgrade pip
    # The CPU build of torch must come before anything that depends on torch.
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -r requirements-cpu.txt
    python -m pip install -q -e ".[train,cpu,triton,mpi,test,hf]"
    rm -rf .venv/transformers4
    python -m pip install -q --no-deps --target .venv/transformers4 -r requirements-transformers4.txt
    echo "$STAMP" > .venv/.ds_tutel_installed
fi
