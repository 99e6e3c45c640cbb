"""Preprocessing cost of a Kaggle-sized Criteo `train.txt` (45M lines, ~11 GB) on this machine.

Each step runs in its own process so its peak memory (ru_maxrss) is its own:
  write    a synthetic train.txt in the Kaggle format, chunk by chunk (vocabularies as large as
           the real ones; labels random, so it measures preprocessing only)
  prepare  CriteoDataModule.prepare_data: parse, vocabularies or hash buckets, encode, parquet
           (vocabulary mode with each --min-count, then hashing mode)
  load     CriteoDataModule.setup of the vocabulary-mode cache (only with --load)

Usage: python benchmarks/criteo_prepare.py [--rows 45000000] [--dir /tmp/fltk-criteo-bench]
           [--min-count 1 4] [--load] [--keep]
Prints a table, then the figures as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from datamodules.synthetic_criteo import hex_names, train_lines

# Distinct values per categorical column of the Kaggle train set (DLRM's Kaggle config).
CARDINALITIES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
                 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105,
                 142572]
HASH_CAP = 10_000_000  # hashing mode: the cardinalities capped here
# Share of empty fields per column, roughly as in the Kaggle file.
DENSE_MISSING = [0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22]
SPARSE_MISSING = [0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0,
                  0.0, 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44]
SKEW = 2.0  # value id = floor(K * u**SKEW): a power-law head, every id still ~N/(SKEW*K) draws
CHUNK = 1_000_000
CLICK_RATE = 0.25


def _dense(rng: np.random.Generator, n: int, column: int) -> pl.Expr:
    """Heavy-tailed counts as text, I2 sometimes negative, some fields empty."""
    value = np.floor(np.expm1(np.minimum(rng.exponential(1.0 + column % 4, n), 20.0)))
    value = value.astype(np.int64)
    if column == 1:
        value -= rng.integers(0, 4, n) * (rng.random(n) < 0.05)
    text = pl.lit(pl.Series(value)).cast(pl.String)
    empty = pl.lit(pl.Series(rng.random(n) < DENSE_MISSING[column]))
    return pl.when(empty).then(pl.lit("")).otherwise(text)


def _sparse(rng: np.random.Generator, n: int, column: int, names: pl.Series) -> pl.Expr:
    """Power-law value ids of one categorical column as hex names, some fields empty."""
    ids = np.floor(len(names) * rng.random(n) ** SKEW).astype(np.int64)
    empty = pl.lit(pl.Series(rng.random(n) < SPARSE_MISSING[column]))
    return pl.when(empty).then(pl.lit("")).otherwise(pl.lit(names.gather(ids)))


def _chunk(rng: np.random.Generator, n: int, names: list[pl.Series]) -> pl.DataFrame:
    """n lines of train.txt; trailing empty fields stripped on half of them."""
    label = pl.lit(pl.Series((rng.random(n) < CLICK_RATE).astype(np.int8))).cast(pl.String)
    columns = [label, *(_dense(rng, n, c) for c in range(13)),
               *(_sparse(rng, n, c, names[c]) for c in range(26))]
    return train_lines(columns, rng.random(n) < 0.5)


def write(path: Path, rows: int, seed: int = 0) -> None:
    """train.txt of `rows` lines, appended CHUNK lines at a time so memory stays flat (but
    for the 26 name tables, ~33M strings)."""
    rng = np.random.default_rng(seed)
    names = [hex_names(rng, size) for size in CARDINALITIES]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for start in range(0, rows, CHUNK):
            frame = _chunk(rng, min(CHUNK, rows - start), names)
            frame.write_csv(f, include_header=False, quote_style="never")


def _module(root: Path, mode: str, min_count: int):  # noqa: ANN202 (torch import is deferred)
    from datamodules.criteo import CriteoDataModule

    sizes = [min(c, HASH_CAP) for c in CARDINALITIES] if mode == "hash" else None
    return CriteoDataModule(data_dir=str(root), cache_dir=str(root / "cache"),
                            min_count=min_count, num_embeddings_per_feature=sizes)


def _child(step: str, rows: int, root: Path, mode: str, min_count: int) -> dict:
    result: dict = {"step": step, "rows": rows}
    if step != "write":
        import torch

        torch.set_num_threads(1)
        dm = _module(root, mode, min_count)
        result.update(mode=mode, min_count=min_count)
    started = time.perf_counter()
    if step == "write":
        write(root / "train.txt", rows)
        result["file_gb"] = round((root / "train.txt").stat().st_size / 1e9, 3)
    elif step == "prepare":
        dm.prepare_data()
        meta = json.loads((dm._prepared_dir() / "meta.json").read_text())
        result["cardinalities"] = meta["cardinalities"]
    else:
        dm.setup()
        result["train_rows"] = dm.data.train.num_rows
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return result


def _run_step(step: str, rows: int, root: Path, mode: str = "vocab", min_count: int = 1
              ) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", step, "--rows", str(rows), "--dir", str(root),
         "--mode", mode, "--min-count", str(min_count)],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _steps(min_counts: list[int], load: bool) -> list[tuple[str, str, int]]:
    """(step, mode, min_count) in run order; load reads the first vocabulary-mode cache."""
    steps = [("write", "vocab", 1)]
    steps += [("prepare", "vocab", m) for m in min_counts]
    steps.append(("prepare", "hash", 1))
    if load:
        steps.append(("load", "vocab", min_counts[0]))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=45_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fltk-criteo-bench"))
    parser.add_argument("--min-count", type=int, nargs="+", default=[1])
    parser.add_argument("--load", action="store_true", help="also time setup (load to tensors)")
    parser.add_argument("--keep", action="store_true", help="keep train.txt and the caches")
    parser.add_argument("--mode", choices=["vocab", "hash"], help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["write", "prepare", "load"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.rows, args.dir, args.mode, args.min_count[0])))
        return
    shutil.rmtree(args.dir, ignore_errors=True)
    results = []
    for step, mode, min_count in _steps(args.min_count, args.load):
        result = _run_step(step, args.rows, args.dir, mode, min_count)
        results.append(result)
        what = "" if step == "write" else f"{mode} min_count={min_count}"
        print(f"{args.rows:>11,d} rows  {step:<8s} {what:<18s} {result['seconds']:8.1f} s  "
              f"peak {result['peak_rss_mb']:>7,d} MB", flush=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"command: python benchmarks/criteo_prepare.py --rows {args.rows} "
          f"--min-count {' '.join(map(str, args.min_count))}" + " --load" * args.load)
    print(json.dumps({"benchmark": "criteo_prepare", "results": results}))


if __name__ == "__main__":
    main()
