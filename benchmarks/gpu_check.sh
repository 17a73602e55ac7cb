#!/usr/bin/env bash
# Issue 29's device check, one command (docs/BENCHMARKS.md, "The device check").
#
#   bash benchmarks/gpu_check.sh             on one H100/H200 with only torch and triton installed: installs what
#                                            benchmarks/wheels/ carries (DeepSpeed's source archive and the pure
#                                            Python requirements such a machine lacks), then runs
#                                            benchmarks/gpu_check.py, all within 6 minutes
#   bash benchmarks/gpu_check.sh --dry-run   the same driver on the CPU: tiny shapes, Triton's interpreter,
#                                            DS_ACCELERATOR=cpu, no install step
#
# Writes to $OUT (a new temporary folder when OUT is unset): gpu_check.json, gpu_check.md, gpu_check.log, and the
# raw outputs of the kernel and layer parts. Other arguments go to the driver (--parts ab, --budget S, ...).
# PYTHON names the interpreter (default python3).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-python3}"
total_s=360        # the whole check, install included
margin_s=25        # for writing the outputs, and the slack a part's cap leaves

dry_run=0
driver_args=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1; driver_args+=("$arg") ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) driver_args+=("$arg") ;;
    esac
done

OUT="${OUT:-$(mktemp -d)}"
export OUT
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
started=$(date +%s)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Installs the carried archives that this machine lacks (or holds in an older version) into a folder of its own,
# put first on PYTHONPATH; writes the outcome to $work/install for the driver's report.
install_carried() {
    local t0 site wheels needed code
    t0=$(date +%s)
    site="$work/site"
    wheels=("$here"/wheels/*.whl "$here"/wheels/*.tar.gz)
    needed=$("$python" - "${wheels[@]}" <<'EOF'
import importlib.metadata as md
import os
import re
import sys

try:
    from packaging.version import Version
except ImportError:  # release numbers alone, which is all the carried archives have
    def Version(text):
        return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0]))

for path in sys.argv[1:]:
    if not os.path.exists(path):
        continue
    name, version = os.path.basename(path).removesuffix(".tar.gz").split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(version):
        print(path)
EOF
)
    if [ -z "$needed" ]; then
        printf 'status=ok\ndetail=nothing to install: every carried package is there\nwall_s=%s\n' \
            "$(( $(date +%s) - t0 ))" > "$work/install"
        return
    fi
    echo "== installing: $(for p in $needed; do basename "$p"; done | tr '\n' ' ')"
    # shellcheck disable=SC2086
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --target "$site" $needed > "$work/pip.log" 2>&1
    code=$?
    cat "$work/pip.log"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    if [ $code -ne 0 ]; then
        printf 'status=failed\ndetail=pip exited %s: %s\nwall_s=%s\n' "$code" \
            "$(grep -v '^\s*$' "$work/pip.log" | tail -n 1)" "$(( $(date +%s) - t0 ))" > "$work/install"
        return
    fi
    if ! DS_ACCELERATOR=cuda "$python" -c "import deepspeed.moe.layer" > "$work/import.log" 2>&1; then
        printf 'status=failed\ndetail=import deepspeed.moe.layer: %s\nwall_s=%s\n' \
            "$(grep -v '^\s*$' "$work/import.log" | tail -n 1)" "$(( $(date +%s) - t0 ))" > "$work/install"
        return
    fi
    printf 'status=ok\ndetail=installed %s\nwall_s=%s\n' \
        "$(for p in $needed; do basename "$p"; done | tr '\n' ' ')" "$(( $(date +%s) - t0 ))" > "$work/install"
}

{
    if [ "$dry_run" -eq 0 ]; then
        install_carried
        cat "$work/install"
        # what is left of the 6 minutes goes to the parts (an explicit --budget given later wins)
        driver_args=(--install-status "$work/install" --budget "$(( total_s - margin_s - ($(date +%s) - started) ))"
                     "${driver_args[@]+"${driver_args[@]}"}")
    fi
    cd "$repo" && "$python" benchmarks/gpu_check.py --out "$OUT" "${driver_args[@]+"${driver_args[@]}"}"
} 2>&1 | tee "$OUT/gpu_check.log"
code=${PIPESTATUS[0]}
echo "outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$code"
