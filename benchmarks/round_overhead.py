"""Cost of the federated machinery around local training, measured in one run.

  (a) one FL round of 100 clients / the same optimizer steps on the same mini-batches, trained
      one after another on one model with no FL machinery (target <= 1.2);
  (b) the round / centralized training on the same rows concatenated, same batch size (fewer,
      fuller batches, so above 1 by nature; for information);
  (c) per-client time with 1M-row tables / with 10k-row tables (target <= 1.2);
  (d) peak RSS growth during a round of 1000 clients with 1M-row tables (the updates only);
  (e) client updates per second of the vectorized trainer / the sequential one at 20 and 200
      clients per round, whole rounds (targets 4x and 8x), and the milliseconds of each step
      of a vectorized round; then the vectorized trainer on all cores (`--num_threads`)
      against the sequential one on one.
Everything else runs on one thread, as `fltk fit` does by default.

Usage: python benchmarks/round_overhead.py [--rows 200000] [--repeats 5]
Prints the figures and JSON on the last line.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from figures import print_figures
from rss import peak_rss_mb, reset_peak_rss_mb

from fltoolkit.loop import frozen_heap

warnings.filterwarnings("ignore")


def _default_experiment() -> dict:
    path = Path(__file__).resolve().parents[1] / "experiments" / "taobao.yaml"
    return yaml.safe_load(path.read_text())


def _setup(rows: int, table_rows: int, clients_per_round: int, vectorize: bool = False,
           privacy=None):
    """The default experiment's model and local schedule, with every table >= table_rows
    (and `privacy`, a PrivacyConfig, if given)."""
    from datamodules.taobao import TaobaoDataModule
    from fltoolkit.loop import FederatedLoop
    from fltoolkit.run.config import FederatedConfig
    from recsys.module import CTRModule

    experiment = _default_experiment()
    model, federated = experiment["model"]["init_args"], experiment["federated"]
    dense_lr = model["dense_optimizer"]["init_args"]["lr"]
    sparse_lr = model["sparse_optimizer"]["init_args"]["lr"]
    dm = TaobaoDataModule(num_rows=rows, seed=0)
    dm.setup()
    spec = dm.feature_spec
    spec = replace(spec, cardinalities=[max(c, table_rows) for c in spec.cardinalities])
    torch.manual_seed(0)
    module = CTRModule(features=spec, dense_optimizer=lambda p: torch.optim.SGD(p, lr=dense_lr),
                       sparse_optimizer=lambda p: torch.optim.SGD(p, lr=sparse_lr))
    config = FederatedConfig(clients_per_round=clients_per_round, rounds=1,
                             batch_size=federated["batch_size"],
                             local_epochs=federated["local_epochs"], vectorize=vectorize)
    return dm, module, FederatedLoop(module, dm.data, config, seed=0, privacy=privacy)


class _StepTimes:
    """Wall seconds spent in each step of the loop's rounds, by wrapping the step callables
    (planning the cohort, local training, splitting and checking the deltas, the gate,
    aggregation); what is left of a round is bookkeeping."""

    def __init__(self, loop) -> None:
        import fltoolkit.loop as loop_module

        self.seconds: dict[str, float] = {}
        loop.planner.plan_round = self._timed("plan", loop.planner.plan_round)
        loop.trainer.train_round = self._timed("train", loop.trainer.train_round)
        loop.trainer._updates = self._timed("split_and_check", loop.trainer._updates)
        loop.gate.screen = self._timed("gate", loop.gate.screen)
        loop_module.aggregate_or_roll_back = self._timed(
            "aggregate", loop_module.aggregate_or_roll_back)

    def _timed(self, name: str, step):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        return timed

    def per_round_ms(self, rounds: int) -> dict[str, float]:
        """Milliseconds per round; local training without the split it contains."""
        ms = {name: 1000 * seconds / rounds for name, seconds in self.seconds.items()}
        ms["train"] -= ms.get("split_and_check", 0.0)
        return {name: round(value, 1) for name, value in sorted(ms.items())}


def _updates_per_second(rows: int, clients: int, vectorize: bool, repeats: int
                        ) -> tuple[float, dict[str, float]]:
    """Client updates per second of whole rounds (median round, after a warm-up one) and
    the mean milliseconds of each step of those rounds."""
    _, _, loop = _setup(rows, 10_000, clients, vectorize)
    with frozen_heap():  # as FederatedLoop.run does
        _time_round(loop, 1)
        steps = _StepTimes(loop)
        times = [_time_round(loop, round_index) for round_index in range(2, repeats + 2)]
    return clients / statistics.median(times), steps.per_round_ms(repeats)


def _time_round(loop, round_index: int) -> float:
    started = time.perf_counter()
    loop.run_round(round_index)
    return time.perf_counter() - started


def _round_batches(loop, round_index: int) -> list[torch.Tensor]:
    """The mini-batches (row indices) the round's clients train on, in order."""
    state = loop.selector.rng.bit_generator.state
    clients = loop.selector.select(round_index, loop.config.clients_per_round)
    loop.selector.rng.bit_generator.state = state  # the FL round will select the same clients
    from fltoolkit.training.cohort import client_seed

    batches = []
    schedule = loop.planner.schedule
    for client in clients.tolist():
        rows = loop.data.train.client_rows(client)
        generator = torch.Generator().manual_seed(client_seed(loop.seed, round_index, client))
        batches += [rows.start + b for b in schedule.batches(rows.stop - rows.start, generator)]
    return batches


