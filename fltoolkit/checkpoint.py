"""Checkpoints of a federated run: written atomically, read safely, pruned to `keep_last`.

A checkpoint is `checkpoints/round_NNNNNN.pt` in the run directory, holding the loop's
`state_dict()` (tensors and plain values). It is written to a temp file, flushed to disk and
renamed, so a crash mid-write leaves the previous checkpoint intact; it is read with
`torch.load(weights_only=True)`, so opening one never runs code. A file that does not load
(truncated, corrupt) is skipped with a warning in favour of the one before it.

With sharded tables every rank also writes its own shards to `round_NNNNNN.rankR.pt`, before
rank 0 writes the round's file, so a round file on disk always has its shard files.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("fltk")

PATTERN = re.compile(r"round_(\d{6,})\.pt")


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected; the message names the directory."""


def checkpoint_path(directory: Path, round_index: int) -> Path:
    return directory / f"round_{round_index:06d}.pt"


def shard_path(directory: Path, round_index: int, rank: int) -> Path:
    return directory / f"round_{round_index:06d}.rank{rank}.pt"


def save_atomically(path: Path, state: dict[str, Any]) -> Path:
    """torch.save to a temp file, flushed to disk, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(directory: Path, round_index: int, state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write the state of `round_index` atomically, then delete all but the newest
    `keep_last` checkpoints."""
    path = save_atomically(checkpoint_path(directory, round_index), state)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink()
    return path


def save_shard(directory: Path, round_index: int, rank: int, state: dict[str, Any],
               keep_last: int) -> Path:
    """Write one rank's shards of `round_index`; keeps one more than the round files, since
    this round's file is written after them (a crash in between falls back a round)."""
    path = save_atomically(shard_path(directory, round_index, rank), state)
    for old in list_checkpoints(directory, rank)[:-(keep_last + 1)]:
        old.unlink()
    return path


def load_shard(directory: Path, round_index: int, rank: int) -> dict[str, Any]:
    """Rank `rank`'s shards of `round_index`, with an error naming the file if it is absent
    or does not load."""
    path = shard_path(directory, round_index, rank)
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"{path}: rank {rank}'s table shards of round {round_index} do "
                              f"not load ({type(error).__name__}); cannot resume") from error


def list_checkpoints(directory: Path, rank: int | None = None) -> list[Path]:
    """Checkpoint files (or rank `rank`'s shard files), oldest round first."""
    pattern = PATTERN if rank is None else re.compile(rf"round_(\d{{6,}})\.rank{rank}\.pt")
    found = [p for p in directory.glob("round_*.pt") if pattern.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(pattern.fullmatch(p.name).group(1)))


def load_latest(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that loads; unreadable newer ones are reported and skipped."""
    candidates = list_checkpoints(directory)
    for path in reversed(candidates):
        try:
            return path, torch.load(path, weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file falls back the same way
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                        path, type(error).__name__, str(error).splitlines()[0][:200])
    where = "none loads" if candidates else "none found"
    raise CheckpointError(f"{directory}: no usable checkpoint ({where}); cannot resume")
