"""Final AUC under an embedding-row budget: AdaEmbed-style pruning against a frequency
threshold and the hashing trick at the same budget, on the default Taobao experiment and on
synthetic Criteo (`experiments/criteo.yaml`).

Each (dataset, method, budget) is one run of the experiment with `--embeddings.method M
--embeddings.budget B`, B a fraction of all shared tables' rows (the default total scope:
tables of at most 128 ids whole, the rest split by ids, the same split for every method);
`adaembed_counts` is adaembed with `--embeddings.start counts` (from the frequency
threshold's rows); budget 1.0 is the full tables (`method none`). Reported per run:
validation and test AUC, the embedding rows the server holds (and their megabytes at 4
bytes per value), and the bytes uploaded per round. Two runs at a time, one process and one
thread each; only AUC, sizes and bytes are compared.

Usage: python benchmarks/embedding_budget.py [--budgets 0.5 0.25 0.1]
    [--datasets taobao criteo] [--methods adaembed adaembed_counts frequency hashing] [--full true]
    [--rounds N]
Prints a row per run and JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from itertools import product
from pathlib import Path
from typing import Any

import yaml
from figures import print_figures

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
METHODS = ("adaembed", "adaembed_counts", "frequency", "hashing")
# each method's options; adaembed_counts: pruning started from the frequency threshold's rows
OPTIONS = {"adaembed": ["--embeddings.method", "adaembed"],
           "adaembed_counts": ["--embeddings.method", "adaembed", "--embeddings.start", "counts"],
           "frequency": ["--embeddings.method", "frequency"],
           "hashing": ["--embeddings.method", "hashing"]}
BYTES_PER_VALUE = 4


def _runs(args: argparse.Namespace) -> dict[str, list[str]]:
    """Every run's name and its extra `fltk fit` options."""
    runs = ({f"{dataset}_full": ["--experiment", str(EXPERIMENTS / f"{dataset}.yaml")]
             for dataset in args.datasets} if args.full else {})
    for dataset, method, budget in product(args.datasets, args.methods, args.budgets):
        runs[f"{dataset}_{method}_{budget:g}"] = [
            "--experiment", str(EXPERIMENTS / f"{dataset}.yaml"), *OPTIONS[method],
            "--embeddings.budget", str(budget)]
    if args.rounds:
        for options in runs.values():
            options += ["--federated.rounds", str(args.rounds),
                        "--federated.eval_interval", str(args.rounds)]
    return runs


def _result(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = summary["embedding_rows"]
    width = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_args"][
        "embedding_dim"]
    return {"validation_auc": round(summary["validation"]["auc"], 4),
            "test_auc": round(summary["auc"], 4), "embedding_rows": rows,
            "embedding_rows_logical": summary["embedding_rows_logical"],
            "embedding_mb": round(rows * width * BYTES_PER_VALUE / 2**20, 2),
            "bytes_up_per_round": summary["bytes_up_per_round"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--datasets", nargs="+", default=["taobao", "criteo"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--full", type=lambda v: v.lower() == "true", default=True,
                        help="also run the full tables (true/false)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="override the experiments' rounds (smoke tests)")
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        pending = list(_runs(args).items())
        while pending:
            batch, pending = pending[:args.parallel], pending[args.parallel:]
            processes = {name: subprocess.Popen(
                [sys.executable, "-m", "fltoolkit.run.cli", "fit", *options,
                 "--run_dir", str(Path(scratch) / name)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for name, options in batch}
            for name, process in processes.items():
                _, err = process.communicate()
                if process.returncode:
                    raise SystemExit(f"{name} failed:\n{err.decode()[-2000:]}")
                results[name] = _result(Path(scratch) / name)
                print(name, results[name], flush=True)
    command = (f"python benchmarks/embedding_budget.py --budgets "
               f"{' '.join(f'{b:g}' for b in args.budgets)} --datasets {' '.join(args.datasets)}"
               f" --methods {' '.join(args.methods)} --full {str(args.full).lower()}"
               + (f" --rounds {args.rounds}" if args.rounds else ""))
    figures = {"runs": results}
    print_figures("embedding_budget", figures, command)
    return figures


if __name__ == "__main__":
    main()
