"""Typed sections of an experiment that are fltk's own (not a model's or a datamodule's).

LightningCLI reads these signatures, so every key is documented, typed, overridable on the
command line (`--federated.rounds 10`) and rejected with its name when misspelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fltoolkit.asynchronous import AsyncPolicy, StalenessWeight
from fltoolkit.gate.faults import Faults
from fltoolkit.selection import ClientSelector, UniformSelector
from fltoolkit.strategies import FedAvg, Strategy
from fltoolkit.training.cohort import LocalSchedule


class ConfigError(ValueError):
    """A configuration value that parses but cannot be used; the message names the key."""


@dataclass
class FederatedConfig:
    """How the model is trained.

    Args:
        enabled: federated (each user a client) when true; centrally with a Lightning Trainer
            when false (the baseline: same data, model and metrics).
        rounds: number of federated rounds.
        clients_per_round: clients selected each round.
        batch_size: rows per local mini-batch (a client with fewer rows trains on all of them).
        local_epochs: passes over its rows that each client makes per round; unset to use
            `local_steps` instead.
        local_steps: mini-batches per client per round (used when local_epochs is unset).
        proximal_mu: FedProx's proximal coefficient (Li et al., MLSys 2020): clients minimize
            loss + mu/2 ||w - w_global||^2 (the paper tries 0.001 to 1); 0 is plain local
            training. A client setting, so it combines with any server strategy (FedProx
            proper is FedAvg with mu > 0).
        strategy: the server aggregation, by class_path: fltoolkit.strategies.FedAvg (default),
            FedAvgM, FedAdam, FedYogi, FedAdagrad, QFedAvg, robust ones, and wrappers such as
            NormClipping around any of them.
        selector: the client selector, by class_path: fltoolkit.selection.UniformSelector
            (default) or fltoolkit.selection.Oort.
        local_tables: tables kept on the clients and never uploaded (e.g. [user]), or `all`.
        keep_optimizer_state: keep each client's local optimizer state (dense, and the table
            rows it touched) between its rounds; false starts it fresh every round. Only
            stateful optimizers (Adam, Adagrad, momentum) are affected; memory grows with the
            clients seen.
        eval_interval: evaluate the global model on the test split every this many rounds
            (and after the last round).
        checkpoint_interval: write a checkpoint (`checkpoints/round_N.pt`) every this many
            rounds and after the last; `fltk fit --resume RUN_DIR` continues from the newest.
        keep_last: checkpoints kept on disk (older ones are deleted).
        reject_norm_ratio: reject (and count in `rejected`) updates whose L2 norm exceeds
            this multiple of the round's median update norm; unset: no norm check. Updates
            with NaN/Inf are always rejected.
        faults: inject faulty clients for robustness tests, e.g. `--federated.faults.nan 0.2`
            (see fltoolkit/faults.py: crash, nan, scale, scale_factor).
        vectorize: train a round's clients together (fltoolkit.training.vectorized): `true`
            (refused, with the reasons, where the module or settings do not support it),
            `auto`, the default (where supported, else one after another, with one log line
            saying why) or `false` (one after another, the sequential trainer).
        vectorize_memory_mb: working memory of the clients that step together: a round of
            more clients than fit trains in chunks of that many, one after another.
        device: where the module, local training and aggregation run (`cuda` where CUDA
            exists); the data stays in host memory and a round's cohort moves once.
        sharding: how the server's embedding tables are split across torchrun ranks with
            TorchRec (`table_wise`: each table on one rank; `column_wise`: every table's
            columns split across the ranks); `none` keeps whole tables on every rank.
        mode: `sync` (rounds: select, train, aggregate) or `async` (buffered asynchronous FL,
            FedBuff, on the simulated clock of `systems`: `concurrency` clients train at every
            moment and every `buffer_size` arrived updates are aggregated). In async mode a
            "round" is one aggregation: `rounds`, `eval_interval` and `checkpoint_interval`
            count aggregations.
        concurrency: async: clients training at every moment; unset: `clients_per_round`.
        buffer_size: async: arrived updates per aggregation; unset: half the concurrency
            (at least 1).
        staleness: async: the weight w(s) of an update s aggregations stale
            (fltoolkit/asynchronous/staleness.py: `function` constant, polynomial (default,
            `exponent` 0.5: 1/sqrt(1 + s)) or hinge (`slope`, `hinge`)).
        max_staleness: async: updates staler than this are dropped (counted in rounds.csv
            `dropped_stale`); unset: no limit.
    """

    enabled: bool = True
    rounds: int = 1000
    clients_per_round: int = 20
    batch_size: int = 32
    local_epochs: int | None = 1
    local_steps: int | None = None
    proximal_mu: float = 0.0
    strategy: Strategy | None = None
    selector: ClientSelector | None = None
    local_tables: list[str] | Literal["all"] | None = None
    keep_optimizer_state: bool = False
    eval_interval: int = 100
    checkpoint_interval: int = 100
    keep_last: int = 2
    reject_norm_ratio: float | None = None
    faults: Faults | None = None
    sharding: Literal["none", "table_wise", "column_wise"] = "none"
    vectorize: bool | Literal["auto"] = "auto"
    vectorize_memory_mb: float = 512
    device: str = "cpu"
    mode: Literal["sync", "async"] = "sync"
    concurrency: int | None = None
    buffer_size: int | None = None
    staleness: StalenessWeight | None = None
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        for key in ("rounds", "clients_per_round", "batch_size", "eval_interval",
                    "checkpoint_interval", "keep_last"):
            if getattr(self, key) < 1:
                raise ValueError(f"federated.{key} must be >= 1, got {getattr(self, key)}")
        if (self.local_epochs is None) == (self.local_steps is None):
            raise ValueError("set exactly one of federated.local_epochs and federated.local_steps")
        if (self.local_epochs or 1) < 1 or (self.local_steps or 1) < 1:
            raise ValueError("federated.local_epochs and federated.local_steps must be >= 1")
        if self.vectorize_memory_mb <= 0:
            raise ValueError("federated.vectorize_memory_mb must be > 0, got "
                             f"{self.vectorize_memory_mb}")
        if self.proximal_mu < 0:
            raise ValueError(f"federated.proximal_mu must be >= 0, got {self.proximal_mu}")
        self._check_device()
        ratio = self.reject_norm_ratio
        if ratio is not None and ratio <= 1:
            raise ValueError(f"federated.reject_norm_ratio must be > 1, got {ratio}")
        self.strategy = self.strategy or FedAvg()
        self.selector = self.selector or UniformSelector()
        self.local_tables = self.local_tables or []
        self.faults = self.faults or Faults()
        self.staleness = self.staleness or StalenessWeight()
        self._check_async_keys()

    def _check_async_keys(self) -> None:
        set_keys = [key for key in ("concurrency", "buffer_size", "max_staleness")
                    if getattr(self, key) is not None]
        if self.mode == "sync" and set_keys:
            raise ValueError(f"federated.{', federated.'.join(set_keys)}: asynchronous settings; "
                             "set federated.mode async to use them")
        for key in ("concurrency", "buffer_size"):
            if (getattr(self, key) or 1) < 1:
                raise ValueError(f"federated.{key} must be >= 1, got {getattr(self, key)}")
        if (self.max_staleness or 0) < 0:
            raise ValueError(f"federated.max_staleness must be >= 0, got {self.max_staleness}")

    def async_policy(self) -> AsyncPolicy:
        """The asynchronous server's settings, with the defaults resolved."""
        concurrency = self.concurrency or self.clients_per_round
        return AsyncPolicy(concurrency, self.buffer_size or max(1, concurrency // 2),
                           self.staleness, self.max_staleness)

    def check_mode(self, *, devices: bool, privacy: bool) -> None:
        """Refuse what async mode cannot run (yet), in one line naming the keys."""
        if self.mode != "async":
            return
        if not devices:
            raise ConfigError("federated.mode async runs on the simulated clock: set "
                              "systems.enabled true")
        if privacy:
            raise ConfigError("federated.mode async with the privacy section enabled is refused "
                              "for now: DP and secure aggregation are defined over a round's "
                              "cohort, which is not known when asynchronous clients start")
        if self.sharding != "none":
            raise ConfigError(f"federated.mode async with federated.sharding {self.sharding} is "
                              "refused for now: tables are whole on every rank in async mode")

    def _check_device(self) -> None:
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"federated.device: {self.device!r} is not a torch device "
                             "(cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"federated.device {self.device}: CUDA is not available on this "
                             "machine (torch.cuda.is_available() is false); use cpu")
        if device.type != "cpu" and self.sharding != "none":
            raise ValueError(f"federated.device {self.device}: sharded tables run on cpu only "
                             "so far")

    def schedule(self) -> LocalSchedule:
        """How much each client trains per round."""
        return LocalSchedule(self.batch_size, self.local_steps or 1, self.local_epochs)

    def check_clients(self, num_clients: int) -> None:
        if self.clients_per_round > num_clients:
            raise ConfigError(f"federated.clients_per_round={self.clients_per_round} exceeds "
                              f"the {num_clients} training clients")

    def local_table_names(self, tables: list[str], sharded: bool) -> list[str]:
        """The names `local_tables` selects among the model's `tables`, checked."""
        names = list(tables) if self.local_tables == "all" else list(self.local_tables)
        unknown = [name for name in names if name not in tables]
        if unknown:
            raise ConfigError(f"federated.local_tables: unknown table(s) {unknown}; the model's "
                              f"tables are {tables}")
        if names and sharded:
            raise ConfigError("federated.local_tables and federated.sharding exclude each other: "
                              "local tables live with their clients, not on the server's shards")
        return names



def check_run(federated: FederatedConfig, resume: str | None, distributed: bool) -> None:
    """Refuse combinations that the launch (one process, or torchrun ranks) cannot run."""
    if distributed and not federated.enabled:
        raise ConfigError("several ranks (torchrun) split federated cohorts; centralized "
                          "training runs in one process (set federated.enabled true)")
    if federated.sharding != "none" and not distributed:
        raise ConfigError(f"federated.sharding={federated.sharding} splits the tables across "
                          "ranks: launch with torchrun --nproc_per_node N (N >= 2)")
    if distributed and torch.device(federated.device).type != "cpu":
        raise ConfigError(f"federated.device {federated.device}: torchrun ranks run on cpu "
                          "only so far")
    if resume and not federated.enabled:
        raise ConfigError("--resume continues federated runs; this experiment is centralized")
