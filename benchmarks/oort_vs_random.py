"""Simulated time to a target AUC: Oort against uniform random selection, measured in one run.

Both runs use the default experiment with simulated heavy-tailed devices (the generated
population), over-commitment and the same seed; only the selector differs. They run side by
side, one process each (one thread apiece). Availability is off by default: a run spans well
under an hour of simulated time, so with sessions on only about a fifth of the users are ever
online and both selectors revisit the same few (`--availability true` measures that case).

Usage: python benchmarks/oort_vs_random.py [--target_auc 0.7] [--more_targets 0.68 0.72]
Prints both runs' figures (the headline target from summary.json, the others from
metrics.csv), the time ratios, and JSON on the last line.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from figures import print_figures

from fltoolkit.reports.config import ReportConfig

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "taobao.yaml"
SELECTORS = {"random": "fltoolkit.selection.UniformSelector", "oort": "fltoolkit.selection.Oort"}


def _command(run_dir: Path, selector: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "fltoolkit.run.cli", "fit",
            "--experiment", str(EXPERIMENT),
            "--run_dir", str(run_dir), "--federated.rounds", str(args.rounds),
            "--federated.eval_interval", str(args.eval_interval),
            "--federated.selector.class_path", selector,
            "--systems.enabled", "true", "--systems.over_commit", str(args.over_commit),
            "--systems.availability", str(args.availability).lower(),
            "--report.target_auc", str(args.target_auc)]


def _history(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{key: float(value) for key, value in row.items() if value}
                for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target_auc", type=float, default=0.7)
    parser.add_argument("--more_targets", type=float, nargs="*", default=[0.68, 0.72])
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--eval_interval", type=int, default=25)
    parser.add_argument("--over_commit", type=float, default=1.3)
    parser.add_argument("--availability", type=lambda v: v.lower() == "true", default=False,
                        help="clients go offline per the generated sessions (true/false)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fltk_oort_"))
    runs = {name: root / name for name in SELECTORS}
    processes = {name: subprocess.Popen(_command(runs[name], path, args),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for name, path in SELECTORS.items()}
    for name, process in processes.items():
        _, err = process.communicate()
        if process.returncode:
            raise SystemExit(f"{name} run failed:\n{err.decode()[-2000:]}")
    summaries = {name: json.loads((runs[name] / "summary.json").read_text()) for name in runs}
    figures = {}
    for name, summary in summaries.items():
        for key in ("time_to_target", "rounds_to_target", "sim_time_s", "auc"):
            figures[f"{name}_{key}"] = summary.get(key)
    random_time, oort_time = figures["random_time_to_target"], figures["oort_time_to_target"]
    figures["oort_over_random_time_to_target"] = (
        round(oort_time / random_time, 3) if random_time and oort_time else None)
    figures["target_auc"] = args.target_auc
    for target in args.more_targets:
        times = {name: ReportConfig(target).to_target(_history(runs[name]))["time_to_target"]
                 for name in runs}
        figures[f"time_to_{target}"] = times
        figures[f"oort_over_random_time_to_{target}"] = (
            round(times["oort"] / times["random"], 3) if all(times.values()) else None)
    print(f"runs: {root}")
    print_figures("oort_vs_random", figures, f"python benchmarks/oort_vs_random.py "
                  f"--target_auc {args.target_auc} "
                  f"--more_targets {' '.join(map(str, args.more_targets))} "
                  f"--rounds {args.rounds} --availability {str(args.availability).lower()}")


if __name__ == "__main__":
    main()
