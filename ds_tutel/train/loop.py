"""The main job: ZeRO training of a GPT-style MoE language model on byte-level text, through DeepSpeed.

    deepspeed --num_gpus 2 -m ds_tutel.train --out runs/default          (DS_ACCELERATOR=cpu on a CPU machine)
    deepspeed --num_gpus 2 -m ds_tutel.train --hf qwen3_moe               (a tiny transformers MoE model instead)
    python -m ds_tutel.train --out runs/one-rank                          (a world of one)
    python -m ds_tutel.train --preset gpt-moe-1.1t --dry-run              (meta-device build + memory plan)

Everything DeepSpeed reads (ZeRO stage, precision, clipping, optimizer, LR schedule, batch) comes from the
DeepSpeed JSON config (--config, default deepspeed_config.json); its "ds_tutel_train" section holds the job's
own settings (TrainSettings below), each overridable on the command line. With --hf MODEL_TYPE the model is a
tiny transformers MoE model of that type converted to ds_tutel layers (train/hf_model.py; ep_size and conversion
options from the JSON's "ds_tutel": {"hf": {...}} section); data, loop, logs, plots and checkpoints are the same.
Outputs under --out: log.jsonl, training.png, sample.txt, summary.json, checkpoints/. Exit status 2 with one
"error:" line for bad input.

Shape legend: B micro-batch, T sequence, V vocab, L MoE layers, E experts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from . import checkpoint
from .checkpoint import CheckpointError
from .data import DataError
from .engine import SECTION, ConfigError


@dataclass
class TrainSettings:
    """The "ds_tutel_train" section of the config (defaults here), overridden by command-line flags."""

    preset: str = "tiny"
    model: Dict[str, Any] = field(default_factory=dict)  # ModelConfig fields overriding the preset
    hf: Optional[str] = None  # a transformers MoE model type (train/hf_model.py) instead of the GPT-MoE preset
    steps: int = 300
    eval_every: int = 50
    eval_windows: int = 64
    eval_batch: int = 8
    save_every: int = 100
    aux_loss_weight: float = 0.01
    seed: int = 1234
    data: List[str] = field(default_factory=list)  # files or directories; empty: the standard library
    max_bytes: int = 8_000_000
    sample_tokens: int = 160
    sample_prompt: str = "def "
    precision: str = "auto"  # auto | bf16 | fp32
    collective_timeout_s: float = 300.0

    @classmethod
    def from_section(cls, section: Any) -> "TrainSettings":
        if not isinstance(section, dict):
            raise ConfigError(f'the "{SECTION}" config section must be a JSON object')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f'unknown keys in the "{SECTION}" config section: {unknown}; valid: {sorted(known)}')
        return cls(**section)

    def check(self) -> None:
        for name in ("steps", "eval_every", "eval_windows", "eval_batch", "save_every", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.eval_windows % self.eval_batch:
            raise ConfigError(f"eval_windows ({self.eval_windows}) must be a multiple of eval_batch "
                              f"({self.eval_batch})")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds_tutel.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="deepspeed_config.json", help="DeepSpeed JSON config")
    p.add_argument("--out", default="runs/default", help="output directory")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint directory (default: OUT/checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint, if any")
    p.add_argument("--eval-only", action="store_true", help="load the latest checkpoint, print validation loss")
    p.add_argument("--dry-run", action="store_true", help="build on the meta device, print parameters and memory")
    p.add_argument("--world-size", type=int, default=None, help="world size for --dry-run")
    p.add_argument("--preset", default=None)
    p.add_argument("--hf", default=None, metavar="MODEL_TYPE",
                   help="train a tiny transformers MoE model of this type (e.g. qwen3_moe), converted to ds_tutel; "
                        "--model then sets its HF config fields and seq_len")
    p.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: the world size)")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="override one ModelConfig field, e.g. --model d_model=256 (repeatable)")
    for name in ("steps", "eval_every", "save_every", "seed", "max_bytes", "sample_tokens", "eval_windows",
                 "eval_batch"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None)
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end this invocation after STEP (checkpointed); --resume continues on the same schedule")
    p.add_argument("--precision", default=None, choices=("auto", "bf16", "fp32"))
    p.add_argument("--data", nargs="+", default=None, help="text files or directories (default: the stdlib)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


def _model_overrides(pairs: List[str]) -> Dict[str, Any]:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--model expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def settings_from(args: argparse.Namespace, config: Dict[str, Any]) -> TrainSettings:
    settings = TrainSettings.from_section(config.get(SECTION, {}))
    for name in ("preset", "hf", "steps", "eval_every", "save_every", "seed", "max_bytes", "sample_tokens",
                 "eval_windows", "eval_batch", "precision", "data"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.model = {**settings.model, **_model_overrides(args.model)}
    if args.ep_size is not None:
        settings.model["ep_size"] = args.ep_size
    settings.check()
    return settings


def _step_metrics(model: Any, ce: float, aux: float):
    import torch
    from .model import dropped_fraction, expert_counts
    counts_LE = expert_counts(model).double()
    return torch.cat([torch.tensor([ce, aux, 1.0], dtype=torch.float64), dropped_fraction(model).double(),
                      counts_LE.flatten()])


def train_step(engine: Any, corpus: Any, settings: TrainSettings, step: int, rank: int) -> Dict[str, Any]:
    """One optimizer step (gradient_accumulation_steps micro-batches); metrics averaged over all ranks."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from .data import mix_seed, train_batch
    model, cfg = engine.module, engine.module.cfg
    sums = None
    for micro in range(engine.gradient_accumulation_steps()):
        torch.manual_seed(mix_seed(settings.seed, "train", step, rank, micro))
        x_BT, y_BT = train_batch(corpus, cfg.seq_len, engine.train_micro_batch_size_per_gpu(), settings.seed, step,
                                 rank, micro)
        logits_BTV, l_aux = engine(x_BT)
        ce = F.cross_entropy(logits_BTV.float().reshape(-1, cfg.vocab_size), y_BT.reshape(-1))
        engine.backward(ce + settings.aux_loss_weight * l_aux)
        engine.step()
        metrics = _step_metrics(model, float(ce.detach()), float(l_aux.detach()))
        sums = metrics if sums is None else sums + metrics
    dist.all_reduce(sums)
    n, L, E = float(sums[2]), len(model.moe_layers()), cfg.num_experts
    counts_LE = sums[3 + L:].view(L, E)
    load_LE = counts_LE / counts_LE.sum(dim=1, keepdim=True).clamp(min=1)
    return {"loss": float(sums[0]) / n, "aux": float(sums[1]) / n,
            "dropped": float(sums[3:3 + L].mean()) / n if L else 0.0,
            "expert_load": [[round(float(v), 4) for v in row] for row in load_LE]}


