"""Embedding tables sharded across ranks with TorchRec's planner and DistributedModelParallel.

A federated server's tables (one per sparse feature) can outgrow one process, so each rank
holds only the shards the planner gives it. The collection is built on the meta device and
DMP materializes just the local shards (wrapping full tables would keep them alive).

Rows move by id with `all_to_all_single`, three calls per operation whatever the number of
tables (counts, ids, values): gloo supports that form with uneven splits, not the list form.
Every collective method must be called by every rank, in the same order, with the same table
names in the same order. The federated server writes its aggregated rows straight into this
rank's shard tensors (`owned`); nothing here runs DMP's forward or trains through it
(backward through DMP would apply TorchRec's default fused SGD).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.table_init import Target, fill_initial

SHARDINGS = ("table_wise", "column_wise")


@dataclass(frozen=True)
class Shard:
    """Rows [row, row + rows) x columns [column, column + columns) of `table`, held by `rank`."""

    table: str
    rank: int
    row: int
    rows: int
    column: int
    columns: int

    def hits(self, ids: Tensor) -> Tensor:
        """Positions in `ids` of the rows this shard holds."""
        return torch.nonzero((ids >= self.row) & (ids < self.row + self.rows)).squeeze(1)


@dataclass(frozen=True)
class _Route:
    """Who asked whom for what in one exchange: sent[dst, k] ids of shard k went to rank dst
    (positions[k] in the request), received[src, k] came from rank src (local rows `rows`)."""

    positions: list[Tensor]
    sent: Tensor
    received: Tensor
    rows: Tensor


@contextmanager
def _quiet_sharded_tensor() -> Iterator[None]:
    """ShardedTensor warns that it is deprecated on every state_dict; it is what DMP returns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _all_to_all(parts: list[Tensor], send_splits: list[int], receive_splits: list[int],
                dtype: torch.dtype) -> Tensor:
    """Send the flattened parts, send_splits[r] elements to rank r, and receive from each."""
    send = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.empty(0)
    received = torch.empty(sum(receive_splits), dtype=dtype)
    dist.all_to_all_single(received, send.to(dtype), output_split_sizes=receive_splits,
                           input_split_sizes=send_splits)
    return received


