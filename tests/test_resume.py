"""Checkpoints and exact resume: a run killed with SIGKILL and resumed ends with the same files
as an uninterrupted one; SIGTERM stops cleanly at a checkpoint; a truncated checkpoint falls
back to the previous one; a resume with another configuration is refused."""

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

from fltoolkit.loop import LoopHooks
from fltoolkit.run.checkpointing import (
    list_checkpoints,
    load_latest,
    load_loop_state,
    loop_state,
    save_checkpoint,
)
from fltoolkit.run.cli import main
from fltoolkit.run.ranks import Ranks

EXPERIMENT = str(Path(__file__).resolve().parents[1] / "experiments" / "taobao.yaml")
WALL_CLOCK = ("wall_time_s", "round_wall_s")  # the only fields allowed to differ


ROUNDS = 40  # vectorized rounds of this size take ~15 ms: enough of them that a signal sent
# at round 1 or 3 lands mid-run on a fast machine too (with 6, a run could end first)


def _args(tmp_path: Path, rounds: int = ROUNDS) -> list[str]:
    # Oort and FedAdam: selector and server-optimizer state must survive the restart too
    return ["--experiment", EXPERIMENT, "--data.num_rows", "10000",
            "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--federated.rounds", str(rounds), "--federated.eval_interval", "2",
            "--federated.checkpoint_interval", "2", "--systems.enabled", "true",
            "--federated.selector.class_path", "fltoolkit.selection.Oort",
            "--federated.strategy.class_path", "fltoolkit.strategies.FedAdam"]


def _start(tmp_path: Path, run: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fltoolkit.run.cli", "fit", *_args(tmp_path),
                             "--run_dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_round(process: subprocess.Popen, run: Path, round_index: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        rounds = run / "rounds.csv"
        if rounds.exists() and any(line.startswith(f"{round_index},")
                                   for line in rounds.read_text().splitlines()):
            return
        time.sleep(0.01)
    raise AssertionError(f"round {round_index} never appeared: {process.communicate()[1]}")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in csv.DictReader(f)]


