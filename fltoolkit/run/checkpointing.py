"""A federated run's state: what a checkpoint holds, writing and reading checkpoint files,
finding the run to resume, and stopping cleanly on SIGINT/SIGTERM.

A checkpoint is `checkpoints/round_NNNNNN.pt` in the run directory, holding `loop_state`
(tensors and plain values only). It is written to a temp file, flushed to disk and renamed,
so a crash mid-write leaves the previous checkpoint intact; it is read with
`torch.load(weights_only=True)`, so opening one never runs code. A file that does not load
(truncated, corrupt) is skipped with a warning in favour of the one before it.

With sharded tables every rank also writes its own shards to `round_NNNNNN.rankR.pt`, before
rank 0 writes the round's file, so a round file on disk always has its shard files.

A resumed run must end with the same files as an uninterrupted one, so resuming with a
different configuration is refused (the differing keys are named) rather than mixed.
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import torch
import yaml

from fltoolkit.reports.run_dir import latest_version, save_atomically
from fltoolkit.run.config import ConfigError
from fltoolkit.run.ranks import Ranks

if TYPE_CHECKING:
    from fltoolkit.loop import FederatedLoop

log = logging.getLogger("fltk")

PATTERN = re.compile(r"round_(\d{6,})\.pt")
# keys that may differ between the killed run and its resumption
RUN_KEYS = ("run_dir", "resume")


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected; the message names the directory."""


class RunInterrupted(Exception):
    """The run stopped on request after `round` (a checkpoint of that round was written)."""

    exit_code = 130  # the shell's code for a job stopped by SIGINT
    quiet = False  # set on ranks other than 0: rank 0 prints the run's one line

    def __init__(self, round_index: int) -> None:
        super().__init__(f"interrupted after round {round_index} (checkpoint written); "
                         "continue with the same command and --resume RUN_DIR")
        self.round = round_index


# ---------------------------------------------------------------- what a checkpoint holds
def loop_state(loop: FederatedLoop) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly.

    Collective under several ranks: each holds its own clients' local rows and optimizer
    state (in async mode also those held with updates in flight), and rank 0, which writes
    the checkpoints, receives all of them; on the other ranks these entries are None."""
    local_tables = _merged_by_client(loop.ranks.gather_on_main(
        loop.local_tables.state_dict() if loop.local_tables else None), depth=2)
    optimizer_states = loop.trainer.optimizer_states
    optimizer_states = _merged_by_client(loop.ranks.gather_on_main(
        optimizer_states.state_dict(list(loop.module.parameters()))
        if optimizer_states else None), depth=1)
    asynchronous = None
    if loop.asynchronous is not None:  # the states held with updates in flight: per rank too
        asynchronous = loop.asynchronous.state_dict(list(loop.module.parameters()))
        for key in ("local_rows", "optimizers"):
            asynchronous[key] = _merged_by_client(loop.ranks.gather_on_main(asynchronous[key]),
                                                  depth=1)
    return {
        "completed_rounds": loop.completed_rounds,
        "module": loop.module.state_dict(),
        "strategy": loop.strategy.state_dict(),
        "selector": loop.selector.state_dict(),
        "admission": loop.admission.state_dict(),
        # async mode: the timeline and the updates and client states in flight
        "asynchronous": asynchronous,
        "local_tables": local_tables,
        "optimizer_states": optimizer_states,
        "wall_time_s": loop.wall_time_s,
        "participation": torch.from_numpy(loop.participation.copy()),
        "history": list(loop.history),
        "held_out": loop.held_out.state_dict(),
        # cloned: before the first evaluation the columns are empty, and polars hands out
        # empty tensors of several dtypes over one buffer, which torch.save refuses
        "test_clients": {name: loop.test_clients[name].to_torch().clone()
                         for name in loop.test_clients.columns},
        "last": dict(loop.last),
        "since_evaluation": asdict(loop.since_evaluation),
        "totals": asdict(loop.totals),
        "torch_rng": torch.get_rng_state(),
        # budgeted tables: the row maps and the importance (None with whole tables)
        "embeddings": loop.budget.state_dict() if loop.budget is not None else None,
    }


def load_loop_state(loop: FederatedLoop, state: dict[str, Any]) -> None:
    """Continue from `loop_state`'s output (the same experiment, built afresh)."""
    try:
        _restore(loop, state)
    except KeyError as error:
        raise CheckpointError(f"the checkpoint has no {error.args[0]!r}: it was written by "
                              "another version of fltk and cannot be resumed by this one"
                              ) from error


