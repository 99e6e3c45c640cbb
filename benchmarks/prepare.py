"""Preprocessing cost at 1M and 26M rows (the real Taobao size) of synthetic Taobao data.

Each step runs in its own process so its peak memory (ru_maxrss) is its own:
  generate  write the three CSVs (datamodules.synthetic)
  prepare   join, split, build vocabularies, encode, write the parquet cache
  load      read the cache into ClientTables (what every later run pays)

Usage: python benchmarks/prepare.py [--rows 1000000 26000000] [--dir /tmp/fltk-bench]
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


def _child(step: str, rows: int, root: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    from datamodules.taobao import TaobaoDataModule

    dm = TaobaoDataModule(num_rows=rows, cache_dir=str(root), seed=0)
    started = time.perf_counter()
    if step == "generate":
        dm.source_dir()
    elif step == "prepare":
        dm.prepare_data()
    else:
        dm.setup()
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"step": step, "rows": rows, "seconds": round(seconds, 2),
              "peak_rss_mb": round(peak_mb)}
    if step == "load":
        result.update(train_rows=dm.data.train.num_rows, clients=dm.data.train.num_clients)
    return result


def _run_step(step: str, rows: int, root: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", step, "--rows", str(rows), "--dir", str(root)],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 26_000_000])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fltk-bench-prepare"))
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--child", choices=["generate", "prepare", "load"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.rows[0], args.dir)))
        return
    results = []
    for rows in args.rows:
        root = args.dir / f"rows{rows}"
        shutil.rmtree(root, ignore_errors=True)
        for step in ("generate", "prepare", "load"):
            result = _run_step(step, rows, root)
            results.append(result)
            print(f"{rows:>11,d} rows  {step:<8s} {result['seconds']:8.1f} s  "
                  f"peak {result['peak_rss_mb']:>7,d} MB", flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"command: python benchmarks/prepare.py --rows {' '.join(map(str, args.rows))}")
    print(json.dumps({"benchmark": "prepare", "results": results}))


if __name__ == "__main__":
    main()
