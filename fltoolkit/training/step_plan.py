"""StepPlan: in what order and groups a cohort's clients take their local steps together.

The vectorized trainer (vectorized.py) runs step k of many clients as one computation. This
module decides which clients share each computation, from the cohort's batches alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fltoolkit.training.cohort import Cohort

MIN_PADDING_SAVED = 128  # padded rows a further bucket must save: 128 ran 20- and 200-client
# rounds fastest on one thread among 32 to 512 (256: 13% slower at 20 clients; none: 50% at 200)


@dataclass(frozen=True)
class Bucket:
    """Clients that compute one local step together. n: clients, W: the widest batch.

    Attributes:
        clients: their positions (see StepPlan), a contiguous range.
        rows: [n, W] the cohort rows of their batches, padded with row 0.
        mask: [n, W] which of those rows are real.
    """

    clients: slice
    rows: Tensor
    mask: Tensor


class StepPlan:
    """The order in which a cohort's clients step together.

    Clients are placed by decreasing number of local steps (then decreasing rows), so the
    clients that have a k-th step are always the first positions of their chunk and their
    weights a slice of the stacked ones, not a copy. Clients differ in size by orders of
    magnitude, so a step computes for its clients only and a client whose steps are over
    stays exactly as it is. Chunks of `chunk_clients` positions take all their steps one
    chunk after another (the memory of a step follows its clients). A step's clients split
    into buckets of similar batch widths when padding all of them to the widest would waste
    more than `min_padding_saved` rows of compute.

    Attributes:
        clients: C.
        order: [C] the slot at each position; position: [C] the position of each slot.
        step_counts: [C] local steps of the client at each position (float64).
        steps: per chunk and local step k, the buckets of the clients that have a k-th step.
    """

    def __init__(self, cohort: Cohort, chunk_clients: int,
                 min_padding_saved: int = MIN_PADDING_SAVED,
                 device: torch.device | str = "cpu") -> None:
        counts = np.array([len(steps) for steps in cohort.steps], dtype=np.int64)
        order = np.lexsort((-np.asarray(cohort.samples_trained), -counts))
        self.clients = len(order)
        self.order = torch.from_numpy(order).to(device)
        self.position = torch.from_numpy(np.argsort(order)).to(device)
        counts = counts[order]
        self.step_counts = torch.from_numpy(counts).to(device, torch.float64)
        batches = [cohort.steps[slot] for slot in order.tolist()]
        starts = np.fromiter((b.start for steps in batches for b in steps), dtype=np.int64)
        widths = np.fromiter((b.stop - b.start for steps in batches for b in steps),
                             dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.steps: list[list[Bucket]] = []
        for lo in range(0, self.clients, chunk_clients):
            hi = min(lo + chunk_clients, self.clients)
            for k in range(int(counts[lo])):
                stop = lo + int((counts[lo:hi] > k).sum())
                entries = first[lo:stop] + k
                self.steps.append(_buckets(starts[entries], widths[entries], lo,
                                           min_padding_saved, device))


def _buckets(starts: np.ndarray, widths: np.ndarray, first: int, min_saved: int,
             device: torch.device | str) -> list[Bucket]:
    """Contiguous ranges of the step's clients (at positions `first`, ...), each padded to
    its own widest batch: a range ends where the widest batch of all later clients is at
    most half as wide, if that saves at least `min_saved` padded rows."""
    widest_after = np.maximum.accumulate(widths[::-1])[::-1]  # non-increasing
    bounds = [0]
    while True:
        cap = widest_after[bounds[-1]]
        cut = int(np.searchsorted(-widest_after, -(cap // 2)))
        if cut >= len(widths) or (len(widths) - cut) * (cap - widest_after[cut]) < min_saved:
            break
        bounds.append(cut)
    bounds.append(len(widths))
    buckets = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        offsets = torch.arange(int(widest_after[lo]), device=device)
        mask = offsets < torch.from_numpy(widths[lo:hi]).to(device)[:, None]
        rows = torch.where(mask, torch.from_numpy(starts[lo:hi]).to(device)[:, None] + offsets,
                           0)
        buckets.append(Bucket(slice(first + lo, first + hi), rows, mask))
    return buckets
