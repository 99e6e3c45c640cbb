"""TorchRec's default initial table values, reproduced piece by piece without the whole table.

A CPU EmbeddingBagCollection draws its tables from torch's global generator: nn.EmbeddingBag
fills each weight with normal_ (table after table), then the collection's reset_parameters
overwrites them with each config's init_fn, uniform_(-sqrt(1/rows), sqrt(1/rows)) by default.
Both fills draw one value per element in element order, so replaying the same draws in row
blocks yields the same values (checked in tests/test_table_init.py against a CPU build).

That lets a collection be built on the meta device (`tables_on_meta`) when its tables will be
held sharded across ranks (recsys.sharding): the build leaves the global generator exactly
where a CPU build would, so the layers built after it get the same weights, and each rank
later fills just its shard with the values the unsharded table would have started from.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

BLOCK_ROWS = 65536  # rows drawn at a time: 4 MB at dim 16
_ON_META: ContextVar[bool] = ContextVar("fltk_tables_on_meta", default=False)
# generator state before each meta-built collection's (skipped) draws
_START_STATES: weakref.WeakKeyDictionary[EmbeddingBagCollection, Tensor] = (
    weakref.WeakKeyDictionary())


@dataclass(frozen=True)
class Target:
    """Where replayed values go: rows [row, row + out.shape[0]) and columns
    [column, column + out.shape[1]) of one table are written into `out`."""

    out: Tensor
    row: int = 0
    column: int = 0


@contextmanager
def tables_on_meta() -> Iterator[None]:
    """Collections built by `embedding_bag_collection` inside this block hold no values."""
    token = _ON_META.set(True)
    try:
        yield
    finally:
        _ON_META.reset(token)


def embedding_bag_collection(configs: list[EmbeddingBagConfig]) -> EmbeddingBagCollection:
    """An EmbeddingBagCollection on the CPU, or on the meta device inside `tables_on_meta`
    (the generator then advances as the CPU build would, and `fill_initial` can produce any
    part of its initial values later)."""
    if not _ON_META.get():
        return EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    for config in configs:
        _uniform_bounds(config)  # refuse what cannot be replayed before drawing anything
    start = torch.get_rng_state()
    collection = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    _replay(configs, torch.default_generator, {}, draw_all=True)
    _START_STATES[collection] = start
    return collection


def fill_initial(collection: EmbeddingBagCollection, targets: dict[str, list[Target]]) -> None:
    """Write the initial values of the requested table parts: copied from a CPU collection's
    weights, or replayed from the generator state a meta-built collection recorded."""
    if collection not in _START_STATES:
        for name, wanted in targets.items():
            weight = collection.embedding_bags[name].weight.detach()
            for target in wanted:
                rows, columns = target.out.shape
                target.out.copy_(weight[target.row:target.row + rows,
                                        target.column:target.column + columns])
        return
    generator = torch.Generator()
    generator.set_state(_START_STATES[collection])
    _replay(collection.embedding_bag_configs(), generator, targets, draw_all=False)


def _uniform_bounds(config: EmbeddingBagConfig) -> tuple[float, float]:
    init = config.init_fn
    if not (isinstance(init, functools.partial) and init.func is torch.nn.init.uniform_
            and not init.args):
        raise ValueError(f"table {config.name!r}: sharded tables start from TorchRec's default "
                         f"uniform init_fn, not {init!r}")
    default = math.sqrt(1 / config.num_embeddings)
    return init.keywords.get("a", -default), init.keywords.get("b", default)


def _blocks(config: EmbeddingBagConfig) -> Iterator[tuple[int, int]]:
    """Row ranges of BLOCK_ROWS; the last is merged into the one before when it has under 16
    values, since torch draws normals for fewer than 16 values another way."""
    rows, dim = config.num_embeddings, config.embedding_dim
    starts = list(range(0, rows, BLOCK_ROWS))
    if len(starts) > 1 and (rows - starts[-1]) * dim < 16:
        starts.pop()
    yield from zip(starts, [*starts[1:], rows], strict=True)


def _replay(configs: list[EmbeddingBagConfig], generator: torch.Generator,
            targets: dict[str, list[Target]], draw_all: bool) -> None:
    """Draw what a CPU build draws, in its order, copying the wanted parts out; without
    `draw_all`, stop after the last wanted table."""
    for config in configs:
        for start, stop in _blocks(config):
            torch.empty(stop - start, config.embedding_dim).normal_(generator=generator)
    last = len(configs) - 1 if draw_all else max(
        (i for i, c in enumerate(configs) if c.name in targets), default=-1)
    for config in configs[:last + 1]:
        low, high = _uniform_bounds(config)
        for start, stop in _blocks(config):
            values = torch.empty(stop - start, config.embedding_dim).uniform_(
                low, high, generator=generator)
            for target in targets.get(config.name, []):
                rows, columns = target.out.shape
                first, end = max(start, target.row), min(stop, target.row + rows)
                if first < end:
                    target.out[first - target.row:end - target.row] = values[
                        first - start:end - start, target.column:target.column + columns]