def _restore(loop: FederatedLoop, state: dict[str, Any]) -> None:
    from fltoolkit.loop import RoundRow  # here: fltoolkit.loop imports this module

    loop.module.load_state_dict(state["module"])
    loop.strategy.load_state_dict(state["strategy"])
    loop.selector.load_state_dict(state["selector"])
    loop.admission.load_state_dict(state["admission"])
    if loop.asynchronous is not None:
        loop.asynchronous.load_state_dict(state["asynchronous"], list(loop.module.parameters()))
    own = loop.ranks.owns  # each rank keeps its own clients' state only
    if loop.local_tables is not None:
        loop.local_tables.load_state_dict(
            {table: _owned(rows, own) for table, rows in state["local_tables"].items()})
    if loop.trainer.optimizer_states is not None:
        loop.trainer.optimizer_states.load_state_dict(
            _owned(state["optimizer_states"], own), list(loop.module.parameters()))
    loop.completed_rounds, loop.wall_time_s = state["completed_rounds"], state["wall_time_s"]
    loop.participation = state["participation"].numpy().copy()
    loop.history, loop.last = list(state["history"]), dict(state["last"])
    loop.held_out.load_state_dict(state["held_out"])
    loop.test_clients = pl.DataFrame({name: values.numpy()
                                      for name, values in state["test_clients"].items()}
                                     ).with_columns(pl.col("test_auc").fill_nan(None))
    loop.since_evaluation = RoundRow(**{**state["since_evaluation"],
                                        "losses": tuple(state["since_evaluation"]["losses"])})
    loop.totals = RoundRow(**{**state["totals"], "losses": tuple(state["totals"]["losses"])})
    torch.set_rng_state(state["torch_rng"])
    if loop.budget is not None:
        loop.budget.load_state_dict(state["embeddings"])


def shard_state(loop: FederatedLoop) -> dict[str, Any] | None:
    """With sharded tables, what only this rank holds: its shards and the strategy's state
    of them (for its own checkpoint file); None otherwise."""
    tables = loop.server_tables.state_dict()
    return None if tables is None else {"tables": tables, "strategy": loop.strategy.state_dict()}


def load_shard_state(loop: FederatedLoop, state: dict[str, Any]) -> None:
    """Restore `shard_state`'s output, after `load_loop_state`."""
    loop.server_tables.load_state_dict(state["tables"])
    loop.strategy.load_state_dict(state["strategy"])


def server_model_state(loop: FederatedLoop) -> dict[str, torch.Tensor]:
    """The module's state without client-local tables (what the server may keep) and
    without the placeholders of sharded ones (`shard_state` holds those)."""
    left_out = list(loop.local_tables.initial) if loop.local_tables else []
    if loop.server_tables.sharded:
        left_out = list(loop.parts.tables)
    names = {id(p): name for name, p in loop.module.named_parameters()}
    excluded = {names[id(loop.parts.tables[table].weight)] for table in left_out}
    return {name: value for name, value in loop.module.state_dict().items()
            if name not in excluded}


def _owned(by_client: dict[int, Any], owns: Callable[[int], bool]) -> dict[int, Any]:
    """The entries of this rank's clients (a checkpoint holds every rank's)."""
    return {client: value for client, value in by_client.items() if owns(client)}


def _merged_by_client(parts: list[Any] | None, depth: int) -> Any:
    """The union of the ranks' parts of a state keyed by client ({client: ...} at depth 1,
    {table: {client: ...}} at depth 2); each rank holds its own clients, so keys are disjoint.
    None where the parts were not gathered (ranks other than 0)."""
    if parts is None:
        return None
    if parts[0] is None or len(parts) == 1:
        return parts[0]
    if depth == 1:
        return {client: value for part in parts for client, value in part.items()}
    return {key: _merged_by_client([part[key] for part in parts], depth - 1)
            for key in parts[0]}


# ---------------------------------------------------------------- a run's checkpoints
def checkpointer(ranks: Ranks, checkpoints: Path, keep_last: int
                 ) -> Callable[[FederatedLoop, int], None]:
    """The loop's on_checkpoint, run by every rank (gathering the state is collective): each
    rank writes its table shards if sharded, then rank 0 the round's file."""
    def checkpoint(loop: FederatedLoop, round_index: int) -> None:
        state = loop_state(loop)
        shards = shard_state(loop)
        if shards is not None:
            save_shard(checkpoints, round_index, ranks.rank, shards, keep_last)
            ranks.barrier()  # the round's file only once every rank's shards are on disk
        if ranks.is_main:
            save_checkpoint(checkpoints, round_index, state, keep_last)
    return checkpoint


