"""A round's cohort planned once: each client's local batches and the compact layout of the
rows they touch, and the bytes each client moves.

The plan is made before anyone trains, so the simulated clock (fltoolkit.systems) charges
exactly the bytes and samples that training then uses: both read the same `Cohort`. Uploads
are priced by the strategy, whose protocol may send other than each client's own update
(secure aggregation: one masked vector over the cohort's rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from datamodules.clients import ClientTable
from fltoolkit.training.updates import (
    ID_BYTES,
    PlannedUploads,
    plain_upload_bytes,
    segment_owners,
)
from recsys.parts import TablePart

if TYPE_CHECKING:
    from fltoolkit.embeddings.row_map import RowMap


@dataclass(frozen=True)
class LocalSchedule:
    """How much a client trains per round.

    Attributes:
        batch_size: rows per local mini-batch (a client with fewer rows uses all of them).
        local_steps: mini-batches per round, cycling over the client's shuffled rows.
        local_epochs: if set, passes over the client's rows instead of `local_steps`.
    """

    batch_size: int = 32
    local_steps: int = 1
    local_epochs: int | None = None

    def order(self, num_rows: int, generator: torch.Generator) -> tuple[Tensor, list[int]]:
        """Row positions (within the client) in training order, and the sizes of the local
        mini-batches they make, one after another."""
        if self.local_epochs:
            order = torch.cat([torch.randperm(num_rows, generator=generator)
                               for _ in range(self.local_epochs)])
            full, rest = divmod(num_rows, self.batch_size)
            return order, ([self.batch_size] * full + [rest] * bool(rest)) * self.local_epochs
        size = min(self.batch_size, num_rows)
        needed = self.local_steps * size
        order = torch.randperm(num_rows, generator=generator)
        return order.repeat(math.ceil(needed / num_rows))[:needed], [size] * self.local_steps

    def batches(self, num_rows: int, generator: torch.Generator) -> list[Tensor]:
        """Row positions (within the client) of each local mini-batch."""
        order, sizes = self.order(num_rows, generator)
        return list(order.split(sizes))


@dataclass(frozen=True)
class Cohort:
    """A round's clients laid out for training. R: rows of all local batches, C: clients.

    Attributes:
        clients: the clients, in training order.
        num_samples: per client, its training rows (its FedAvg weight).
        samples_trained: per client, the rows of all its local batches (epochs x rows).
        download_bytes: [C] per client, the bytes it downloads to train: the dense weights
            and its touched rows of every uploaded table, with their ids.
        upload_bytes: [C] per client, the bytes it uploads under the strategy's protocol: its
            own update (as many bytes as it downloads) unless the strategy prices it otherwise
            (`Strategy.planned_upload_bytes`).
        dense, label: [R, D] and [R] the rows of every local batch, client after client.
        sparse: [R, F] their ids, remapped to positions in the compact buffers.
        steps: per client, the slices of those rows that make its local batches.
        row_ids: table -> [U] global row id of each compact buffer row.
        segments: table -> C + 1 bounds; client c owns compact rows segments[c]:segments[c + 1].
        columns: table -> the columns of `sparse` that feed it.
        logical_ids: for tables under a budget (fltoolkit.embeddings), whose `row_ids` are
            physical rows: table -> the logical ids each client touched, client after client
            (what its rows stand for: the importance's evidence).
        logical_segments: table -> C + 1 bounds of each client's part of `logical_ids`.
    """

    clients: list[int]
    num_samples: list[int]
    samples_trained: list[int]
    download_bytes: np.ndarray
    upload_bytes: np.ndarray
    dense: Tensor
    sparse: Tensor
    label: Tensor
    steps: list[list[slice]]
    row_ids: dict[str, Tensor]
    segments: dict[str, list[int]]
    columns: dict[str, list[int]]
    logical_ids: dict[str, Tensor] = field(default_factory=dict)
    logical_segments: dict[str, list[int]] = field(default_factory=dict)

    def rows(self, table: str, slot: int) -> slice:
        bounds = self.segments[table]
        return slice(bounds[slot], bounds[slot + 1])

    def row_owners(self, table: str) -> Tensor:
        """[U] the slot of the client whose segment holds each row of the table's buffer."""
        return segment_owners(self.segments[table], self.sparse.device)

    def logical_rows(self, table: str, slots: Sequence[int]) -> Tensor:
        """The logical ids of `table` the clients at `slots` touched, one entry per client
        and id (a budgeted table)."""
        ids, bounds = self.logical_ids[table], self.logical_segments[table]
        kept = [ids[bounds[s]:bounds[s + 1]] for s in slots]
        return torch.cat(kept) if kept else ids[:0]

    def to(self, device: torch.device) -> Cohort:
        """This cohort with its tensors on `device` (one transfer per round)."""
        if self.sparse.device == device:
            return self
        return replace(self, dense=self.dense.to(device), sparse=self.sparse.to(device),
                       label=self.label.to(device),
                       row_ids={name: ids.to(device) for name, ids in self.row_ids.items()})

    def subset(self, slots: Sequence[int]) -> Cohort:
        """The plan of the clients at `slots` only, exactly as planning them alone gives it
        (a client's rows and batches do not depend on who else is in the cohort), except for
        `upload_bytes`, which keep the whole plan's: a protocol over the cohort (secure
        aggregation) prices each client's upload for the cohort as planned."""
        slots = list(slots)
        if slots == list(range(len(self.clients))):
            return self
        starts = [0, *accumulate(self.samples_trained)]
        positions = [torch.arange(starts[s], starts[s + 1]) for s in slots]
        order = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
        counts = torch.tensor([self.samples_trained[s] for s in slots], dtype=torch.int64)
        new_starts = [0, *accumulate(self.samples_trained[s] for s in slots)]
        steps = [[slice(step.start - starts[s] + begin, step.stop - starts[s] + begin)
                  for step in self.steps[s]] for s, begin in zip(slots, new_starts, strict=False)]
        sparse = self.sparse[order]  # a copy: indexing gathers
        row_ids, segments = {}, {}
        for name, columns in self.columns.items():
            bounds = self.segments[name]
            sizes = [bounds[s + 1] - bounds[s] for s in slots]
            segments[name] = [0, *accumulate(sizes)]
            kept = [self.row_ids[name][bounds[s]:bounds[s + 1]] for s in slots]
            row_ids[name] = torch.cat(kept) if kept else self.row_ids[name][:0]
            shift = torch.tensor([bounds[s] - segments[name][i] for i, s in enumerate(slots)],
                                 dtype=torch.int64)
            sparse[:, columns] -= torch.repeat_interleave(shift, counts)[:, None]
        logical_segments = {
            name: [0, *accumulate(bounds[s + 1] - bounds[s] for s in slots)]
            for name, bounds in self.logical_segments.items()}
        return Cohort([self.clients[s] for s in slots], [self.num_samples[s] for s in slots],
                      [self.samples_trained[s] for s in slots], self.download_bytes[slots],
                      self.upload_bytes[slots],
                      self.dense[order], sparse, self.label[order], steps, row_ids, segments,
                      self.columns,
                      {name: self.logical_rows(name, slots) for name in self.logical_ids},
                      logical_segments)


class CohortPlanner:
    """Plans cohorts of one training table for one model.

    Args:
        data: the training ClientTable.
        tables: the model's embedding tables (recsys.parts).
        schedule: local batch size and steps.
        uploaded: the tables whose rows travel between client and server (local ones do not).
        dense: the dense weights, which every client downloads and uploads.
        seed: the run's seed; a client's batch order derives from (seed, round, client).
        uploads: each client's upload bytes, from the cohort's plain ones and rows (the
            strategy's `planned_upload_bytes`); by default its own update's.
        row_maps: tables under a budget (fltoolkit.embeddings): the data's logical ids become
            physical rows before the compact layout; other tables index by their ids.
    """

    def __init__(self, data: ClientTable, tables: dict[str, TablePart], schedule: LocalSchedule,
                 uploaded: list[str], dense: Sequence[Tensor], seed: int,
                 uploads: Callable[[PlannedUploads], np.ndarray] = plain_upload_bytes,
                 row_maps: dict[str, RowMap] | None = None) -> None:
        self.data, self.tables, self.schedule = data, tables, schedule
        self.row_maps = row_maps or {}
        self.uploaded, self.seed, self.uploads = uploaded, seed, uploads
        self.dense_size = sum(p.numel() for p in dense)
        self.dense_bytes = sum(p.numel() * p.element_size() for p in dense)
        self.widths = {name: tables[name].weight.shape[1] for name in uploaded}

    def plan_round(self, round_index: int, clients: Sequence[int]) -> Cohort:
        """The cohort of `clients` in round `round_index`."""
        return self.plan(clients, [client_seed(self.seed, round_index, c) for c in clients])

    def plan(self, clients: Sequence[int], seeds: Sequence[int]) -> Cohort:
        """Each client's local batches (from its seed) and the compact layout of its rows.

        One `torch.unique` per table over (client slot, row id) keys gives, sorted by slot,
        every client's distinct rows and, through the inverse, the remapped ids of its batches.
        """
        positions, steps, counts, num_samples, offset = [], [], [], [], 0
        generator = torch.Generator()
        for client, seed in zip(clients, seeds, strict=True):
            rows = self.data.client_rows(client)
            num_samples.append(rows.stop - rows.start)
            order, sizes = self.schedule.order(rows.stop - rows.start,
                                               generator.manual_seed(seed))
            positions.append(rows.start + order)
            bounds = [offset, *(offset + total for total in accumulate(sizes))]
            steps.append([slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)])
            counts.append(len(order))
            offset += counts[-1]
        order = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
        slot = torch.repeat_interleave(torch.arange(len(clients)), torch.tensor(counts,
                                                                              dtype=torch.int64))
        ids = self.data.sparse[order]
        remapped = ids.clone()  # columns that feed no table keep their ids
        row_ids, segments, logical_ids, logical_segments = {}, {}, {}, {}
        for name, part in self.tables.items():
            row_map = self.row_maps.get(name)
            vocab = part.num_rows if row_map is None else row_map.num_ids
            keys = slot[:, None] * vocab + ids[:, part.columns]
            unique, inverse = torch.unique(keys, return_inverse=True)
            if row_map is not None:  # (slot, logical id) -> (slot, physical row)
                logical_ids[name] = unique % vocab
                logical_segments[name] = _client_bounds(unique, len(clients), vocab)
                physical = (unique // vocab) * row_map.physical_rows + row_map.lookup(
                    unique % vocab)
                vocab = row_map.physical_rows
                unique, to_physical = torch.unique(physical, return_inverse=True)
                inverse = to_physical[inverse]
            remapped[:, part.columns] = inverse
            row_ids[name] = unique % vocab
            segments[name] = _client_bounds(unique, len(clients), vocab)
        own = self._own_bytes(len(clients), segments)
        uploads = self.uploads(PlannedUploads(own, self.dense_size,
                                              {name: row_ids[name] for name in self.uploaded},
                                              self.widths))
        return Cohort(list(clients), num_samples, counts, own, uploads,
                      self.data.dense[order], remapped, self.data.label[order], steps, row_ids,
                      segments, {name: part.columns for name, part in self.tables.items()},
                      logical_ids, logical_segments)

    def _own_bytes(self, num_clients: int, segments: dict[str, list[int]]) -> np.ndarray:
        """Dense weights plus, per uploaded table, the client's rows with their ids."""
        moved = np.full(num_clients, self.dense_bytes, dtype=np.int64)
        for name in self.uploaded:
            weight = self.tables[name].weight
            row_bytes = ID_BYTES + weight.shape[1] * weight.element_size()
            moved += np.diff(segments[name]) * row_bytes
        return moved


def client_seed(seed: int, round_index: int, client: int) -> int:
    """A client's batch-order seed: independent of the order in which clients train."""
    return int(np.random.SeedSequence([seed, round_index, client]).generate_state(1)[0])


def _client_bounds(keys: Tensor, num_clients: int, vocab: int) -> list[int]:
    """The C + 1 bounds of each client's part of sorted `keys` (slot * vocab + id)."""
    return torch.searchsorted(keys, torch.arange(num_clients + 1) * vocab).tolist()
