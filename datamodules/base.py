"""CTRDataModule: the Lightning face of a preprocessed click log.

A subclass only says how to turn its raw files into ClientTables (train, test and, if it has
one, validation) and a FeatureSpec; this base class owns what every dataset shares: the client
filter, the seeded batch order, and loaders that slice the tables (no per-row Python, no
collate of samples).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.clients import Batch, ClientTable

log = logging.getLogger("fltk.data")


class DataError(ValueError):
    """Bad input data (missing file, missing column, malformed content); the message names it."""


@dataclass(frozen=True)
class FeatureSpec:
    """What a model needs to know about the features.

    Attributes:
        sparse: sparse feature names, in the column order of `ClientTable.sparse`.
        cardinalities: vocabulary size of each sparse feature (indices are 0..size-1).
        dense: dense feature names, in the column order of `ClientTable.dense`.
        label_mean: the training split's click rate, if known (a model may start its output
            bias at its logit: CTRModule's `prior_bias`).
    """

    sparse: list[str]
    cardinalities: list[int]
    dense: list[str] = field(default_factory=list)
    label_mean: float | None = None

    def __post_init__(self) -> None:
        if len(self.sparse) != len(self.cardinalities):
            raise ValueError("FeatureSpec: one cardinality per sparse feature is required")
        if self.label_mean is not None and not 0.0 < self.label_mean < 1.0:
            raise ValueError(f"FeatureSpec: label_mean must be in (0, 1), got {self.label_mean}")


@dataclass
class PreparedData:
    """What `CTRDataModule.load` returns: the splits, their features, and facts for reports.

    `validation` is the split for choosing settings (early stopping, learning rates), so the
    test split is not tuned on; None: the datamodule has none. A keyword field, so plug-ins
    returning `PreparedData(train, test, features, info)` need no change.
    """

    train: ClientTable
    test: ClientTable
    features: FeatureSpec
    info: dict[str, Any] = field(default_factory=dict)
    validation: ClientTable | None = field(default=None, kw_only=True)


class _BatchSampler(Sampler[Tensor]):
    """Yields index tensors of `batch_size` rows: a seeded permutation, or in order."""

    def __init__(self, num_rows: int, batch_size: int, shuffle: bool, seed: int) -> None:
        self.num_rows, self.batch_size, self.shuffle = num_rows, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Tensor]:
        if self.shuffle:
            order = torch.randperm(self.num_rows, generator=self.generator)
        else:
            order = torch.arange(self.num_rows)
        yield from order.split(self.batch_size)

    def __len__(self) -> int:
        return -(-self.num_rows // self.batch_size)


class _TableRows(Dataset[Batch]):
    """Maps an index tensor to a Batch of those rows (one gather per tensor)."""

    def __init__(self, table: ClientTable, with_groups: bool) -> None:
        self.table = table
        self.groups = table.row_clients() if with_groups else None

    def __getitem__(self, index: Tensor) -> Batch:
        return self.table.rows(index, self.groups)

    def __len__(self) -> int:
        return self.table.num_rows


class CTRDataModule(L.LightningDataModule):
    """Base of fltk's datamodules: preprocessed splits as ClientTables, sliced into batches.

    Args:
        batch_size: rows per training mini-batch (centralized and per client).
        eval_batch_size: rows per evaluation batch (evaluation has no gradients, so large).
        min_client_samples: clients with fewer training rows are dropped (and counted in the log).
        seed: drives data generation (synthetic data) and the batch order.
    """

    def __init__(
        self,
        batch_size: int = 256,
        eval_batch_size: int = 65536,
        min_client_samples: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if min_client_samples < 0:
            raise ValueError(f"data.min_client_samples must be >= 0, got {min_client_samples}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.min_client_samples = min_client_samples
        self.seed = seed
        self._data: PreparedData | None = None

    @abstractmethod
    def load(self) -> PreparedData:
        """Preprocess (or read from cache) and return the splits."""

    def setup(self, stage: str | None = None) -> None:
        if self._data is not None:
            return
        data = self.load()
        before = data.train.num_clients
        train = data.train.drop_small_clients(self.min_client_samples)
        dropped = before - train.num_clients
        num_validation = 0 if data.validation is None else data.validation.num_rows
        data.info.update(
            num_train=train.num_rows,
            num_validation=num_validation,
            num_test=data.test.num_rows,
            num_clients=train.num_clients,
            dropped_clients=dropped,
        )
        log.info(
            "data: %d train rows, %s, %d test rows, %d clients (%d dropped with < %d rows)",
            train.num_rows,
            "no validation split" if data.validation is None
            else f"{num_validation} validation rows",
            data.test.num_rows, train.num_clients, dropped, self.min_client_samples,
        )
        splits = (("training", train), ("validation", data.validation), ("test", data.test))
        empty = [name for name, table in splits if table is not None and table.num_rows == 0]
        if empty:
            raise DataError(f"no {empty[0]} rows left after preprocessing "
                            f"(min_client_samples={self.min_client_samples})")
        self._data = PreparedData(train, data.test, data.features, data.info,
                                  validation=data.validation)

    @property
    def data(self) -> PreparedData:
        if self._data is None:
            raise RuntimeError("call setup() before using the datamodule's data")
        return self._data

    @property
    def feature_spec(self) -> FeatureSpec:
        return self.data.features

    def train_dataloader(self) -> DataLoader:
        table = self.data.train
        sampler = _BatchSampler(table.num_rows, self.batch_size, shuffle=True, seed=self.seed)
        return DataLoader(_TableRows(table, with_groups=False), sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """The validation split (the test split for a datamodule without one)."""
        validation = self.data.validation
        return self._eval_loader(self.data.test if validation is None else validation)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.data.test)

    def _eval_loader(self, table: ClientTable) -> DataLoader:
        sampler = _BatchSampler(table.num_rows, self.eval_batch_size, shuffle=False, seed=0)
        return DataLoader(_TableRows(table, with_groups=True), sampler=sampler, batch_size=None)
