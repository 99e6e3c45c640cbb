"""Round time and per-rank peak memory of a federated run on 1 and 2 ranks (torchrun, gloo).

The default experiment with a cohort of 200 clients; each configuration is one `fltk fit`
launched under torchrun, whose ranks print their peak RSS. Round time is the median of
`round_wall_s` in rounds.csv, the first round (warm-up) excluded. On a 2-core machine two
ranks bring little speed-up: the figure is for the record.

Usage: python benchmarks/scale.py [--rounds 6] [--clients 200] [--ranks 1 2]
Prints a table, then JSON on the last line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "taobao.yaml"
MARKER = "scale-benchmark-rank "


def _worker(fit_args: list[str]) -> None:
    """Inside torchrun: run the fit, then report this rank's peak memory on one line."""
    from fltoolkit.cli import main

    code = main(["fit", *fit_args])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(MARKER + json.dumps({"rank": int(os.environ.get("RANK", "0")),
                               "peak_rss_mb": round(peak_mb)}), flush=True)
    sys.exit(code)


def _launch(ranks: int, rounds: int, clients: int, out: Path) -> dict:
    run_dir = out / f"ranks{ranks}"
    fit_args = ["--experiment", str(EXPERIMENT), "--run_dir", str(run_dir),
                "--federated.rounds", str(rounds), "--federated.eval_interval", str(rounds),
                "--federated.clients_per_round", str(clients)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(ranks), __file__, "--worker", *fit_args]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    peaks = sorted((json.loads(line.split(MARKER, 1)[1]) for line in done.stdout.splitlines()
                    if MARKER in line), key=lambda row: row["rank"])
    with (run_dir / "rounds.csv").open() as f:
        seconds = [float(row["round_wall_s"]) for row in csv.DictReader(f)][1:]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"ranks": ranks, "round_s": round(statistics.median(seconds), 3),
            "peak_rss_mb": [row["peak_rss_mb"] for row in peaks], "auc": summary["auc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        _worker(rest)
        return
    results = []
    with tempfile.TemporaryDirectory() as out:
        for ranks in args.ranks:
            result = _launch(ranks, args.rounds, args.clients, Path(out))
            results.append(result)
            print(f"{ranks} rank(s): round {result['round_s']:.3f} s, peak RSS per rank "
                  f"{result['peak_rss_mb']} MB, final AUC {result['auc']:.4f}", flush=True)
    print(f"command: python benchmarks/scale.py --rounds {args.rounds} --clients {args.clients} "
          f"--ranks {' '.join(map(str, args.ranks))}")
    print(json.dumps({"benchmark": "scale", "results": results}))


if __name__ == "__main__":
    main()