def publish_to_monitor(engine: Any, collector: Any, record: Dict[str, Any]) -> None:
    """Step metrics and every MoE layer's routing statistics to DeepSpeed's monitor (the config's csv_monitor,
    tensorboard, wandb, ...), when one is enabled; DeepSpeed writes on rank 0 only."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not getattr(monitor, "enabled", False):
        return
    step = record["step"]
    monitor.write_events([(f"Train/ds_tutel/{key}", float(record[key]), step)
                          for key in ("loss", "aux", "dropped", "tokens_per_s", "lr")])
    collector.to_monitor(monitor, collector.collect(step, keep=False))


def dry_run(settings: TrainSettings, world_size: Optional[int]) -> Dict[str, Any]:
    if settings.hf:
        raise ConfigError("--dry-run plans the GPT-MoE presets only, not --hf models")
    from .plan import format_plan, memory_plan
    from .presets import PRESET_WORLD_SIZE, get_preset
    cfg = get_preset(settings.preset, settings.model)
    world = world_size or PRESET_WORLD_SIZE.get(settings.preset, 1)
    precision = "fp32" if settings.precision == "fp32" else "bf16"
    plan = memory_plan(cfg, world, precision)
    print(format_plan(plan))
    return plan


def run(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """The whole job on this rank; returns its summary (rank 0's adds the initial loss and wall time)."""
    t_start = time.time()
    args = parse_args(argv)
    from .engine import load_config
    config = load_config(args.config)
    settings = settings_from(args, config)
    if args.dry_run:
        return dry_run(settings, args.world_size)

    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from .data import decode, encode, load_corpus, val_windows
    from .engine import (build_engine, deepspeed_dict, init_distributed, quiet_deepspeed, resolve_precision,
                         set_cpu_threads)
    from .evaluate import sample_text, validation_loss
    from .model import GPTMoE
    from .presets import get_preset
    from .report import RunLog, plot_run, read_log

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if settings.hf:
        from .hf_model import HFLanguageModel, job_config
        cfg = job_config(settings.hf, settings.model, config).resolved(world)
    else:
        cfg = get_preset(settings.preset, settings.model).resolved(world)
    precision = resolve_precision(settings.precision)
    ds_config = deepspeed_dict(config, precision, settings.steps)
    corpus = load_corpus(settings.data or None, settings.max_bytes)
    x_val_NT, y_val_NT = val_windows(corpus, cfg.seq_len, settings.eval_windows)
    ckpt_dir = args.checkpoint_dir or os.path.join(args.out, "checkpoints")
    if not (args.resume or args.eval_only) and checkpoint.read_latest(ckpt_dir) is not None:
        raise CheckpointError(f"{ckpt_dir} already holds checkpoints: pass --resume to continue that run, or "
                              f"choose another --out")
    manifest = None  # of the checkpoint to start from, checked before any rank starts DeepSpeed
    if args.resume or args.eval_only:
        tag = checkpoint.read_latest(ckpt_dir)
        if tag is None and args.eval_only:
            raise CheckpointError(f"no checkpoint in {ckpt_dir} (no `latest` file)")
        if tag is not None:
            manifest = checkpoint.verify(ckpt_dir, tag)
            checkpoint.check_compatible(manifest, cfg.to_dict(), world, precision, ckpt_dir)

    set_cpu_threads()
    quiet_deepspeed()
    init_distributed(settings.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(settings.seed)
    model = (HFLanguageModel(cfg, seed=settings.seed) if settings.hf
             else GPTMoE(cfg, ep_rank=rank % cfg.ep_size, seed=settings.seed))
    engine = build_engine(model, ds_config)

    start_step = 0
    if manifest is not None:
        checkpoint.load(engine, ckpt_dir, manifest["tag"], manifest)
        start_step = manifest["step"]
    elif args.resume and rank == 0:
        print(f"no checkpoint in {ckpt_dir}; starting from step 0", flush=True)

    def evaluate() -> float:
        return validation_loss(engine, x_val_NT, y_val_NT, settings.eval_batch, settings.seed)

    if args.eval_only:
        val = evaluate()
        result = {"step": start_step, "val_loss": val, "world_size": world, "ep_size": cfg.ep_size,
                  "precision": precision}
        if rank == 0:
            print(json.dumps(result), flush=True)
        return result

    os.makedirs(args.out, exist_ok=True)
    log = RunLog(os.path.join(args.out, "log.jsonl"), rank == 0, resume_step=start_step if manifest else None)
    tokens_per_step = (engine.train_micro_batch_size_per_gpu() * engine.gradient_accumulation_steps() * world
                       * cfg.seq_len)
    meta_base = {"model": cfg.to_dict(), "world_size": world, "precision": precision, "ds_config": ds_config,
                 "seed": settings.seed, "data": corpus.description}

    def save(step: int) -> None:
        checkpoint.save(engine, ckpt_dir, checkpoint.tag_for_step(step), {**meta_base, "step": step})

    log.write({"type": "event", "event": "resume" if manifest else "start", "step": start_step, "world_size": world,
               "ep_size": cfg.ep_size, "precision": precision, "model": cfg.to_dict(), "data": corpus.description,
               "train_bytes": corpus.train_U.numel(), "val_bytes": corpus.val_U.numel()})
    if start_step == 0:
        log.write({"type": "val", "step": 0, "val_loss": evaluate()})

    from ..stats import StatsCollector
    stats = StatsCollector(engine.module)
    bar = tqdm(total=settings.steps, initial=start_step, disable=rank != 0, desc="train", unit="step",
               dynamic_ncols=True, mininterval=1.0)
    last_val = None
    end_step = settings.steps if args.stop_at is None else min(args.stop_at, settings.steps)
    for step in range(start_step + 1, end_step + 1):
        t0 = time.time()
        metrics = train_step(engine, corpus, settings, step, rank)
        seconds = time.time() - t0
        record = {"type": "train", "step": step, **metrics, "lr": engine.get_lr()[0],
                  "tokens_per_s": round(tokens_per_step / seconds, 1), "time_s": round(time.time() - t_start, 2)}
        log.write(record)
        publish_to_monitor(engine, stats, record)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                        drop=f"{metrics['dropped']:.3f}", refresh=False)
        if step % settings.eval_every == 0 or step == settings.steps:
            last_val = evaluate()
            log.write({"type": "val", "step": step, "val_loss": last_val})
            if rank == 0:
                bar.write(f"step {step}: validation loss {last_val:.4f}")
        if step % settings.save_every == 0 or step == end_step:
            save(step)
    bar.close()
    if end_step < settings.steps:
        if rank == 0:
            print(f"stopped after step {end_step} of {settings.steps}; continue with --resume", flush=True)
        return {"steps": settings.steps, "stopped_at": end_step, "world_size": world, "ep_size": cfg.ep_size}
    if start_step == settings.steps:
        last_val = evaluate()

    tokens_T = sample_text(engine, encode(settings.sample_prompt), settings.sample_tokens, cfg.seq_len,
                           settings.seed)
    summary: Dict[str, Any] = {"steps": settings.steps, "resumed_from": start_step if manifest else None,
                               "world_size": world, "ep_size": cfg.ep_size, "precision": precision,
                               "final_val_loss": last_val}
    if rank == 0:
        vals = [r for r in read_log(log.path) if r.get("type") == "val"]
        summary["initial_val_loss"] = vals[0]["val_loss"] if vals and vals[0]["step"] == 0 else None
        summary["wall_s"] = round(time.time() - t_start, 1)
        text = decode(tokens_T)
        with open(os.path.join(args.out, "sample.txt"), "w") as f:
            f.write(text + "\n")
        plot_run(log.path, os.path.join(args.out, "training.png"))
        log.write({"type": "event", "event": "end", "step": settings.steps, **summary})
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"greedy sample after {settings.sample_prompt!r}:\n{text}\n", flush=True)
        if summary["initial_val_loss"] is not None and last_val is not None:
            print(f"validation loss {summary['initial_val_loss']:.4f} -> {last_val:.4f} "
                  f"({last_val / summary['initial_val_loss']:.2f}x) in {summary['wall_s']:.0f} s; outputs in "
                  f"{args.out}", flush=True)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the job; bad input prints one `error:` line and returns 2."""
    try:
        run(argv)
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        rank = os.environ.get("RANK", "0")
        print(f"error{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
