"""Server tables sharded across two ranks (torchrun, gloo on localhost) behave like one
unsharded collection: same initial values, same rows after writes to the shards, and a
checkpoint of each rank's shards that only that rank can load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fltoolkit.run.ranks import Ranks
from recsys.dlrm import build_embedding_bags
from recsys.table_init import tables_on_meta

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["t0", "t1", "t2"]
ROWS = [1000, 1200, 900]
DIM = 8
SEED = 3


def _check(sharding: str, directory: Path) -> None:
    """One rank's side of the checks for one sharding type."""
    from recsys.sharding import ShardedTables, shard_module_tables

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(SEED)
    reference = build_embedding_bags(NAMES, ROWS, DIM)
    torch.manual_seed(SEED)
    with tables_on_meta():
        source = build_embedding_bags(NAMES, ROWS, DIM)
    tables = ShardedTables.build(source, sharding)
    weights = {n: reference.embedding_bags[n].weight.detach().clone() for n in tables.names}
    initial = {n: weights[n].clone() for n in tables.names}
    draws = [None] * world
    dist.all_gather_object(draws, torch.rand(1).item())
    assert len(set(draws)) == 1, f"{sharding}: building desynchronized the ranks' generators"
    owned = tables.owned()
    held = sum(shard.numel() for _, shard in owned.values())
    assert 0 < held < sum(ROWS) * DIM, (sharding, tables.plan_summary())
    assert tables.num_parameters() == sum(ROWS) * DIM

    # every rank asks for other rows, t1 for none at all on rank 1
    ask = torch.Generator().manual_seed(rank)
    requests = {n: torch.randint(0, rows, (40 + 9 * rank,), generator=ask)
                for n, rows in zip(tables.names, ROWS, strict=True)}
    if rank == 1:
        requests["t1"] = torch.empty(0, dtype=torch.int64)
    for name, got in tables.fetch(requests).items():
        assert torch.equal(got, weights[name][requests[name]]), name

    # what a rank writes into its own shards (as aggregation does) every rank then fetches
    shared = torch.Generator().manual_seed(11)  # the same draws on every rank
    for name, rows in zip(tables.names, ROWS, strict=True):
        ids = torch.randperm(rows, generator=shared)[:30]
        values = torch.randn(ids.numel(), DIM, generator=shared)
        weights[name][ids] = values
        if name in owned:
            first, shard = owned[name]
            shard[ids] = values[:, first:first + shard.shape[1]]
    everything = {n: torch.arange(rows) for n, rows in zip(tables.names, ROWS, strict=True)}
    for name, got in tables.fetch(everything).items():
        assert torch.equal(got, weights[name]), name

    # per-rank checkpoint: round trip, and another rank's file is refused
    path = directory / f"{sharding}-{rank}.pt"
    torch.save(tables.state_dict_local(), path)
    for _, shard in owned.values():
        shard.zero_()
    tables.load_state_dict_local(torch.load(path, weights_only=True))
    for name, got in tables.fetch(everything).items():
        assert torch.equal(got, weights[name]), name
    dist.barrier()
    other = torch.load(directory / f"{sharding}-{(rank + 1) % world}.pt", weights_only=True)
    try:
        tables.load_state_dict_local(other)
    except ValueError as error:
        assert "layout" in str(error)
    else:
        raise AssertionError(f"{sharding}: loaded another rank's shards")

    # a module's collection: sharded, placeholders left behind
    torch.manual_seed(SEED)
    with tables_on_meta():
        module = torch.nn.Sequential(build_embedding_bags(NAMES, ROWS, DIM))
    in_module = shard_module_tables(module, sharding)
    assert all(p.shape == (0, DIM) and not p.is_meta for p in module.parameters())
    for name, got in in_module.fetch(requests).items():
        assert torch.equal(got, initial[name][requests[name]]), name


def _run_ranks() -> None:
    dist.init_process_group("gloo")
    directory = Path(sys.argv[1])
    for sharding in ("table_wise", "column_wise"):
        _check(sharding, directory)
    Ranks(dist.get_rank(), dist.get_world_size()).close()


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
