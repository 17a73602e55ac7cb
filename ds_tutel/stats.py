"""Routing statistics per MoE layer, and a collector over a model that logs, writes JSON lines and plots them.

Shape legend: S tokens, E experts, K choices per token.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .routing.types import Routing


@dataclass
class RoutingStats:
    """What one forward did: per-expert load (kept choices), drops, capacity, imbalance, router entropy."""

    load: List[int]             # kept choices per expert
    wanted: List[int]           # choices per expert before dropping
    dropped_fraction: float     # dropped choices / all choices
    capacity: int
    imbalance: float            # max / mean of the wanted counts (1.0 = perfectly balanced)
    entropy: float              # mean over tokens of the router's softmax entropy (nats)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def routing_stats(routing: Routing) -> RoutingStats:
    """Statistics of one Routing (reads a few scalars back from the device)."""
    with torch.no_grad():
        kept_E = routing.kept_per_expert()
        wanted_E = routing.counts_E
        total = max(routing.indices_SK.numel(), 1)
        dropped = 1.0 - float(routing.kept_SK.sum()) / total
        mean_wanted = float(wanted_E.float().mean()) if wanted_E.numel() else 0.0
        imbalance = float(wanted_E.max()) / mean_wanted if mean_wanted > 0 else 1.0
        probs_SE = routing.probs_SE.float()
        entropy = float(-(probs_SE * torch.log(probs_SE.clamp_min(1e-20))).sum(dim=1).mean()) if probs_SE.numel() else 0.0
    return RoutingStats(load=kept_E.tolist(), wanted=wanted_E.tolist(), dropped_fraction=dropped,
                        capacity=routing.capacity, imbalance=imbalance, entropy=entropy)


class StatsCollector:
    """Gathers the last forward's routing statistics of every ds_tutel MoE layer of a model.

    collect(step) appends one row per layer; write_jsonl, plot and to_monitor publish the rows.
    """

    def __init__(self, model: nn.Module) -> None:
        # ds_tutel layers are the modules whose inner layer keeps its last routing (no import of the layer here).
        self.layers = [(name or "moe", module) for name, module in model.named_modules()
                       if hasattr(getattr(module, "deepspeed_moe", None), "last_routing")]
        self.rows: List[Dict[str, Any]] = []

    def collect(self, step: int, keep: bool = True) -> List[Dict[str, Any]]:
        """One row per layer for the last forward; keep=False returns them without storing (long jobs that only
        forward rows to a monitor would otherwise hold every step's rows)."""
        rows = []
        for name, layer in self.layers:
            routing = layer.deepspeed_moe.last_routing
            if routing is not None:
                rows.append({"step": step, "layer": name, **routing_stats(routing).as_dict()})
        if keep:
            self.rows.extend(rows)
        return rows

    def summary(self, rows: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, float]:
        """Mean dropped fraction and imbalance over rows (default: the last step collected)."""
        if rows is None:
            last = self.rows[-1]["step"] if self.rows else None
            rows = [r for r in self.rows if r["step"] == last]
        if not rows:
            return {"dropped_fraction": 0.0, "imbalance": 1.0}
        return {"dropped_fraction": sum(r["dropped_fraction"] for r in rows) / len(rows),
                "imbalance": sum(r["imbalance"] for r in rows) / len(rows)}

    def write_jsonl(self, path: str) -> None:
        """Writes every collected row as one JSON object per line (atomically replaces `path`)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)

    def to_monitor(self, monitor: Any, rows: Sequence[Dict[str, Any]]) -> None:
        """Sends rows to DeepSpeed's monitor (engine.monitor: csv, tensorboard, ...) when it is enabled."""
        if monitor is None or not getattr(monitor, "enabled", False):
            return
        events = []
        for row in rows:
            prefix = f"ds_tutel/{row['layer']}"
            for key in ("dropped_fraction", "imbalance", "entropy", "capacity"):
                events.append((f"{prefix}/{key}", float(row[key]), row["step"]))
            for e, load in enumerate(row["load"]):
                events.append((f"{prefix}/load_expert_{e}", float(load), row["step"]))
        monitor.write_events(events)

    def plot(self, path: str) -> None:
        """PNG: each expert's share of the kept load over steps, one panel per MoE layer."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(dict.fromkeys(r["layer"] for r in self.rows))
        fig, axes = plt.subplots(len(names) or 1, 1, figsize=(7, 2.4 * max(len(names), 1)), squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            rows = [r for r in self.rows if r["layer"] == name]
            steps = [r["step"] for r in rows]
            shares = torch.tensor([r["load"] for r in rows], dtype=torch.float64)
            shares = shares / shares.sum(dim=1, keepdim=True).clamp_min(1)
            ax.stackplot(steps, shares.t().numpy(), labels=[f"expert {e}" for e in range(shares.shape[1])])
            ax.set_title(f"{name}: expert load share")
            ax.set_xlabel("step")
            ax.set_ylim(0, 1)
        if names:
            axes[0, 0].legend(loc="upper right", fontsize="x-small", ncol=4)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
