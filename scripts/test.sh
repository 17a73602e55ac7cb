#!/usr/bin/env bash
# The README's test command: sets everything up on a fresh machine, then runs the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu
exec python -m pytest -q -p no:cacheprovider --durations=15 "$@" tests