def _time_plain(module, data, batches: list[torch.Tensor]) -> float:
    """The same optimizer steps on one model: no snapshot, no restore, no deltas."""
    optimizer = module.configure_optimizers()
    started = time.perf_counter()
    for step, index in enumerate(batches):
        optimizer.zero_grad()
        module.training_step(data.rows(index), step)["loss"].backward()
        optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    results = {}
    for table_rows in (10_000, 1_000_000):
        dm, module, loop = _setup(args.rows, table_rows, 100)
        fl, plain, central = [], [], []
        for repeat in range(args.repeats + 1):  # the first repeat warms up
            round_index = repeat + 1
            if repeat == 1:
                steps = _StepTimes(loop)
            batches = _round_batches(loop, round_index)
            fl_time = _time_round(loop, round_index)
            plain_time = _time_plain(module, dm.data.train, batches)
            rows = torch.cat(batches)
            central_batches = list(rows[torch.randperm(rows.numel())].split(
                loop.planner.schedule.batch_size))
            central_time = _time_plain(module, dm.data.train, central_batches)
            if repeat:
                fl.append(fl_time), plain.append(plain_time), central.append(central_time)
        results[table_rows] = {
            "round_s": statistics.median(fl), "plain_steps_s": statistics.median(plain),
            "centralized_s": statistics.median(central), "steps": len(batches),
            "step_ms": steps.per_round_ms(args.repeats),
        }
        del dm, module, loop

    small, large = results[10_000], results[1_000_000]
    speedups, vectorized_steps = {}, {}
    for clients in (20, 200):  # (e) on one thread, as `fltk fit` runs by default
        sequential, _ = _updates_per_second(args.rows, clients, False, args.repeats)
        together, vectorized_steps[clients] = _updates_per_second(args.rows, clients, True,
                                                                  args.repeats)
        torch.set_num_threads(threads)  # `--num_threads` = all cores, vectorized only
        all_cores, _ = _updates_per_second(args.rows, clients, True, args.repeats)
        torch.set_num_threads(1)
        speedups[clients] = (round(together / sequential, 2), round(together, 1),
                             round(sequential, 1), round(all_cores / sequential, 2))
    dm, module, loop = _setup(args.rows, 1_000_000, 1000)
    _time_round(loop, 1)  # lazily created optimizer state is not the round's growth
    before = reset_peak_rss_mb()
    _time_round(loop, 2)
    growth = peak_rss_mb() - before
    figures = {
        "a_round_over_same_steps": round(small["round_s"] / small["plain_steps_s"], 3),
        "a_round_over_same_steps_1m_tables": round(large["round_s"] / large["plain_steps_s"], 3),
        "b_round_over_centralized": round(small["round_s"] / small["centralized_s"], 3),
        "c_per_client_1m_over_10k_tables": round(large["round_s"] / small["round_s"], 3),
        "round_ms_10k_tables": round(small["round_s"] * 1000, 1),
        "round_ms_1m_tables": round(large["round_s"] * 1000, 1),
        "d_peak_rss_growth_mb_1000_clients_1m_tables": round(growth, 1),
        "round_step_ms_10k_tables": small["step_ms"],
        "e_vectorized_over_sequential_updates_per_s_20_clients": speedups[20][0],
        "e_vectorized_over_sequential_updates_per_s_200_clients": speedups[200][0],
        "vectorized_updates_per_s_20_200_clients": [speedups[20][1], speedups[200][1]],
        "sequential_updates_per_s_20_200_clients": [speedups[20][2], speedups[200][2]],
        "vectorized_round_step_ms_20_clients": vectorized_steps[20],
        "vectorized_round_step_ms_200_clients": vectorized_steps[200],
        "e_vectorized_all_cores_over_sequential_20_200_clients": [speedups[20][3],
                                                                  speedups[200][3]],
        "cores": threads,
        "clients_per_round": 100,
        "local_steps_per_round": small["steps"],
    }
    print_figures("round_overhead", figures, f"python benchmarks/round_overhead.py "
                  f"--rows {args.rows} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