def _summary(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("wall_time_s")
    return summary


@pytest.mark.slow
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, capsys):
    main(["fit", *_args(tmp_path), "--run_dir", str(tmp_path / "warm")])  # data cache
    killed, stopped = tmp_path / "killed", tmp_path / "stopped"
    processes = {killed: _start(tmp_path, killed), stopped: _start(tmp_path, stopped)}
    # the earlier signal first: a run that reached its end before its signal would not stop
    _wait_for_round(processes[stopped], stopped, 1)
    processes[stopped].send_signal(signal.SIGTERM)
    _wait_for_round(processes[killed], killed, 3)
    processes[killed].send_signal(signal.SIGKILL)  # between two checkpoints, mid-run
    assert processes[killed].wait() == -signal.SIGKILL
    assert load_latest(killed / "checkpoints")[1]["completed_rounds"] < ROUNDS
    _, err = processes[stopped].communicate()
    assert processes[stopped].returncode == 130, err
    assert "--resume" in err.strip().splitlines()[-1]
    stopped_at = load_latest(stopped / "checkpoints")[1]["completed_rounds"]
    assert stopped_at < ROUNDS and (stopped / "report.html").exists()

    reference = tmp_path / "reference"
    assert main(["fit", *_args(tmp_path), "--run_dir", str(reference)]) == 0
    for run in (killed, stopped):
        assert main(["fit", *_args(tmp_path), "--resume", str(run)]) == 0
        for name in ("metrics.csv", "rounds.csv", "clients.csv"):
            assert _rows(run / name) == _rows(reference / name), (run.name, name)
        assert _summary(run) == _summary(reference)
    # the same seed twice gives the same numbers (the warm-up run had the same config)
    assert _rows(tmp_path / "warm" / "metrics.csv") == _rows(reference / "metrics.csv")
    assert [p.name for p in list_checkpoints(reference / "checkpoints")] == [
        f"round_{ROUNDS - 2:06d}.pt", f"round_{ROUNDS:06d}.pt"]  # keep_last 2

    capsys.readouterr()
    assert main(["fit", *_args(tmp_path, rounds=ROUNDS + 2), "--resume", str(killed)]) == 2
    assert f"federated.rounds ({ROUNDS} -> {ROUNDS + 2})" in capsys.readouterr().err


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    for round_index in (1, 2, 3):
        save_checkpoint(directory, round_index, {"round": round_index,
                                                 "weights": torch.full((64,), round_index)},
                        keep_last=2)
    assert [p.name for p in list_checkpoints(directory)] == ["round_000002.pt",
                                                            "round_000003.pt"]
    newest = directory / "round_000003.pt"
    newest.write_bytes(newest.read_bytes()[: os.path.getsize(newest) // 2])  # a crash mid-copy
    path, state = load_latest(directory)
    assert path.name == "round_000002.pt" and state["round"] == 2
    assert "round_000003.pt is unreadable" in caplog.text


def stopped_and_resumed(build, directory: Path):
    """A loop of 4 rounds stopped after 2 with a checkpoint in `directory`, and a fresh one
    that loaded it (to run the last 2)."""
    first = build()
    first.hooks = LoopHooks(
        on_checkpoint=lambda loop, r: save_checkpoint(directory, r, loop_state(loop), 5))
    first.config.rounds = 2
    first.run()
    first.config.rounds = 4
    second = build()
    load_loop_state(second, load_latest(directory)[1])
    return first, second


def assert_resumes_as_whole(second, whole, expected: dict) -> None:
    """`second` (resumed) runs to the end with `whole`'s final row (`expected`, from
    `whole.run()`) but for wall time, and ends with its module state, bit for bit."""
    resumed = second.run()
    expected.pop("wall_time_s"), resumed.pop("wall_time_s")
    assert resumed == expected
    for key, value in whole.module.state_dict().items():
        assert torch.equal(value, second.module.state_dict()[key]), key


def test_loop_state_round_trips_through_a_checkpoint_file(synthetic_data, tmp_path):
    """2 rounds, checkpoint, a fresh loop loads it and runs 2 more: the same as 4 at once,
    with local tables, kept Adam/Adagrad client state, Oort and a server optimizer."""
    from fltoolkit.selection import Oort
    from fltoolkit.strategies import FedYogi
    from tests.test_federated import _loop

    def build():
        return _loop(synthetic_data, rounds=4, eval_interval=2, local_tables=["user"],
                     keep_optimizer_state=True, strategy=FedYogi(server_lr=0.01), selector=Oort(),
                     optimizers=(lambda p: torch.optim.Adam(p, lr=1e-3),
                                 lambda p: torch.optim.Adagrad(p, lr=0.1)))

    whole = build()
    expected = whole.run()
    first, second = stopped_and_resumed(build, tmp_path)
    assert second.trainer.optimizer_states.states  # the clients' Adam moments came back
    # clients.csv is written at the end from the last evaluation: a run resumed after its
    # last checkpoint evaluates nothing more and must still write it
    assert second.test_clients.height and second.test_clients.equals(first.test_clients)
    # rank 1 of 2 keeps only its own (odd) clients' state: stale copies of rank 0's clients
    # would otherwise overwrite rank 0's newer ones when the next checkpoint merges them
    odd = build()
    odd.ranks = Ranks(rank=1, world_size=2)
    load_loop_state(odd, load_latest(tmp_path)[1])
    kept = [*odd.local_tables.rows["user"], *odd.trainer.optimizer_states.states]
    assert kept and all(client % 2 == 1 for client in kept)
    assert_resumes_as_whole(second, whole, expected)


def test_resuming_drops_rows_after_the_checkpoint_and_a_half_written_row(tmp_path):
    from fltoolkit.reports.run_dir import CsvLog

    log = CsvLog(tmp_path / "rounds.csv", ("round",))
    for round_index in (1, 2, 3):
        log.append({"round": round_index, "bytes": 10 * round_index})
    with (tmp_path / "rounds.csv").open("a") as f:
        f.write("1")  # killed while writing round 12's row
    resumed = CsvLog(tmp_path / "rounds.csv", ("round",))
    resumed.truncate_after(2)
    resumed.append({"round": 3, "bytes": 31})
    assert (tmp_path / "rounds.csv").read_text().splitlines() == [
        "round,bytes", "1,10", "2,20", "3,31"]


def test_a_checkpoint_before_the_first_evaluation_saves_and_loads(synthetic_data, tmp_path):
    """Round 1 of a run that evaluates every 5: nothing scored yet (the per-client test
    table is empty), which torch.save once refused, crashing the run at its checkpoint."""
    from tests.test_federated import _loop

    loop = _loop(synthetic_data, rounds=5, eval_interval=5)
    loop.run_round(1)
    save_checkpoint(tmp_path, 1, loop_state(loop), 2)
    resumed = _loop(synthetic_data, rounds=5, eval_interval=5)
    load_loop_state(resumed, load_latest(tmp_path)[1])
    assert resumed.test_clients.height == 0
    assert resumed.test_clients.columns == loop.test_clients.columns


def test_a_run_stopped_before_its_first_evaluation_exits_as_stopped(tmp_path, monkeypatch):
    """A stop requested in round 1 of a run that evaluates every 5 rounds: checkpointed, exit
    code 130 and a report of the rounds so far, not a crash while building a report of no
    evaluation (the run directory has rounds.csv but no metrics.csv yet)."""
    from fltoolkit.loop import FederatedLoop

    run_round = FederatedLoop.run_round

    def stop_in_round(self, round_index):
        self.request_stop()
        return run_round(self, round_index)

    monkeypatch.setattr(FederatedLoop, "run_round", stop_in_round)
    run = tmp_path / "run"
    code = main(["fit", "--experiment", EXPERIMENT, "--data.num_rows", "5000",
                 "--data.init_args.cache_dir", str(tmp_path / "cache"),
                 "--federated.rounds", "5", "--federated.eval_interval", "5",
                 "--run_dir", str(run)])
    assert code == 130
    assert [path.name for path in list_checkpoints(run / "checkpoints")] == ["round_000001.pt"]
    assert not (run / "metrics.csv").exists()
    assert "(interrupted: no evaluation yet)" in (run / "report.md").read_text()


def test_a_checkpoint_of_another_version_is_refused_by_name(synthetic_data):
    from fltoolkit.run.checkpointing import CheckpointError
    from tests.test_federated import _loop

    loop = _loop(synthetic_data, rounds=1)
    state = loop_state(loop)
    del state["held_out"]
    with pytest.raises(CheckpointError, match="has no 'held_out'.*another version of fltk"):
        load_loop_state(_loop(synthetic_data, rounds=1), state)
