"""Typed sections of an experiment that are fltk's own (not a model's or a datamodule's).

LightningCLI reads these signatures, so every key is documented, typed, overridable on the
command line (`--federated.rounds 10`) and rejected with its name when misspelled.
"""

from __future__ import annotations

from typing import Literal

from fltoolkit.faults import Faults
from fltoolkit.selection import ClientSelector, UniformSelector
from fltoolkit.strategies import FedAvg, Strategy


class ConfigError(ValueError):
    """A configuration value that parses but cannot be used; the message names the key."""


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
        strategy: the server aggregation, by class_path: fltoolkit.strategies.FedAvg (default),
            FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, QFedAvg.
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
        sharding: how the server's embedding tables are split across torchrun ranks with
            TorchRec (`table_wise`: each table on one rank; `column_wise`: every table's
            columns split across the ranks); `none` keeps whole tables on every rank.
    """

    def __init__(
        self,
        enabled: bool = True,
        rounds: int = 1000,
        clients_per_round: int = 20,
        batch_size: int = 32,
        local_epochs: int | None = 1,
        local_steps: int | None = None,
        strategy: Strategy | None = None,
        selector: ClientSelector | None = None,
        local_tables: list[str] | Literal["all"] | None = None,
        keep_optimizer_state: bool = False,
        eval_interval: int = 100,
        checkpoint_interval: int = 100,
        keep_last: int = 2,
        reject_norm_ratio: float | None = None,
        faults: Faults | None = None,
        sharding: Literal["none", "table_wise", "column_wise"] = "none",
    ) -> None:
        for key, value in (("rounds", rounds), ("clients_per_round", clients_per_round),
                           ("batch_size", batch_size), ("eval_interval", eval_interval),
                           ("checkpoint_interval", checkpoint_interval),
                           ("keep_last", keep_last)):
            if value < 1:
                raise ValueError(f"federated.{key} must be >= 1, got {value}")
        if (local_epochs is None) == (local_steps is None):
            raise ValueError("set exactly one of federated.local_epochs and federated.local_steps")
        if (local_epochs or 1) < 1 or (local_steps or 1) < 1:
            raise ValueError("federated.local_epochs and federated.local_steps must be >= 1")
        self.enabled = enabled
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.strategy = strategy or FedAvg()
        self.selector = selector or UniformSelector()
        self.local_tables = local_tables or []
        self.keep_optimizer_state = keep_optimizer_state
        self.eval_interval = eval_interval
        self.checkpoint_interval = checkpoint_interval
        self.keep_last = keep_last
        if reject_norm_ratio is not None and reject_norm_ratio <= 1:
            raise ValueError(f"federated.reject_norm_ratio must be > 1, got {reject_norm_ratio}")
        self.reject_norm_ratio = reject_norm_ratio
        self.faults = faults or Faults()
        self.sharding = sharding
