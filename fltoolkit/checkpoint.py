"""Checkpoints of a federated run: written atomically, read safely, pruned to `keep_last`.

A checkpoint is `checkpoints/round_NNNNNN.pt` in the run directory, holding the loop's
`state_dict()` (tensors and plain values). It is written to a temp file, flushed to disk and
renamed, so a crash mid-write leaves the previous checkpoint intact; it is read with
`torch.load(weights_only=True)`, so opening one never runs code. A file that does not load
(truncated, corrupt) is skipped with a warning in favour of the one before it.
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


def save_checkpoint(directory: Path, round_index: int, state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write the state of `round_index` atomically, then delete all but the newest
    `keep_last` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, round_index)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink()
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, oldest round first."""
    found = [p for p in directory.glob("round_*.pt") if PATTERN.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.fullmatch(p.name).group(1)))


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
