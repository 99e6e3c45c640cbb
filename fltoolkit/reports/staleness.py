"""The `staleness_counts` cell of an async run's rounds.csv: how many of an aggregation's
buffered updates had each staleness, as "staleness:count" pairs joined by ";" in increasing
staleness ("0:5;1:3;4:1").

One compact cell per aggregation, rather than a file of every update, because the count by
value is all a distribution needs: summed over the rows it is the histogram of the run's
staleness, which `mean_staleness` and `max_staleness` cannot give (a buffer of 0s and 4s has
the mean of one of 2s). The loop writes it (fltoolkit/asynchronous/rounds.py) and reports
read it; it lives here, beside the readers, so `fltk report` need not import torch.
"""

from __future__ import annotations

from collections import Counter


def staleness_counts(staleness: list[int]) -> str:
    """The cell for updates of these staleness values."""
    return ";".join(f"{value}:{count}" for value, count in sorted(Counter(staleness).items()))


def parse_staleness_counts(cell: str) -> dict[int, int]:
    """A cell as {staleness: updates}; {} for an empty one."""
    pairs = (pair.split(":") for pair in cell.split(";") if pair)
    return {int(value): int(count) for value, count in pairs}
