#!/usr/bin/env bash
# The README's test command: sets everything up on a fresh machine, then runs the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu
# Two workers, each test file on one of them (module fixtures run once): spawned ranks and imports leave a core
# idle often enough that this takes about two thirds of the serial time. TEST_WORKERS=0 runs serially.
exec python -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@" tests
