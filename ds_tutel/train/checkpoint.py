"""Checkpoints in DeepSpeed's own format, saved atomically and checked before they are loaded.

Layout of a checkpoint directory (DeepSpeed's, plus one manifest per tag):
    latest                      the tag to resume from; written last, by os.replace, so it never names a
                                partial checkpoint
    <tag>/                      what engine.save_checkpoint writes (per-expert model files
                                layer_{L}_expert_{E}_mp_rank_00_model_states.pt, mp_rank_00_model_states.pt for
                                the rest of the model, one ZeRO optimizer shard per data-parallel rank) and
    <tag>/ds_tutel_manifest.json  step, layout (world size, ep_size), precision, model config, DeepSpeed config
                                and the size of every file; written only after every rank finished writing.
A save goes to `.partial-<tag>/` first and is renamed to `<tag>/` when complete; an interrupted save leaves only a
`.partial-*` directory, which the next save removes. The directory must be shared by all ranks (as DeepSpeed
assumes).

Command line (checkpoint_cli.py):  python -m ds_tutel.train.checkpoint_cli reshard SRC DST --world-size N [--ep-size P]
                                   python -m ds_tutel.train.checkpoint_cli info DIR [--tag TAG]
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional

MANIFEST = "ds_tutel_manifest.json"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial, corrupt or does not fit this run; the message says which."""


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(ckpt_dir: str) -> Optional[str]:
    """The tag named by `latest`, or None when there is no checkpoint yet."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag:
        raise CheckpointError(f"{path} is empty")
    return tag


def _file_sizes(tag_dir: str) -> Dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(tag_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel != MANIFEST:
                sizes[rel] = os.path.getsize(os.path.join(root, name))
    return dict(sorted(sizes.items()))


def save(engine: Any, ckpt_dir: str, tag: str, meta: Dict[str, Any]) -> str:
    """Collective: every rank writes its part with engine.save_checkpoint, then rank 0 publishes the tag.

    `meta` goes into the manifest and into DeepSpeed's client state. Returns the checkpoint's path.
    """
    import torch.distributed as dist
    rank = dist.get_rank()
    partial_tag = PARTIAL_PREFIX + tag
    partial_dir = os.path.join(ckpt_dir, partial_tag)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(partial_dir, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=partial_tag, client_state={"ds_tutel": meta}, save_latest=False)
    dist.barrier()  # every rank's files are on disk
    final_dir = os.path.join(ckpt_dir, tag)
    if rank == 0:
        manifest = {"format": FORMAT_VERSION, **meta, "tag": tag, "files": _file_sizes(partial_dir)}
        _write_atomic(os.path.join(partial_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")
        if os.path.exists(final_dir):  # the same step saved before (a run resumed from an earlier tag)
            stale = os.path.join(ckpt_dir, PARTIAL_PREFIX + "stale-" + tag)
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(final_dir, stale)
            os.rename(partial_dir, final_dir)
            shutil.rmtree(stale)
        else:
            os.rename(partial_dir, final_dir)
        _write_atomic(os.path.join(ckpt_dir, LATEST), tag)
    dist.barrier()
    return final_dir


def verify(ckpt_dir: str, tag: str) -> Dict[str, Any]:
    """The manifest of `tag` after checking that every file it lists is present with its recorded size."""
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"checkpoint {tag_dir} does not exist")
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {tag_dir} has no {MANIFEST}: it is partial or was not written by "
                              f"ds_tutel.train.checkpoint.save")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint manifest {path} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint manifest {path} has an unknown format")
    problems: List[str] = []
    for rel, size in manifest.get("files", {}).items():
        file_path = os.path.join(tag_dir, rel)
        if not os.path.isfile(file_path):
            problems.append(f"missing {rel}")
        elif os.path.getsize(file_path) != size:
            problems.append(f"{rel} has {os.path.getsize(file_path)} bytes, expected {size}")
    if problems:
        raise CheckpointError(f"checkpoint {tag_dir} is corrupt: " + "; ".join(problems[:5]))
    return manifest


def check_compatible(manifest: Dict[str, Any], model: Dict[str, Any], world_size: int, precision: str,
                     ckpt_dir: str) -> None:
    """Raises CheckpointError naming what differs between the checkpoint and this run."""
    saved = dict(manifest.get("model", {}))
    differing = sorted(k for k in set(saved) | set(model)
                       if k != "ep_size" and saved.get(k) != model.get(k))
    if differing:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {model.get(k)!r}" for k in differing)
        raise CheckpointError(f"checkpoint in {ckpt_dir} was written for a different model ({details})")
    if manifest.get("world_size") != world_size or saved.get("ep_size") != model.get("ep_size"):
        raise CheckpointError(
            f"checkpoint in {ckpt_dir} was written with world size {manifest.get('world_size')} and ep_size "
            f"{saved.get('ep_size')}; this run has world size {world_size} and ep_size {model.get('ep_size')}. "
            f"Convert it first: python -m ds_tutel.train.checkpoint_cli reshard {ckpt_dir} NEW_DIR --world-size "
            f"{world_size} --ep-size {model.get('ep_size')}")
    if manifest.get("precision") != precision:
        raise CheckpointError(f"checkpoint in {ckpt_dir} was written in {manifest.get('precision')}; this run uses "
                              f"{precision} (pass --precision {manifest.get('precision')})")


def load(engine: Any, ckpt_dir: str, tag: str, manifest: Dict[str, Any], module_only: bool = False) -> None:
    """Collective: loads model, optimizer and LR-scheduler state of a verified checkpoint into `engine`; with
    module_only the weights alone (DeepSpeed's per-expert files, named by global expert id, let them load at
    another expert-parallel size), the optimizer starting afresh."""
    try:
        path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_only=module_only,
                                         load_optimizer_states=not module_only,
                                         load_lr_scheduler_states=not module_only)
    except Exception as e:  # DeepSpeed and torch raise many types for a damaged file
        raise CheckpointError(f"could not load checkpoint {os.path.join(ckpt_dir, tag)}: "
                              f"{type(e).__name__}: {e}") from e
    if path is None:
        raise CheckpointError(f"DeepSpeed found no model files in {os.path.join(ckpt_dir, tag)}")
    if not module_only and engine.global_steps != manifest["step"]:
        raise CheckpointError(f"checkpoint {tag} holds step {engine.global_steps}, its manifest says "
                              f"{manifest['step']}")