def _constraints(configs: list[EmbeddingBagConfig], sharding: str,
                 world_size: int) -> dict[str, ParameterConstraints]:
    """Force the sharding type and the fused kernel (the only one TW/CW take on CPU). For
    column_wise, TorchRec cuts the columns into blocks of the smallest multiple-of-4 divisor
    of the dim that is >= min_partition, so dim // world_size gives one block per rank when
    it can."""
    return {c.name: ParameterConstraints(
        sharding_types=[sharding], compute_kernels=[EmbeddingComputeKernel.FUSED.value],
        min_partition=max(c.embedding_dim // world_size, 1) if sharding == "column_wise" else None)
        for c in configs}


class ShardedTables:
    """Tables split across the ranks of the default process group (gloo on CPU)."""

    def __init__(self, collection: DistributedModelParallel, configs: list[EmbeddingBagConfig],
                 sharding: str, shards: list[Shard], local: dict[int, Tensor]) -> None:
        self._wrapped = collection  # DMP's module, which allocated the shards (kept with them)
        self.sharding = sharding
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._configs = {c.name: c for c in configs}
        self._shards = shards  # the same list, in the same order, on every rank
        self._local = local  # index in _shards -> this rank's tensor of that shard
        self._on_rank = [[k for k, s in enumerate(shards) if s.rank == r]
                         for r in range(self.world_size)]

    @classmethod
    def build(cls, source: EmbeddingBagCollection, sharding: str = "table_wise") -> ShardedTables:
        """Collective: plan and shard the tables of `source` (best built on the meta device,
        see recsys.table_init), each rank's shards starting from the values the unsharded
        tables start from."""
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
        configs = [replace(c) for c in source.embedding_bag_configs()]
        if any(c.data_type != DataType.FP32 for c in configs):
            raise ValueError("ShardedTables holds float32 tables only")
        if not dist.is_initialized():
            raise RuntimeError("ShardedTables needs an initialized process group (torchrun)")
        world_size = dist.get_world_size()
        collection = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        sharders = [EmbeddingBagCollectionSharder()]
        topology = TopologyFactory.create_topology(
            TrainerConfig(world_size=world_size,
                          local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size))),
            kernel_config=KernelConfig(compute_device="cpu"))
        # the default (heuristical) reservation guesses dense sizes from the unmaterialized
        # module and warns about it; there are no dense tensors here
        planner = EmbeddingShardingPlanner(
            topology=topology, constraints=_constraints(configs, sharding, world_size),
            storage_reservation=FixedPercentageStorageReservation(0.15))
        plan = planner.collective_plan(collection, sharders, dist.GroupMember.WORLD)
        # TorchRec fills each shard from the global generator, by a different amount on each
        # rank: keep the ranks' generators in step (the values are overwritten below anyway).
        with torch.random.fork_rng(devices=[]):
            wrapped = DistributedModelParallel(collection, device=torch.device("cpu"),
                                               plan=plan, sharders=sharders)
        shards, local = cls._find_shards(wrapped, configs)
        targets: dict[str, list[Target]] = {}
        for k, tensor in local.items():
            targets.setdefault(shards[k].table, []).append(
                Target(tensor, shards[k].row, shards[k].column))
        with torch.no_grad():
            fill_initial(source, targets)
        return cls(wrapped, configs, sharding, shards, local)

    @staticmethod
    def _find_shards(wrapped: DistributedModelParallel, configs: list[EmbeddingBagConfig]
                     ) -> tuple[list[Shard], dict[int, Tensor]]:
        """Every table's shard layout (from the ShardedTensor metadata, identical on every
        rank) and views of this rank's shards into the weights the forward uses."""
        with _quiet_sharded_tensor():
            state = wrapped.state_dict()
            shards: list[Shard] = []
            local: dict[int, Tensor] = {}
            for config in configs:
                weight = state[f"embedding_bags.{config.name}.weight"]
                mine = {tuple(s.metadata.shard_offsets): s.tensor for s in weight.local_shards()}
                for meta in weight.metadata().shards_metadata:
                    (row, column), (rows, columns) = meta.shard_offsets, meta.shard_sizes
                    if (row, column) in mine and meta.placement.rank() == dist.get_rank():
                        local[len(shards)] = mine[row, column]
                    shards.append(Shard(config.name, meta.placement.rank(), row, rows,
                                        column, columns))
        return shards, local

    @property
    def names(self) -> list[str]:
        return list(self._configs)

    def shape(self, name: str) -> tuple[int, int]:
        config = self._configs[name]
        return config.num_embeddings, config.embedding_dim

    def plan_summary(self) -> str:
        """Which rank holds which table (and columns), for a log line."""
        parts = []
        for name in self.names:
            shards = [s for s in self._shards if s.table == name]
            if len(shards) == 1:
                parts.append(f"{name}@{shards[0].rank}")
            else:
                rows = self._configs[name].num_embeddings
                parts.append(f"{name}[" + " ".join(
                    ("" if s.rows == rows else f"r{s.row}:{s.row + s.rows},")
                    + f"c{s.column}:{s.column + s.columns}@{s.rank}" for s in shards) + "]")
        return f"{self.sharding} over {self.world_size} ranks: " + ", ".join(parts)

    def owned(self) -> dict[str, tuple[int, Tensor]]:
        """This rank's shard of each table it holds part of: (first column, [rows, columns]
        tensor). Table- and column-wise shards span all rows; one shard per table per rank."""
        owned: dict[str, tuple[int, Tensor]] = {}
        for k, tensor in self._local.items():
            shard = self._shards[k]
            if shard.table in owned or shard.rows != self._configs[shard.table].num_embeddings:
                raise ValueError(f"table {shard.table!r} is split into row blocks or several "
                                 f"shards on rank {self.rank}: {self.plan_summary()}")
            owned[shard.table] = (shard.column, tensor)
        return owned

    def num_parameters(self) -> int:
        """Values in all the tables, whichever rank holds them."""
        return sum(rows * dim for rows, dim in map(self.shape, self.names))

    def _check(self, requests: dict[str, Tensor]) -> None:
        if list(requests) != self.names:
            raise ValueError(f"requests must name every table in order {self.names}, "
                             f"got {list(requests)}")
        for name, ids in requests.items():
            rows = self._configs[name].num_embeddings
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
                raise ValueError(f"ids of table {name!r} must lie in [0, {rows})")

    def _route(self, requests: dict[str, Tensor]) -> _Route:
        """Send every requested id to the owner of each shard it falls in (all_to_all)."""
        positions = [shard.hits(requests[shard.table]) for shard in self._shards]
        sent = torch.zeros(self.world_size, len(self._shards), dtype=torch.int64)
        for k, shard in enumerate(self._shards):
            sent[shard.rank, k] = positions[k].numel()
        width = [len(self._shards)] * self.world_size
        received = _all_to_all([sent], width, width, torch.int64).reshape(self.world_size, -1)
        ids = [requests[self._shards[k].table][positions[k]] - self._shards[k].row
               for dst in range(self.world_size) for k in self._on_rank[dst]]
        rows = _all_to_all(ids, sent.sum(1).tolist(), received.sum(1).tolist(), torch.int64)
        return _Route(positions, sent, received, rows)

    def _floats_per_rank(self, counts: Tensor) -> list[int]:
        """Values per rank of an exchange carrying counts[rank, k] rows of every shard k."""
        columns = torch.tensor([s.columns for s in self._shards])
        return (counts * columns).sum(1).tolist()

    def _received(self, route: _Route) -> Iterator[tuple[int, Tensor, slice]]:
        """(shard, local rows, slice of the exchanged values) of what each rank sent here,
        in the order it arrived."""
        row = value = 0
        for src in range(self.world_size):
            for k in self._on_rank[self.rank]:
                n = int(route.received[src, k])
                columns = self._shards[k].columns
                yield k, route.rows[row:row + n], slice(value, value + n * columns)
                row, value = row + n, value + n * columns

    @torch.no_grad()
    def fetch(self, requests: dict[str, Tensor]) -> dict[str, Tensor]:
        """Collective: the current rows [R, E] of each table at this rank's ids [R]."""
        self._check(requests)
        route = self._route(requests)
        answers = [self._local[k][rows] for k, rows, _ in self._received(route)]
        values = _all_to_all(answers, self._floats_per_rank(route.received),
                             self._floats_per_rank(route.sent), torch.float32)
        out = {name: torch.empty(ids.numel(), self._configs[name].embedding_dim)
               for name, ids in requests.items()}
        start = 0
        for dst in range(self.world_size):
            for k in self._on_rank[dst]:
                shard, hits = self._shards[k], route.positions[k]
                size = hits.numel() * shard.columns
                out[shard.table][hits, shard.column:shard.column + shard.columns] = (
                    values[start:start + size].view(-1, shard.columns))
                start += size
        return out

    def state_dict_local(self) -> dict[str, dict[str, Any]]:
        """This rank's shards (copies) and the layout they belong to, for a per-rank
        checkpoint file (plain tensors, ints and strings: loads with weights_only=True)."""
        return {name: {
            "shape": list(self.shape(name)), "sharding": self.sharding,
            "world_size": self.world_size, "rank": self.rank,
            "shards": [{"row": self._shards[k].row, "column": self._shards[k].column,
                        "values": tensor.detach().clone()}
                       for k, tensor in self._local.items() if self._shards[k].table == name]}
            for name in self.names}

    def _layout(self, name: str) -> dict[str, Any]:
        """What a state_dict_local entry must match to load here."""
        return {"shape": list(self.shape(name)), "sharding": self.sharding,
                "world_size": self.world_size, "rank": self.rank,
                "shards": [(self._shards[k].row, self._shards[k].column, list(t.shape))
                           for k, t in self._local.items() if self._shards[k].table == name]}

    @torch.no_grad()
    def load_state_dict_local(self, state: dict[str, dict[str, Any]]) -> None:
        """Restore this rank's shards; refuses a state of another layout before writing."""
        if list(state) != self.names:
            raise ValueError(f"state holds tables {list(state)}, these are {self.names}")
        for name, entry in state.items():
            found = {**{key: entry[key] for key in ("shape", "sharding", "world_size", "rank")},
                     "shards": [(s["row"], s["column"], list(s["values"].shape))
                                for s in entry["shards"]]}
            if found != self._layout(name):
                raise ValueError(f"table {name!r} was saved with layout {found}, but this "
                                 f"rank holds {self._layout(name)}")
        for name, entry in state.items():
            tensors = [t for k, t in self._local.items() if self._shards[k].table == name]
            for tensor, saved in zip(tensors, entry["shards"], strict=True):
                tensor.copy_(saved["values"])

def shard_module_tables(module: nn.Module, sharding: str) -> ShardedTables:
    """Collective: move the tables of the module's EmbeddingBagCollection into ShardedTables,
    leaving empty [0, E] placeholder weights in the module.

    The module's own forward then needs rows swapped in for the ids it will see, which is how
    the federated trainer and evaluation use it anyway; the model code never knows.
    """
    collections = [m for m in module.modules() if isinstance(m, EmbeddingBagCollection)]
    if len(collections) != 1:
        raise ValueError(f"sharding needs exactly one EmbeddingBagCollection in the model, "
                         f"found {len(collections)}")
    collection = collections[0]
    tables = ShardedTables.build(collection, sharding)
    for config in collection.embedding_bag_configs():
        bag = collection.embedding_bags[config.name]
        bag.weight = nn.Parameter(torch.empty(0, config.embedding_dim),
                                  requires_grad=bag.weight.requires_grad)
    return tables
