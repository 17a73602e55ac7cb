"""Byte-level text data that every machine already has: the Python standard library's source and text files.

Tokens are raw bytes (vocabulary 256), so there is no tokenizer to download. The corpus is the concatenation of
the files in sorted order, cut into blocks of BLOCK_BYTES; every VAL_EVERY-th block is validation, the rest
training. Training windows are drawn from a generator keyed by (seed, step, rank, micro-batch), so a batch is a
pure function of where the run is: a resumed run sees exactly the batches an uninterrupted one sees, with no
loader state to checkpoint. Users point `paths` at their own files or directories instead.

Shape legend: B batch, T sequence, N validation windows, U bytes.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

BLOCK_BYTES = 4096
VAL_EVERY = 10
STDLIB_SUFFIXES = (".py", ".txt")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """Bad data input (missing path, no text, corpus too small); the message says what to change."""


@dataclass
class Corpus:
    train_U: torch.Tensor  # uint8
    val_U: torch.Tensor  # uint8
    num_files: int
    description: str

    @property
    def num_bytes(self) -> int:
        return self.train_U.numel() + self.val_U.numel()


def stdlib_dir() -> Path:
    """The directory of this interpreter's standard library (the base one, also inside a virtualenv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def collect_files(paths: Sequence[str], suffixes: Optional[Tuple[str, ...]] = None) -> List[Path]:
    """Files named by `paths` (files, or directories walked recursively), sorted, hidden and binary ones skipped."""
    found: List[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"data path does not exist: {raw}")
        if path.is_file():
            found.append(path)
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or (suffixes is not None and not name.endswith(suffixes)):
                    continue
                candidate = Path(root) / name
                if candidate.is_file() and _is_text(candidate):
                    found.append(candidate)
    return sorted(set(found), key=lambda p: str(p))


def load_corpus(paths: Optional[Sequence[str]] = None, max_bytes: int = 8_000_000) -> Corpus:
    """Reads up to `max_bytes` of text (default: the standard library's .py and .txt files) and splits it."""
    if paths:
        files = collect_files(paths)
        description = f"{len(paths)} user path(s)"
    else:
        files = collect_files([str(stdlib_dir())], STDLIB_SUFFIXES)
        description = f"Python standard library at <stdlib> ({stdlib_dir().name})"
    if not files:
        raise DataError(f"no text files found in {list(paths or [stdlib_dir()])}")
    chunks: List[bytes] = []
    total = 0
    for path in files:
        if total >= max_bytes:
            break
        data = path.read_bytes()[:max_bytes - total]
        chunks.append(data)
        total += len(data)
    blob_U = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return split(blob_U, len(chunks), description)


def split(blob_U: torch.Tensor, num_files: int = 1, description: str = "") -> Corpus:
    """Every VAL_EVERY-th block of BLOCK_BYTES is validation; needs at least VAL_EVERY blocks."""
    need = BLOCK_BYTES * VAL_EVERY
    if blob_U.numel() < need:
        raise DataError(f"corpus has {blob_U.numel()} bytes; at least {need} ({VAL_EVERY} blocks of {BLOCK_BYTES}) "
                        f"are needed for a train/validation split")
    block_ids_U = torch.arange(blob_U.numel()) // BLOCK_BYTES
    is_val_U = block_ids_U % VAL_EVERY == VAL_EVERY - 1
    return Corpus(train_U=blob_U[~is_val_U].clone(), val_U=blob_U[is_val_U].clone(), num_files=num_files,
                  description=description)


def mix_seed(*keys: object) -> int:
    """A 63-bit seed determined by `keys` (ints and strings), independent of Python's hash randomisation."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*keys))


def train_batch(corpus: Corpus, seq_len: int, batch: int, seed: int, step: int, rank: int,
                micro: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs x_BT, next-byte targets y_BT), int64, for one micro-batch of one rank at one step."""
    if corpus.train_U.numel() <= seq_len + 1:
        raise DataError(f"training split ({corpus.train_U.numel()} bytes) is shorter than seq_len + 1")
    gen = _generator(seed, step, rank, micro)
    starts_B = torch.randint(0, corpus.train_U.numel() - seq_len - 1, (batch,), generator=gen)
    return _windows(corpus.train_U, starts_B, seq_len)


def val_windows(corpus: Corpus, seq_len: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`count` fixed windows spread evenly over the validation split: (x_NT, y_NT)."""
    last = corpus.val_U.numel() - seq_len - 1
    if last < 0:
        raise DataError(f"validation split ({corpus.val_U.numel()} bytes) is shorter than seq_len + 1")
    starts_N = torch.linspace(0, last, count).round().long()
    return _windows(corpus.val_U, starts_N, seq_len)


def _windows(stream_U: torch.Tensor, starts_B: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    index_BT = starts_B.unsqueeze(1) + torch.arange(seq_len + 1)
    tokens_BT = stream_U[index_BT].long()
    return tokens_BT[:, :-1], tokens_BT[:, 1:]


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as int64 tokens."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: torch.Tensor) -> str:
    """Tokens back to text (invalid UTF-8 sequences replaced, as a byte model can emit them)."""
    return bytes(int(t) for t in tokens.tolist()).decode("utf-8", errors="replace")
