"""Several ranks (torchrun, gloo on localhost) give the metrics of one process: each trains its
share of the cohort, the deltas are exchanged, test rows are scored where their client lives."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fltoolkit.run.checkpointing import load_latest
from fltoolkit.run.cli import main
from fltoolkit.run.ranks import _pack, _unpack
from fltoolkit.training.updates import ClientUpdate, SparseRows

EXPERIMENT = str(Path(__file__).resolve().parents[1] / "experiments" / "taobao.yaml")
TOLERANCE = 1e-5
EXACT = ("round", "clients_seen", "bytes_up_per_round", "bytes_down_per_round", "rejected",
         "crashed")
# DP with adaptive clipping inside secure aggregation; the default UniformSelector is
# accounted as fixed-size sampling
PRIVATE = ["--privacy.noise_multiplier", "0.5", "--privacy.target_quantile", "0.5",
           "--privacy.secure_aggregation", "true"]
# FedBuff: updates, local rows and optimizer state in flight across aggregations
ASYNC = ["--federated.mode", "async", "--systems.enabled", "true",
         "--federated.buffer_size", "6"]


def _args(tmp_path: Path, run: str) -> list[str]:
    # local user tables and kept Adagrad state live on the rank that owns the client
    return ["fit", "--experiment", EXPERIMENT, "--data.num_rows", "10000",
            "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--federated.rounds", "3", "--federated.eval_interval", "1",
            "--federated.local_tables", "[user]", "--federated.keep_optimizer_state", "true",
            "--federated.strategy.class_path", "fltoolkit.strategies.FedAdam",
            "--run_dir", str(tmp_path / run)]


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _launch(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(ranks), "-m", "fltoolkit.run.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], PRIVATE, ASYNC],
                         ids=["plain", "dp_and_secure_aggregation", "async"])
def test_two_ranks_give_the_metrics_of_one(tmp_path, extra):
    assert main([*_args(tmp_path, "one"), *extra]) == 0
    launched = _launch([*_args(tmp_path, "two"), *extra], ranks=2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(one) == 3
    _assert_same_metrics(one, two, (*EXACT, "epsilon") if extra is PRIVATE else EXACT)
    assert float(one[-1]["auc"]) != float(one[0]["auc"])  # the rounds changed the model

    # the final checkpoint holds every client's local rows and optimizer state, from both ranks
    single_state = load_latest(tmp_path / "one" / "checkpoints")[1]
    split_state = load_latest(tmp_path / "two" / "checkpoints")[1]
    assert split_state["local_tables"]["user"].keys() == single_state["local_tables"]["user"].keys()
    assert split_state["optimizer_states"].keys() == single_state["optimizer_states"].keys()
    if extra is ASYNC:  # and the states held with updates still in flight
        for key in ("local_rows", "optimizers"):
            assert (split_state["asynchronous"][key].keys()
                    == single_state["asynchronous"][key].keys()), key
        assert single_state["asynchronous"]["local_rows"]
    for name, value in single_state["module"].items():
        torch.testing.assert_close(split_state["module"][name], value, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_sharded_tables_give_the_metrics_of_whole_ones(tmp_path):
    """Table- and column-wise shards on 2 ranks vs whole tables in 1 process (FedAdam, so the
    row moments live with the shards too); the table-wise run is stopped with SIGINT after a
    checkpoint and resumed from its per-rank shard files. The final shards put together are
    the tables."""
    args = _server_tables_args(tmp_path)
    assert main(args) == 0
    one = _metrics(tmp_path / "one")
    assert len(one) == 10
    whole = torch.load(tmp_path / "one" / "checkpoints" / "final.pt", weights_only=True)
    for sharding in ("table_wise", "column_wise"):
        run = tmp_path / sharding
        _assert_same_metrics(one, _sharded_run(args, run, sharding))
        assert _summary(run)["model_parameters"] == _summary(tmp_path / "one")["model_parameters"]
        dense = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
        assert dense.keys() == {k for k in whole if ".embedding_bags." not in k}
        tables = _assembled([torch.load(run / "checkpoints" / f"final.rank{rank}.pt",
                                        weights_only=True)["tables"] for rank in (0, 1)])
        assert len(tables) == 15
        for name, table in tables.items():
            expected = whole[next(k for k in whole if k.endswith(f".{name}.weight"))]
            torch.testing.assert_close(table, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_budgeted_sharded_tables_give_the_metrics_of_whole_ones(tmp_path):
    """AdaEmbed-style pruning under a total budget on 2 ranks, table- and column-wise: every
    rank re-balances the same maps from the same updates and starts the admitted rows in the
    shards it holds, so the run is the one process's; the table-wise run is stopped after a
    checkpoint and resumed (maps and importance from the checkpoint, rows from the shards)."""
    args = _server_tables_args(tmp_path, "--federated.keep_optimizer_state", "false",
                               "--embeddings.method", "adaembed", "--embeddings.budget", "0.25",
                               "--embeddings.prune_interval", "2")
    assert main(args) == 0
    one = _metrics(tmp_path / "one")
    with (tmp_path / "one" / "rounds.csv").open() as f:
        assert sum(int(row["rows_evicted"]) for row in csv.DictReader(f)) > 0
    for sharding in ("table_wise", "column_wise"):
        _assert_same_metrics(one, _sharded_run(args, tmp_path / sharding, sharding))


def _server_tables_args(tmp_path: Path, *extra: str) -> list[str]:
    """The one-process run of the sharding tests: every table on the server, 10 rounds, a
    checkpoint after each (so a 2-rank run can be stopped and resumed), then `extra`."""
    args = _args(tmp_path, "one")
    at = args.index("--federated.local_tables")
    del args[at:at + 2]
    return [*args, "--federated.rounds", "10", "--federated.checkpoint_interval", "1", *extra]


def _sharded_run(args: list[str], run: Path, sharding: str) -> list[dict[str, str]]:
    """`args` on 2 ranks with `sharding` into `run` (table-wise: stopped with SIGINT after a
    checkpoint, then resumed from it); its metrics."""
    sharded = [*args, "--federated.sharding", sharding, "--run_dir", str(run)]
    if sharding == "table_wise":
        _stop_after_a_checkpoint(sharded, run)
        sharded += ["--resume", str(run)]
    launched = _launch(sharded, 2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return _metrics(run)


def _assert_same_metrics(one: list[dict[str, str]], other: list[dict[str, str]],
                         exact: tuple[str, ...] = EXACT) -> None:
    """Every evaluation of two runs: `exact` columns equal, the metrics within TOLERANCE."""
    assert len(one) == len(other)
    for single, split in zip(one, other, strict=True):
        assert {k: single[k] for k in exact} == {k: split[k] for k in exact}
        for key in ("auc", "logloss", "gauc", "train_loss"):
            assert float(split[key]) == pytest.approx(float(single[key]), abs=TOLERANCE), key


def _stop_after_a_checkpoint(args: list[str], run: Path) -> None:
    """Start a 2-rank run, SIGINT it once round 2's checkpoint exists; it must stop early."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "fltoolkit.run.cli", *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "round_000002.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=240)
    stopped_at = load_latest(run / "checkpoints")[1]["completed_rounds"]
    assert 2 <= stopped_at < 10, err[-3000:]
    assert (run / "checkpoints" / f"round_{stopped_at:06d}.rank1.pt").exists()


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _assembled(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """Whole tables from the ranks' `ShardedTables.state_dict_local` entries."""
    tables = {}
    for shards in ranks:
        for name, entry in shards.items():
            table = tables.setdefault(name, torch.full(entry["shape"], float("nan")))
            for shard in entry["shards"]:
                rows, columns = shard["values"].shape
                table[shard["row"]:shard["row"] + rows,
                      shard["column"]:shard["column"] + columns] = shard["values"]
    return tables


def test_packed_updates_unpack_to_the_same_rows_and_absent_tables_stay_absent():
    rows = SparseRows(torch.tensor([3, 7]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    empty = SparseRows(torch.tensor([], dtype=torch.int64), torch.zeros(0, 2))
    updates = [ClientUpdate(client=5, num_samples=2, loss=0.5, dense=torch.ones(3),
                            tables={"ad": rows, "user": empty}),
               ClientUpdate(client=8, num_samples=1, loss=0.25, dense=torch.ones(3),
                            tables={"user": rows})]
    meta, packed = _pack(updates)
    assert all(update.dense.numel() == 0 and not update.tables for update in meta)
    assert packed["ad"][2] == [2, -1] and packed["user"][2] == [0, 2]
    first, second = _unpack(meta, packed)
    assert (first.client, second.client, second.loss) == (5, 8, 0.25)
    assert set(first.tables) == {"ad", "user"} and set(second.tables) == {"user"}
    assert torch.equal(first.tables["ad"].values, rows.values)
    assert first.tables["user"].ids.numel() == 0
    assert torch.equal(second.tables["user"].ids, rows.ids)
