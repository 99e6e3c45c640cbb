"""Simulated time to a target AUC: asynchronous FedBuff against synchronous FedAvg with
over-commitment, at the same concurrency, measured in one run.

Both runs use the default experiment with simulated heavy-tailed devices (the generated
population, availability off as in oort_vs_random.py) and the same seed. Sync selects
ceil(clients_per_round x over_commit) clients a round and aggregates the first
clients_per_round to finish; async keeps that many clients training at every moment and
aggregates every `buffer_size` arrivals (staleness weight 1/sqrt(1 + s)). Both aggregate the
same number of client updates in all (async makes clients_per_round / buffer_size times as
many aggregations). They run side by side, one process each (one thread apiece); only the
simulated clock is compared, never wall time.

Usage: python benchmarks/async_vs_sync.py [--rounds 1000] [--targets 0.70 0.72 0.74]
Prints each run's time to every target, the ratios, the final AUCs and bytes moved, and JSON
on the last line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from figures import print_figures

from fltoolkit.reports.config import ReportConfig

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "taobao.yaml"


def _commands(root: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    """The two runs' `fltk fit` command lines."""
    concurrency = math.ceil(args.clients_per_round * args.over_commit)
    aggregations = args.rounds * args.clients_per_round // args.buffer_size
    common = [sys.executable, "-m", "fltoolkit.run.cli", "fit", "--experiment", str(EXPERIMENT),
              "--federated.clients_per_round", str(args.clients_per_round),
              "--systems.enabled", "true", "--systems.availability", "false"]
    sync_eval = args.eval_every_updates // args.clients_per_round
    return {
        "sync": [*common, "--run_dir", str(root / "sync"), "--federated.rounds", str(args.rounds),
                 "--federated.eval_interval", str(sync_eval),
                 "--systems.over_commit", str(args.over_commit)],
        "async": [*common, "--run_dir", str(root / "async"), "--federated.mode", "async",
                  "--federated.rounds", str(aggregations),
                  "--federated.eval_interval", str(args.eval_every_updates // args.buffer_size),
                  "--federated.concurrency", str(concurrency),
                  "--federated.buffer_size", str(args.buffer_size)],
    }


def _history(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{key: float(value) for key, value in row.items() if value}
                for row in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="sync rounds")
    parser.add_argument("--clients_per_round", type=int, default=20)
    parser.add_argument("--over_commit", type=float, default=1.3)
    parser.add_argument("--buffer_size", type=int, default=10)
    parser.add_argument("--eval_every_updates", type=int, default=400,
                        help="evaluate after this many aggregated updates, in both runs")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.70, 0.72, 0.74])
    parser.add_argument("--dir", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args(argv)

    root = args.dir or Path(tempfile.mkdtemp(prefix="fltk_async_"))
    commands = _commands(root, args)
    processes = {name: subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
                 for name, command in commands.items()}
    for name, process in processes.items():
        _, err = process.communicate()
        if process.returncode:
            raise SystemExit(f"{name} run failed:\n{err.decode()[-2000:]}")
    figures: dict[str, object] = {}
    for name in commands:
        summary = json.loads((root / name / "summary.json").read_text())
        figures[f"{name}_final_test_auc"] = round(summary["auc"], 4)
        figures[f"{name}_final_validation_auc"] = round(summary["validation"]["auc"], 4)
        figures[f"{name}_sim_time_s"] = summary["sim_time_s"]
        figures[f"{name}_bytes_up_down_total"] = [summary["bytes_up_total"],
                                                  summary["bytes_down_total"]]
    for target in args.targets:
        times = {name: ReportConfig(target).to_target(_history(root / name))["time_to_target"]
                 for name in commands}
        figures[f"time_to_{target}"] = times
        figures[f"async_over_sync_time_to_{target}"] = (
            round(times["async"] / times["sync"], 3) if all(times.values()) else None)
    print(f"runs: {root}")
    print_figures("async_vs_sync", figures,
                  f"python benchmarks/async_vs_sync.py --rounds {args.rounds} --buffer_size "
                  f"{args.buffer_size} --over_commit {args.over_commit} --targets "
                  f"{' '.join(map(str, args.targets))}")
    return figures


if __name__ == "__main__":
    main()
