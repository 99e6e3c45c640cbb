"""Ranks: a round's cohort split across torch.distributed processes (torchrun), or one process.

Every rank holds the same replicated model and runs the same selection, aggregation and
evaluation code on the same inputs, so their states never diverge; only local training and
the scoring of test rows are split. Client c always trains on rank c % world_size, so its
client-local table rows and kept optimizer state stay on the rank that uses them.

Exchanges are exact: a rank writes its own slots of a zero-filled buffer and an all_reduce
sums the buffers (x + 0 == x), so the dense deltas and the test logits every rank sees are
bit-for-bit what one process computes. Sparse row deltas, whose sizes differ per client, are
all-gathered as objects.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fltoolkit.training.updates import ClientUpdate, SparseRows


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank among the processes of this machine

    @classmethod
    def from_environment(cls) -> Ranks:
        """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK,
        MASTER_ADDR, ...): gloo on CPU, nccl when CUDA is available. One process otherwise."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory and logs progress."""
        return self.rank == 0

    @property
    def prepares_data(self) -> bool:
        """One process per machine builds the data cache (each machine has its own disk)."""
        return self.local_rank == 0

    def owns(self, client: int) -> bool:
        return client % self.world_size == self.rank

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value, on every rank (a small picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Every rank starts from rank 0's weights, whatever its own initialization gave."""
        if self.distributed:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def gather_on_main(self, value: Any) -> list[Any] | None:
        """Every rank's value, in rank order, on rank 0 only (None on the others): for what
        only rank 0 writes."""
        if not self.distributed:
            return [value]
        values: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (e.g. a stop request seen by one rank only)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def pooled(self, values: Tensor, rows: Tensor, total: int) -> Tensor:
        """[total, ...] tensor holding every rank's `values` at its `rows` (the rows partition
        0..total-1 across the ranks)."""
        if not self.distributed:
            return values
        full = torch.zeros(total, *values.shape[1:], dtype=values.dtype)
        full[rows] = values
        dist.all_reduce(full)
        return full

    def cohort_updates(self, clients: Sequence[int], mine: list[ClientUpdate],
                       dense_size: int) -> list[ClientUpdate]:
        """The updates of every client of the round, in `clients` order, on every rank."""
        if not self.distributed:
            return mine
        slot = {client: index for index, client in enumerate(clients)}
        own = torch.stack([u.dense for u in mine]) if mine else torch.zeros(0, dense_size)
        dense = self.pooled(own, torch.tensor([slot[u.client] for u in mine], dtype=torch.int64),
                            len(clients))
        everyone = [update for packed in self.gather(_pack(mine)) for update in _unpack(*packed)]
        everyone.sort(key=lambda update: slot[update.client])
        return [replace(update, dense=dense[slot[update.client]]) for update in everyone]

    def close(self) -> None:
        """Leave the process group once every rank is done with it. Objects still holding
        it (TorchRec's sharded modules sit in reference cycles) are collected first: left to
        interpreter exit, their gloo threads were torn down after the group and a loaded
        machine aborted the process now and then ("terminate called without an active
        exception")."""
        if self.distributed and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()



Packed = tuple[list[ClientUpdate], dict[str, tuple[Tensor, Tensor, list[int]]]]


def _pack(updates: list[ClientUpdate]) -> Packed:
    """The updates as (metadata without tensors, per table: all ids, all values, each client's
    row count or -1 where the table is absent). Pickling a few large tensors is a copy;
    pickling 100 clients x 15 tables of small ones took ~2 s a round, and a pickled view
    carries its whole storage (here: every client's rows of the round)."""
    meta = [replace(update, dense=torch.empty(0), tables={}) for update in updates]
    packed = {}
    for name in sorted({name for update in updates for name in update.tables}):
        parts = [update.tables.get(name) for update in updates]
        present = [rows for rows in parts if rows is not None]
        packed[name] = (torch.cat([rows.ids for rows in present]),
                        torch.cat([rows.values for rows in present]),
                        [-1 if rows is None else rows.ids.numel() for rows in parts])
    return meta, packed


def _unpack(meta: list[ClientUpdate], packed: dict[str, tuple[Tensor, Tensor, list[int]]]
            ) -> list[ClientUpdate]:
    """`_pack`'s updates again, each table's rows as views of the received tensors."""
    tables: list[dict[str, SparseRows]] = [{} for _ in meta]
    for name, (ids, values, counts) in packed.items():
        offset = 0
        for index, count in enumerate(counts):
            if count >= 0:
                tables[index][name] = SparseRows(ids[offset:offset + count],
                                                 values[offset:offset + count])
                offset += count
    return [replace(update, tables=rows) for update, rows in zip(meta, tables, strict=True)]
