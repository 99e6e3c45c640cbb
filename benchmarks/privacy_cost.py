"""What client-level DP and secure aggregation add to a round, measured in one run.

DP draws Gaussian noise over every row of every shared table each round (noise on touched
rows only would reveal them), so its cost grows with the tables, not with the cohort:
measured with 10k-row and 1M-row tables (15 tables of width 16, as the default model with
every table widened), 100 clients per round. Secure aggregation masks one vector per client
over the round's union of rows with a mask per pair of clients: measured at the default 20
clients per round. One thread, as `fltk fit` runs by default.

Usage: python benchmarks/privacy_cost.py [--rows 200000] [--repeats 3]
Prints the figures and JSON on the last line.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from figures import print_figures
from round_overhead import _setup, _StepTimes, _time_round

from fltoolkit.loop import frozen_heap
from fltoolkit.privacy.config import PrivacyConfig

warnings.filterwarnings("ignore")

SETTINGS = {
    "plain": None,
    "dp": PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0),
    "dp_secure_aggregation": PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0,
                                           secure_aggregation=True),
}


def _rounds(rows: int, table_rows: int, clients: int, privacy: PrivacyConfig | None,
            repeats: int) -> dict[str, float]:
    """Median round milliseconds and the mean milliseconds of each of its steps."""
    _, _, loop = _setup(rows, table_rows, clients, vectorize=True, privacy=privacy)
    with frozen_heap():
        _time_round(loop, 1)  # warm-up
        steps = _StepTimes(loop)
        times = [_time_round(loop, r) for r in range(2, repeats + 2)]
    return {"round_ms": round(1000 * statistics.median(times), 1),
            **{f"{name}_ms": ms for name, ms in steps.per_round_ms(repeats).items()}}


def _noise_draw_ms(table_rows: int, tables: int = 15, width: int = 16) -> float:
    """One Gaussian draw over every row of the shared tables: DP's floor per round."""
    started = time.perf_counter()
    for _ in range(tables):
        torch.randn(table_rows, width)
    return round(1000 * (time.perf_counter() - started), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures: dict[str, object] = {}
    for table_rows in (10_000, 1_000_000):
        label = "10k" if table_rows == 10_000 else "1m"
        for name in ("plain", "dp"):
            figures[f"{name}_100_clients_{label}_tables"] = _rounds(
                args.rows, table_rows, 100, SETTINGS[name], args.repeats)
        figures[f"noise_draw_ms_{label}_tables"] = _noise_draw_ms(table_rows)
        plain = figures[f"plain_100_clients_{label}_tables"]["round_ms"]
        figures[f"dp_over_plain_round_{label}_tables"] = round(
            figures[f"dp_100_clients_{label}_tables"]["round_ms"] / plain, 2)
    for name in SETTINGS:
        figures[f"{name}_20_clients_10k_tables"] = _rounds(args.rows, 10_000, 20,
                                                           SETTINGS[name], args.repeats)
    plain = figures["plain_20_clients_10k_tables"]["round_ms"]
    figures["secure_aggregation_over_plain_round_20_clients"] = round(
        figures["dp_secure_aggregation_20_clients_10k_tables"]["round_ms"] / plain, 2)
    print_figures("privacy_cost", figures, f"python benchmarks/privacy_cost.py --rows {args.rows}"
                  f" --repeats {args.repeats}")


if __name__ == "__main__":
    main()
