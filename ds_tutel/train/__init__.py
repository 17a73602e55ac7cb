"""The GPT-MoE training job: model, presets, data, engine, loop, evaluation, report, checkpoints and resharding.

    python -m ds_tutel.train --config deepspeed_config.json       (through the deepspeed launcher: scripts/main.sh)
    python -m ds_tutel.train.checkpoint_cli info|reshard ...
"""
