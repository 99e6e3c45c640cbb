"""The preprocessing cache shared by the datamodules: identify sources cheaply, build a
prepared directory once (in a temp directory renamed into place), reuse it afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("fltk.data")


def fingerprint(path: Path) -> dict[str, Any]:
    """Cheap identity of a source file: size, mtime and a hash of its first and last MiB."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        if stat.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read())
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256_ends": digest.hexdigest()}


def publish(tmp: Path, out: Path, marker: str) -> None:
    """Move a finished directory into place; a concurrent run that got there first wins.

    A directory without its `marker` file is debris of an interrupted run and is replaced.
    """
    if (out / marker).is_file():
        return
    shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        if not (out / marker).is_file():
            raise


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def generate_once(out: Path, marker: str, generate: Callable[[Path], object], what: str
                  ) -> Path:
    """`out`, filled by `generate(tmp_dir)` unless a finished copy (one holding `marker`)
    exists; built in a temp directory renamed into place, so a crash leaves no half copy.
    `what` names the work in the log line announcing it."""
    if not (out / marker).is_file():
        log.info("data: %s in %s", what, out)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=ensure_dir(out.parent)))
        try:
            generate(tmp)
            publish(tmp, out, marker)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_once(out: Path, source: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """`out`, preprocessed from `source` by `build(tmp_dir) -> meta` (written as meta.json)
    unless a finished copy exists."""
    if (out / "meta.json").is_file():
        log.info("data: using cached preprocessing %s", out)
        return out
    started = time.perf_counter()

    def preprocess(tmp: Path) -> None:
        meta = build(tmp)
        meta["preprocess_seconds"] = round(time.perf_counter() - started, 3)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    generate_once(out, "meta.json", preprocess, f"preprocessing {source}")
    log.info("data: preprocessed %s in %.1f s -> %s", source, time.perf_counter() - started, out)
    return out


def config_hash(config: dict[str, Any]) -> str:
    """A short, stable name for a cache built from `config` (JSON-serializable)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class PreparedCache:
    """Datamodule mixin: `_prepared_dir()` builds the cache at most once per instance, whether
    Lightning calls prepare_data first or setup does. Subclasses define `_build_prepared_dir`."""

    _prepared: Path | None = None

    def prepare_data(self) -> None:
        self._prepared_dir()

    def _prepared_dir(self) -> Path:
        if self._prepared is None:
            self._prepared = self._build_prepared_dir()
        return self._prepared

    def _build_prepared_dir(self) -> Path:
        raise NotImplementedError
