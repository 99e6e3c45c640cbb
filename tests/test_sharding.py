"""Server tables sharded across two ranks (torchrun, gloo on localhost) behave like one
unsharded collection: same initial values, same rows after writes, same pooled forward."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.dlrm import build_embedding_bags
from recsys.table_init import tables_on_meta

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["t0", "t1", "t2"]
ROWS = [1000, 1200, 900]
DIM = 8
SEED = 3


def _batch(names: list[str], size: int, generator: torch.Generator) -> KeyedJaggedTensor:
    """One to three ids per bag, so sum pooling is exercised."""
    lengths = torch.randint(1, 4, (len(names) * size,), generator=generator, dtype=torch.int32)
    values = [torch.randint(0, rows, (int(lengths[i * size:(i + 1) * size].sum()),),
                            generator=generator) for i, rows in enumerate(ROWS)]
    return KeyedJaggedTensor(keys=names, values=torch.cat(values), lengths=lengths)


def _check(sharding: str, directory: Path) -> None:
    """One rank's side of the checks for one sharding type."""
    from recsys.sharding import ShardedTables

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)
    reference = build_embedding_bags(NAMES, ROWS, DIM)
    torch.manual_seed(SEED)
    with tables_on_meta():
        source = build_embedding_bags(NAMES, ROWS, DIM)
    tables = ShardedTables.build(source, sharding)
    weights = {n: reference.embedding_bags[n].weight.detach() for n in tables.names}
    draws = [None] * world
    dist.all_gather_object(draws, torch.rand(1).item())
    assert len(set(draws)) == 1, f"{sharding}: building desynchronized the ranks' generators"
    full_bytes = sum(rows * DIM * 4 for rows in ROWS)
    assert 0 < tables.local_bytes() < full_bytes, (sharding, tables.plan_summary())

    # every rank asks for other rows, t1 for none at all on rank 1
    ask = torch.Generator().manual_seed(rank)
    requests = {n: torch.randint(0, rows, (40 + 9 * rank,), generator=ask)
                for n, rows in zip(tables.names, ROWS, strict=True)}
    if rank == 1:
        requests["t1"] = torch.empty(0, dtype=torch.int64)
    for name, got in tables.fetch(requests).items():
        assert torch.equal(got, weights[name][requests[name]]), name

    # the same changes on the sharded tables and on an unsharded reference
    shared = torch.Generator().manual_seed(11)  # the same draws on every rank
    sent = {}
    for name, rows in zip(tables.names, ROWS, strict=True):
        ids = torch.randperm(rows, generator=shared)[:30 * world]
        values = torch.randn(ids.numel(), DIM, generator=shared)
        weights[name][ids] = values
        sent[name] = (ids[30 * rank:30 * (rank + 1)], values[30 * rank:30 * (rank + 1)])
    tables.write(sent)
    ids = torch.tensor([5, 17])  # every rank sends row 5: the highest rank's values stay
    values = torch.full((2, DIM), float(rank))
    weights["t0"][ids] = float(world - 1)
    tables.write({"t0": (ids, values), "t1": (ids[:0], values[:0]), "t2": (ids[:0], values[:0])})
    for name, rows in zip(tables.names, ROWS, strict=True):
        ids = torch.randperm(rows, generator=shared)[:25]
        values = torch.randn(ids.numel(), DIM, generator=shared)
        weights[name][ids] = values
        tables.apply_local(name, ids, values)
    everything = {n: torch.arange(rows) for n, rows in zip(tables.names, ROWS, strict=True)}
    for name, got in tables.fetch(everything).items():
        torch.testing.assert_close(got, weights[name], atol=1e-6, rtol=0, msg=name)

    batch = _batch(tables.names, 16 + 5 * rank, torch.Generator().manual_seed(100 + rank))
    pooled, expected = tables.pooled(batch), reference(batch)
    for name in tables.names:
        torch.testing.assert_close(pooled[name], expected[name], atol=1e-6, rtol=0)

    # per-rank checkpoint: round trip, and another rank's file is refused
    path = directory / f"{sharding}-{rank}.pt"
    torch.save(tables.state_dict_local(), path)
    tables.apply_local("t0", torch.arange(ROWS[0]), torch.zeros(ROWS[0], DIM))
    tables.load_state_dict_local(torch.load(path, weights_only=True))
    assert torch.equal(tables.fetch(everything)["t0"], weights["t0"])
    dist.barrier()
    other = torch.load(directory / f"{sharding}-{(rank + 1) % world}.pt", weights_only=True)
    try:
        tables.load_state_dict_local(other)
    except ValueError as error:
        assert "layout" in str(error)
    else:
        raise AssertionError(f"{sharding}: loaded another rank's shards")


def _run_ranks() -> None:
    dist.init_process_group("gloo")
    directory = Path(sys.argv[1])
    for sharding in ("table_wise", "column_wise"):
        _check(sharding, directory)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_tables_of_one_collection(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "tests.test_sharding", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env,
                              cwd=ROOT)
    assert launched.returncode == 0, launched.stderr[-4000:]


if __name__ == "__main__":
    _run_ranks()
