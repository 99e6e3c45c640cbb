"""One federated pass over the synthetic Taobao log at its real size: every user trains once.

Measured in one process (torch's default threads, as `fltk fit` runs):
  data        the datamodule generates the synthetic CSVs into its cache (26M rows: ~1.13M
              users), preprocesses them (row check, join, vocabularies, splits, parquet) and
              loads the splits into tensors: seconds and peak RSS of each step;
  pass        the default experiment's model, optimizers and local schedule, FedAvg,
              EpochSelector, --clients-per-round clients a round for ceil(train clients /
              clients per round) rounds, the vectorized trainer, no evaluation during the pass:
              training seconds (rounds only), client updates and samples per second; then one
              evaluation: test AUC of the final model beside the popularity baseline's;
  sequential  the pass order's first --sequential-clients clients again, from the initial
              model, with the sequential trainer (federated.vectorize false): updates and
              samples per second, and the pass's rate on the same rounds over it.
Peak RSS (VmHWM) of each data step and of the whole run.

Usage: python benchmarks/full_pass.py [--rows 26000000] [--clients-per-round 1000]
           [--sequential-clients 50000] [--vectorize true] [--dir /tmp/fltk-bench-full-pass]
Prints progress, then the figures and JSON on the last line.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from figures import print_figures
from rss import peak_rss_mb, reset_peak_rss_mb

from fltoolkit.loop import FederatedLoop, LoopHooks, frozen_heap
from fltoolkit.run.fit import override_args
from fltoolkit.run.parser import FltkCLI


class _Steps:
    """Seconds and peak RSS of each step (VmHWM is reset as a step starts), and the peak RSS
    of the whole run (the largest mark, read before each reset)."""

    def __init__(self) -> None:
        self.figures: dict[str, float] = {}
        self.run_peak_mb = peak_rss_mb()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.run_peak_mb = max(self.run_peak_mb, peak_rss_mb())
        reset_peak_rss_mb()
        started = time.perf_counter()
        yield
        seconds, peak = time.perf_counter() - started, peak_rss_mb()
        self.figures.update({f"{name}_s": round(seconds, 1), f"{name}_peak_rss_mb": round(peak)})
        print(f"{name}: {seconds:.1f} s, peak RSS {peak:,.0f} MB", flush=True)

    def whole_run_peak_mb(self) -> float:
        return max(self.run_peak_mb, peak_rss_mb())


class _Rounds:
    """The loop's on_round hook: the clients trained and the seconds since `start()` at the end
    of each round, with a progress line every `every` rounds and after the last."""

    def __init__(self, label: str, rounds: int, every: int) -> None:
        self.label, self.rounds, self.every = label, rounds, every
        self.updates: list[int] = []  # clients trained by the end of each round
        self.elapsed: list[float] = []  # seconds since start() at the end of each round
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, row: dict[str, Any]) -> None:
        self.updates.append((self.updates[-1] if self.updates else 0) + row["clients"])
        self.elapsed.append(time.perf_counter() - self.started)
        done = len(self.updates)
        if done % self.every == 0 or done == self.rounds:
            print(f"{self.label}: round {done}/{self.rounds}, {self.updates[-1]:,} updates, "
                  f"{self.rate(done):,.0f} updates/s, {self.elapsed[-1]:,.0f} s", flush=True)

    def rate(self, rounds: int) -> float:
        """Client updates per second over the first `rounds` rounds."""
        return self.updates[rounds - 1] / self.elapsed[rounds - 1]


def _experiment(args: argparse.Namespace, cache: Path, vectorize: str) -> Any:
    """The default experiment, parsed as `fltk fit` parses it, with this benchmark's data,
    cohort size, FedAvg, EpochSelector and trainer."""
    sections = {
        "data": {"init_args": {"num_rows": args.rows, "cache_dir": str(cache)}},
        "federated": {"clients_per_round": args.clients_per_round, "vectorize": vectorize,
                      "strategy": {"class_path": "fltoolkit.strategies.FedAvg"},
                      "selector": {"class_path": "fltoolkit.selection.EpochSelector"}},
    }
    return FltkCLI(["--experiment", "taobao", *override_args(sections)])


def _loop(cli: Any, data: Any, rounds: int, on_round: _Rounds) -> Any:
    """A FederatedLoop of `rounds` rounds that evaluates only after the last one."""
    cli.model.configure_features(data.features)
    config = replace(cli.config_init["federated"], rounds=rounds, eval_interval=rounds,
                     checkpoint_interval=rounds)
    return FederatedLoop(cli.model, data, config, seed=cli.config.seed,
                         eval_batch_size=cli.datamodule.eval_batch_size,
                         hooks=LoopHooks(on_round=on_round))


def _rounded(auc: float | None) -> float | None:
    return None if auc is None else round(auc, 4)


def _samples(loop: Any) -> int:
    """Rows trained so far: each trained client's rows, once per local epoch and round."""
    sizes = loop.data.train.client_sizes().numpy()
    return int((loop.participation * sizes).sum()) * loop.config.local_epochs


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The data steps, the pass and the sequential slice; the figures."""
    cache = args.dir / f"rows{args.rows}"
    shutil.rmtree(cache, ignore_errors=True)  # so that the data is generated and prepared anew
    steps = _Steps()
    cli = _experiment(args, cache, args.vectorize)
    dm = cli.datamodule
    with steps.step("generate"):
        dm.source_dir()
    with steps.step("preprocess"):
        dm.prepare_data()
    with steps.step("load"):
        dm.setup("fit")
    data, train = dm.data, dm.data.train
    rounds = math.ceil(train.num_clients / args.clients_per_round)
    print(f"{train.num_rows:,} training rows, {train.num_clients:,} clients: {rounds} rounds "
          f"of {args.clients_per_round}", flush=True)

    progress = _Rounds("pass", rounds, args.progress_every)
    loop = _loop(cli, data, rounds, progress)
    with steps.step("pass"):
        progress.start()
        final = loop.run()  # the rounds, then one evaluation (validation and test day)
        train_s = progress.elapsed[-1]
        evaluate_s = time.perf_counter() - progress.started - train_s
    figures = {
        "rows": args.rows, "train_rows": train.num_rows, "train_clients": train.num_clients,
        "clients_per_round": args.clients_per_round, "rounds": rounds,
        "vectorize": args.vectorize, **steps.figures,  # generate, preprocess, load, pass
        "train_s": round(train_s, 1),
        "evaluate_s": round(evaluate_s, 1),
        "updates_per_s": round(progress.updates[-1] / train_s, 1),
        "samples_per_s": round(_samples(loop) / train_s),
        "clients_trained_once": int((loop.participation == 1).sum()),
        "auc": round(final["auc"], 4),
        "validation_auc": round(final["validation"]["auc"], 4),
        "baseline_auc": _rounded(data.info.get("baseline_auc")),  # the popularity baseline
        "oracle_auc": _rounded(data.info.get("oracle_auc")),
    }
    if args.sequential_clients:
        with steps.step("sequential"):
            figures.update(_sequential(args, cache, data, progress))
        figures.update(sequential_peak_rss_mb=steps.figures["sequential_peak_rss_mb"])
    figures["peak_rss_mb"] = round(steps.whole_run_peak_mb())
    if not args.keep:
        shutil.rmtree(cache, ignore_errors=True)
    return figures


def _sequential(args: argparse.Namespace, cache: Path, data: Any, vectorized: _Rounds
                ) -> dict[str, Any]:
    """The pass's first rounds again, one client after another, from the initial model."""
    rounds = min(math.ceil(args.sequential_clients / args.clients_per_round), vectorized.rounds)
    progress = _Rounds("sequential", rounds, args.progress_every)
    loop = _loop(_experiment(args, cache, "false"), data, rounds, progress)
    progress.start()
    with frozen_heap():  # as FederatedLoop.run does
        for round_index in range(1, rounds + 1):
            loop.run_round(round_index)
    seconds, updates = progress.elapsed[-1], progress.updates[-1]
    return {
        "sequential_clients": updates,
        "sequential_updates_per_s": round(updates / seconds, 1),
        "sequential_samples_per_s": round(_samples(loop) / seconds),
        # the pass's rate over the same rounds (the same clients), over the sequential one
        "vectorized_over_sequential": round(vectorized.rate(rounds) / progress.rate(rounds), 2),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=26_000_000)
    parser.add_argument("--clients-per-round", type=int, default=1000)
    parser.add_argument("--sequential-clients", type=int, default=50_000,
                        help="clients of the sequential slice (0: none)")
    parser.add_argument("--vectorize", choices=["true", "false", "auto"], default="true",
                        help="federated.vectorize of the pass")
    parser.add_argument("--progress-every", type=int, default=50, help="rounds between lines")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fltk-bench-full-pass"),
                        help="the data cache, made anew (removed after the run unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    for noisy in ("lightning.pytorch", "torch.fx._symbolic_trace"):  # as `fltk fit` does
        logging.getLogger(noisy).setLevel(logging.ERROR)
    figures = run(args)
    command = (f"python benchmarks/full_pass.py --rows {args.rows} --clients-per-round "
               f"{args.clients_per_round} --sequential-clients {args.sequential_clients} "
               f"--vectorize {args.vectorize}")
    print_figures("full_pass", figures, command)
    return figures


if __name__ == "__main__":
    main()
