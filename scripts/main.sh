#!/usr/bin/env bash
# The README's first command: set up .venv, then train the default GPT-style MoE language model with DeepSpeed
# ZeRO-2 through the deepspeed launcher: 2 CPU ranks on a machine without GPUs, every GPU where there are GPUs.
# Outputs (log.jsonl, training.png, sample.txt, summary.json, checkpoints/) go to runs/<date-time>/ unless OUT
# is set; extra arguments go to ds_tutel.train (e.g. OUT=runs/x bash scripts/main.sh --resume).
# `bash scripts/main.sh --hf qwen3_moe` trains a tiny Hugging Face Qwen3-MoE (built from its config class, nothing
# downloaded, converted to ds_tutel layers) on the same data, launcher, JSON config, progress bar, log and plots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

OUT=${OUT:-runs/$(date +%Y%m%d-%H%M%S)}
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    RANKS=${RANKS:-$(python -c "import torch; print(torch.cuda.device_count())")}
else
    export DS_ACCELERATOR=cpu
    RANKS=${RANKS:-2}
fi
PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
MODEL="the default MoE language model"
for ((i = 1; i <= $#; i++)); do
    if [ "${!i}" = "--hf" ] && [ $i -lt $# ]; then j=$((i + 1)); MODEL="a tiny Hugging Face ${!j} model"; fi
done
echo "training $MODEL on $RANKS rank(s); outputs in $OUT"
status=0
deepspeed --num_gpus "$RANKS" --master_port "$PORT" --module ds_tutel.train \
    --config deepspeed_config.json --out "$OUT" "$@" || status=$?
# DeepSpeed's CPU communication leaves one shared-memory buffer per rank behind (see ds_tutel/launch/shm.py).
python -c "from ds_tutel.launch.shm import remove_deepspeed_shm_buffers as rm; rm('127.0.0.1', $PORT)" || true
exit $status