def load_checkpoint(loop: FederatedLoop, ranks: Ranks, checkpoints: Path) -> Path:
    """Load the newest readable checkpoint (and this rank's shards of it) into `loop`."""
    checkpoint, state = load_latest(checkpoints)
    load_loop_state(loop, state)
    if loop.server_tables.sharded:
        load_shard_state(loop, load_shard(checkpoints, loop.completed_rounds, ranks.rank))
    return checkpoint


def save_final_shards(loop: FederatedLoop, ranks: Ranks, checkpoints: Path) -> None:
    """Sharded tables: each rank's final shards beside final.pt (which has no tables)."""
    shards = shard_state(loop)
    if shards is not None:
        save_atomically(checkpoints / f"final.rank{ranks.rank}.pt", shards)


# ---------------------------------------------------------------- checkpoint files
def checkpoint_path(directory: Path, round_index: int) -> Path:
    return directory / f"round_{round_index:06d}.pt"


def shard_path(directory: Path, round_index: int, rank: int) -> Path:
    return directory / f"round_{round_index:06d}.rank{rank}.pt"


def save_checkpoint(directory: Path, round_index: int, state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write the state of `round_index` atomically, then delete all but the newest
    `keep_last` checkpoints."""
    path = save_atomically(checkpoint_path(directory, round_index), state)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink()
    return path


def save_shard(directory: Path, round_index: int, rank: int, state: dict[str, Any],
               keep_last: int) -> Path:
    """Write one rank's shards of `round_index`; keeps one more than the round files, since
    this round's file is written after them (a crash in between falls back a round)."""
    path = save_atomically(shard_path(directory, round_index, rank), state)
    for old in list_checkpoints(directory, rank)[:-(keep_last + 1)]:
        old.unlink()
    return path


def load_shard(directory: Path, round_index: int, rank: int) -> dict[str, Any]:
    """Rank `rank`'s shards of `round_index`, with an error naming the file if it is absent
    or does not load."""
    path = shard_path(directory, round_index, rank)
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"{path}: rank {rank}'s table shards of round {round_index} do "
                              f"not load ({type(error).__name__}); cannot resume") from error


def list_checkpoints(directory: Path, rank: int | None = None) -> list[Path]:
    """Checkpoint files (or rank `rank`'s shard files), oldest round first."""
    pattern = PATTERN if rank is None else re.compile(rf"round_(\d{{6,}})\.rank{rank}\.pt")
    found = [p for p in directory.glob("round_*.pt") if pattern.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(pattern.fullmatch(p.name).group(1)))


def load_latest(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that loads; unreadable newer ones are reported and skipped."""
    candidates = list_checkpoints(directory)
    for path in reversed(candidates):
        try:
            return path, torch.load(path, weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file falls back the same way
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                        path, type(error).__name__, str(error).splitlines()[0][:200])
    where = "none loads" if candidates else "none found"
    raise CheckpointError(f"{directory}: no usable checkpoint ({where}); cannot resume")


# ---------------------------------------------------------------- resuming and stopping
def resume_directory(resume: str, experiment_name: str) -> Path:
    """The run directory `--resume` names: a path, or `last` (the newest version of the
    experiment under runs/)."""
    if resume == "last":
        path = latest_version(Path("runs") / experiment_name)
        if path is None:
            raise ConfigError(f"--resume last: no run of {experiment_name!r} under runs/")
        return path
    path = Path(resume)
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"--resume {resume}: not a run directory (no config.yaml)")
    return path


def check_same_experiment(run_dir: Path, resolved_yaml: str) -> None:
    """Refuse to resume with a configuration other than the run's own."""
    stored = _flatten(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    current = _flatten(yaml.safe_load(resolved_yaml) or {})
    differing = sorted(key for key in stored.keys() | current.keys()
                       if key.split(".")[0] not in RUN_KEYS
                       and stored.get(key) != current.get(key))
    if differing:
        shown = ", ".join(f"{key} ({stored.get(key)!r} -> {current.get(key)!r})"
                          for key in differing[:5])
        raise ConfigError(f"--resume {run_dir}: the configuration differs from the run's "
                          f"config.yaml: {shown}")


@contextmanager
def stop_on_signals(request_stop: Callable[[], None]) -> Iterator[None]:
    """While training, SIGINT/SIGTERM call `request_stop()` (the loop checkpoints after the
    current round and stops); a second signal interrupts at once."""
    previous = {}

    def handler(number: int, frame: Any) -> None:
        log.warning("%s: stopping after this round (a checkpoint will be written); "
                    "send it again to stop at once", signal.Signals(number).name)
        request_stop()
        for restored, old in previous.items():
            signal.signal(restored, old)

    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}
