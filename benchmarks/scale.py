"""Round time on 1 and 2 ranks (torchrun, gloo), and per-rank peak memory with replicated vs
sharded tables.

Round time: the default experiment with a cohort of 200 clients (on 2 ranks also with tables
sharded table-wise); each configuration is one `fltk fit` launched under torchrun. It is the
median of `round_wall_s` in rounds.csv, the first round (warm-up) excluded. On a 2-core
machine two ranks bring little speed-up: the figure is for the record.

Memory: 2 ranks run 3 rounds of 200 clients on generated data whose 4 sparse features each
have 1M ids (4 tables x 1M rows x 16 = 256 MB), with whole tables on each rank (`none`) and
sharded `table_wise` and `column_wise`; each rank reports its peak RSS (which includes
~0.5 GB of imported libraries).

Usage: python benchmarks/scale.py [--rounds 6] [--clients 200] [--ranks 1 2]
                                  [--shardings none table_wise column_wise] [--table-rows N]
                                  [--strategy FedAvg|FedAdam]
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
REPORTS = "FLTK_SCALE_REPORTS"  # where the ranks write their reports


def _report(**fields: object) -> None:
    """This rank's peak memory (and `fields`) in a file for the launcher (the ranks' stdout
    lines can interleave)."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rank = int(os.environ.get("RANK", "0"))
    Path(os.environ[REPORTS], f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "peak_rss_mb": round(peak_mb), **fields}))


def _worker(fit_args: list[str]) -> None:
    """Inside torchrun: run the fit, then report this rank's peak memory."""
    from fltoolkit.run.cli import main

    code = main(["fit", *fit_args])
    _report()
    sys.exit(code)


def _big_tables_data(table_rows: int, clients: int = 2000, rows_per_client: int = 100):
    """4 sparse features of `table_rows` uniform ids each, one dense feature, random labels:
    the same on every rank (seeded)."""
    import torch

    from datamodules.base import FeatureSpec, PreparedData
    from datamodules.clients import ClientTable

    generator = torch.Generator().manual_seed(0)

    def split(num_clients: int) -> ClientTable:
        rows = num_clients * rows_per_client
        return ClientTable.from_sorted(
            torch.rand(rows, 1, generator=generator),
            torch.randint(0, table_rows, (rows, 4), generator=generator),
            (torch.rand(rows, generator=generator) < 0.1).float(),
            torch.arange(num_clients).repeat_interleave(rows_per_client))

    names = ["f0", "f1", "f2", "f3"]
    return PreparedData(split(clients), split(clients // 10),
                        FeatureSpec(names, [table_rows] * 4, ["d0"]))


def _memory_worker(sharding: str, table_rows: int, clients: int, strategy: str) -> None:
    """Inside torchrun: 3 rounds on 4 big tables, whole or sharded; report peak memory."""
    import torch

    from fltoolkit import strategies
    from fltoolkit.loop import FederatedLoop
    from fltoolkit.run.config import FederatedConfig
    from fltoolkit.run.fit import build_model
    from fltoolkit.run.ranks import Ranks
    from recsys.module import CTRModule

    ranks = Ranks.from_environment()
    data = _big_tables_data(table_rows)
    torch.manual_seed(0)
    module = CTRModule(sparse_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    sharded = build_model(module, data.features, sharding, ranks)
    config = FederatedConfig(rounds=3, clients_per_round=clients, eval_interval=3,
                             strategy=getattr(strategies, strategy)())
    result = FederatedLoop(module, data, config, seed=0, ranks=ranks,
                           sharded_tables=sharded).run()
    _report(auc=result["auc"])
    ranks.close()


def _ranks_report(ranks: int, worker_args: list[str]) -> list[dict]:
    """Launch this file's worker on `ranks` ranks; every rank's report, in rank order."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(ranks), __file__, *worker_args]
    with tempfile.TemporaryDirectory() as reports:
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", REPORTS: reports})
        if done.returncode != 0:
            raise SystemExit(f"{ranks} rank(s), {worker_args[:2]} failed:\n"
                             f"{done.stderr[-3000:]}")
        return [json.loads(Path(reports, f"rank{rank}.json").read_text())
                for rank in range(ranks)]


def _launch_memory(sharding: str, table_rows: int, clients: int, strategy: str) -> dict:
    reports = _ranks_report(2, ["--memory-worker", sharding, "--table-rows", str(table_rows),
                                "--clients", str(clients), "--strategy", strategy])
    return {"sharding": sharding, "peak_rss_mb": [row["peak_rss_mb"] for row in reports],
            "auc": reports[0]["auc"]}


def _launch(ranks: int, rounds: int, clients: int, out: Path, sharding: str = "none") -> dict:
    run_dir = out / f"ranks{ranks}-{sharding}"
    fit_args = ["--experiment", str(EXPERIMENT), "--run_dir", str(run_dir),
                "--federated.rounds", str(rounds), "--federated.eval_interval", str(rounds),
                "--federated.clients_per_round", str(clients), "--federated.sharding", sharding]
    peaks = _ranks_report(ranks, ["--worker", *fit_args])
    with (run_dir / "rounds.csv").open() as f:
        seconds = [float(row["round_wall_s"]) for row in csv.DictReader(f)][1:]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"ranks": ranks, "sharding": sharding, "round_s": round(statistics.median(seconds), 3),
            "peak_rss_mb": [row["peak_rss_mb"] for row in peaks], "auc": summary["auc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--shardings", nargs="*", default=["none", "table_wise", "column_wise"])
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--strategy", choices=["FedAvg", "FedAdam"], default="FedAvg",
                        help="server strategy of the memory part (FedAdam adds two "
                             "table-sized moments, sharded alike)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        _worker(rest)
        return
    if args.memory_worker:
        _memory_worker(args.memory_worker, args.table_rows, args.clients, args.strategy)
        return
    results, memory = [], []
    with tempfile.TemporaryDirectory() as out:
        runs = [(ranks, "none") for ranks in args.ranks]
        runs += [(ranks, "table_wise") for ranks in args.ranks if ranks > 1]
        for ranks, sharding in runs:
            result = _launch(ranks, args.rounds, args.clients, Path(out), sharding)
            results.append(result)
            print(f"{ranks} rank(s), sharding {sharding}: round {result['round_s']:.3f} s, peak "
                  f"RSS per rank {result['peak_rss_mb']} MB, final AUC {result['auc']:.4f}",
                  flush=True)
    for sharding in args.shardings:
        row = _launch_memory(sharding, args.table_rows, args.clients, args.strategy)
        memory.append(row)
        print(f"2 ranks, 4 tables x {args.table_rows} rows, {args.strategy}, sharding "
              f"{sharding}: peak RSS per rank {row['peak_rss_mb']} MB, AUC {row['auc']:.4f}",
              flush=True)
    print(f"command: python benchmarks/scale.py --rounds {args.rounds} --clients {args.clients} "
          f"--ranks {' '.join(map(str, args.ranks))} --shardings {' '.join(args.shardings)} "
          f"--table-rows {args.table_rows} --strategy {args.strategy}")
    print(json.dumps({"benchmark": "scale", "results": results, "memory": memory}))


if __name__ == "__main__":
    main()
