"""Simulated time to a target AUC: Oort against uniform random selection, measured in one run.

Both runs use the default experiment with simulated heavy-tailed devices (the generated
population, with availability), over-commitment and the same seed; only the selector differs.
They run side by side, one process each (one thread apiece).

Usage: python benchmarks/oort_vs_random.py [--target_auc 0.75] [--rounds 1000]
Prints both runs' figures, the ratio, and JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from figures import print_figures

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "taobao.yaml"
SELECTORS = {"random": "fltoolkit.selection.UniformSelector", "oort": "fltoolkit.selection.Oort"}


def _command(run_dir: Path, selector: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "fltoolkit.cli", "fit",
            "--experiment", str(EXPERIMENT),
            "--run_dir", str(run_dir), "--federated.rounds", str(args.rounds),
            "--federated.eval_interval", str(args.eval_interval),
            "--federated.selector.class_path", selector,
            "--systems.enabled", "true", "--systems.over_commit", str(args.over_commit),
            "--systems.availability", str(args.availability).lower(),
            "--report.target_auc", str(args.target_auc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target_auc", type=float, default=0.75)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--eval_interval", type=int, default=25)
    parser.add_argument("--over_commit", type=float, default=1.3)
    parser.add_argument("--availability", type=lambda v: v.lower() == "true", default=True,
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
    print(f"runs: {root}")
    print_figures("oort_vs_random", figures, f"python benchmarks/oort_vs_random.py "
                  f"--target_auc {args.target_auc} --rounds {args.rounds} "
                  f"--availability {str(args.availability).lower()}")


if __name__ == "__main__":
    main()
