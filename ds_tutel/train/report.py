"""The run's JSON-lines log and the end-of-run figure (loss curves, expert load per MoE layer over steps).

One record per line, each with a "type": "train" (step, loss, aux, lr, tokens_per_s, dropped, expert_load:
[[fraction of routed choices per expert] per MoE layer]), "val" (step, val_loss), "event" (start, resume, end).
Only rank 0 writes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional


class RunLog:
    """Appends records to `path`; on resume, first drops the records of steps after the resumed checkpoint."""

    def __init__(self, path: str, enabled: bool, resume_step: Optional[int] = None) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept: List[str] = []
        if resume_step is not None and os.path.isfile(path):
            for record in read_log(path):
                if record.get("step", 0) <= resume_step and record.get("event") != "end":
                    kept.append(json.dumps(record))
        with open(path, "w") as f:
            f.writelines(line + "\n" for line in kept)

    def write(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_log(path: str) -> List[Dict[str, Any]]:
    """The records of a log file (a partly written last line, left by a killed run, is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_run(log_path: str, png_path: str) -> None:
    """Training and validation loss over steps, and one panel of expert load per MoE layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    num_layers = len(train[0]["expert_load"]) if train else 0
    fig, axes = plt.subplots(1 + num_layers, 1, figsize=(8, 3.2 * (1 + num_layers)), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=0.8)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    steps = [r["step"] for r in train]
    for layer in range(num_layers):
        ax = axes[layer + 1][0]
        loads = list(zip(*[r["expert_load"][layer] for r in train]))
        ax.stackplot(steps, loads, labels=[f"expert {e}" for e in range(len(loads))])
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("share of routed tokens")
        ax.set_title(f"expert load, MoE layer {layer}")
        if len(loads) <= 16:
            ax.legend(loc="upper right", fontsize="small", ncol=min(4, len(loads)))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
