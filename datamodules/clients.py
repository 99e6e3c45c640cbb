"""Clients' data: the ClientTable layout, and partitioners dealing rows to clients.

Every user of a click log is a federated client. Keeping all rows in a few contiguous
tensors sorted by client means a client's data is a zero-copy slice (`offsets[c]:offsets[c+1]`)
and a centralized batch is one fancy-index, so no data path iterates over rows in Python.

Data without natural users (Criteo), or a study of another skew, deals rows to clients with a
partitioner: a pure, seeded function returning `client_of_row`, an [N] int64 array of client
indices in 0..num_clients-1, so the split can be reproduced, described (`describe`) and turned
into a ClientTable (`to_client_table`) without any per-row Python.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Literal, cast, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor


@dataclass(frozen=True)
class ClientTable:
    """Rows of one split, grouped by client.

    N: number of rows, F: number of sparse features, D: number of dense features,
    C: number of clients.

    Attributes:
        dense: [N, D] float32 dense features.
        sparse: [N, F] int64 vocabulary indices, one column per sparse feature.
        label: [N] float32 click labels (0 or 1).
        offsets: [C + 1] int64; client c owns rows offsets[c]:offsets[c + 1].
        client_ids: [C] int64 raw client keys (the user id for Taobao).
    """

    dense: Tensor
    sparse: Tensor
    label: Tensor
    offsets: Tensor
    client_ids: Tensor

    def __post_init__(self) -> None:
        n = self.label.shape[0]
        if self.dense.shape[0] != n or self.sparse.shape[0] != n:
            raise ValueError(
                f"ClientTable: dense {tuple(self.dense.shape)}, sparse {tuple(self.sparse.shape)} "
                f"and label {tuple(self.label.shape)} disagree on the number of rows"
            )
        if self.offsets.shape[0] != self.client_ids.shape[0] + 1 or int(self.offsets[-1]) != n:
            raise ValueError("ClientTable: offsets must have C + 1 entries ending at the row count")

    @property
    def num_rows(self) -> int:
        return int(self.label.shape[0])

    @property
    def num_clients(self) -> int:
        return int(self.client_ids.shape[0])

    def client_sizes(self) -> Tensor:
        """[C] number of rows of each client."""
        return self.offsets[1:] - self.offsets[:-1]

    def client_rows(self, client: int) -> slice:
        """The row range of one client, for zero-copy slicing."""
        return slice(int(self.offsets[client]), int(self.offsets[client + 1]))

    def row_clients(self) -> Tensor:
        """[N] position of each row's client in this table (0..C-1), e.g. for GAUC groups."""
        return torch.repeat_interleave(torch.arange(self.num_clients), self.client_sizes())

    def rows(self, index: Tensor | slice, groups: Tensor | None = None) -> Batch:
        """The rows at `index` (a slice is a view, a tensor a gather) as a Batch.

        `groups` ([N], e.g. from `row_clients()`) is sliced alongside when given.
        """
        group = None if groups is None else groups[index]
        return Batch(self.dense[index], self.sparse[index], self.label[index], group)

    def drop_small_clients(self, min_rows: int) -> ClientTable:
        """Keep only clients with at least `min_rows` rows (FedScale's `filter_less`)."""
        keep = self.client_sizes() >= min_rows
        if bool(keep.all()):
            return self
        row_keep = torch.repeat_interleave(keep, self.client_sizes())
        sizes = self.client_sizes()[keep]
        offsets = torch.zeros(sizes.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(sizes, 0, out=offsets[1:])
        return ClientTable(
            dense=self.dense[row_keep],
            sparse=self.sparse[row_keep],
            label=self.label[row_keep],
            offsets=offsets,
            client_ids=self.client_ids[keep],
        )

    @staticmethod
    def from_sorted(
        dense: Tensor, sparse: Tensor, label: Tensor, client_key: Tensor
    ) -> ClientTable:
        """Build from rows already sorted by `client_key` ([N] int64, one key per row)."""
        if client_key.numel() and bool((client_key[1:] < client_key[:-1]).any()):
            raise ValueError("ClientTable.from_sorted: rows are not sorted by client")
        client_ids, sizes = torch.unique_consecutive(client_key, return_counts=True)
        offsets = torch.zeros(client_ids.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(sizes, 0, out=offsets[1:])
        return ClientTable(dense, sparse, label, offsets, client_ids)


@dataclass
class Batch:
    """A mini-batch. B: batch size; shapes as in ClientTable."""

    dense: Tensor
    sparse: Tensor
    label: Tensor
    group: Tensor | None = None  # [B] client of each row, for per-user metrics

    def __len__(self) -> int:
        return int(self.label.shape[0])


# ---------------------------------------------------------------- partitioners
log = logging.getLogger("fltk.data")

Kind = Literal["iid", "dirichlet", "key", "power_law"]

# Argument rules shared by the functions and Partitioner, so a rule is stated once.
_RULES = {
    "num_rows": (lambda v: v >= 0, ">= 0"),
    "num_clients": (lambda v: v >= 1, ">= 1"),
    "alpha": (lambda v: 0 < v < math.inf, "> 0 and finite"),
    "exponent": (lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "min_size": (lambda v: v >= 0, ">= 0"),
}


def _check(**params: float | None) -> None:
    """Raise a ValueError naming the first argument that breaks its rule in `_RULES`."""
    for name, value in params.items():
        ok, rule = _RULES[name]
        if value is None or not ok(value):
            raise ValueError(f"partition: {name} must be {rule}, got {value!r}")


def _round_to_total(values: np.ndarray, total: int) -> np.ndarray:
    """Integers summing exactly to `total`: floors, plus one for the largest fractional parts.

    `values` must sum to `total` (up to float error); rounding moves each by less than one row.
    """
    counts = np.floor(values).astype(np.int64)
    deficit = int(total - counts.sum())
    counts[np.argsort(counts - values, kind="stable")[:deficit]] += 1
    return counts


def iid(num_rows: int, num_clients: int, seed: int) -> np.ndarray:
    """A random permutation dealt round-robin: client sizes differ by at most one row."""
    _check(num_rows=num_rows, num_clients=num_clients)
    client_of_row = np.empty(num_rows, dtype=np.int64)
    client_of_row[np.random.default_rng(seed).permutation(num_rows)] = (
        np.arange(num_rows) % num_clients
    )
    return client_of_row


def dirichlet(labels: npt.ArrayLike, num_clients: int, alpha: float, seed: int) -> np.ndarray:
    """Label skew: each class's rows are split among clients in proportions ~ Dir(alpha).

    The per-class form (Yurochkin et al. 2019) of the label skew of Hsu et al. (2019), who draw
    each client's class mix instead; both give each class to a few clients (skewed label mixes)
    for a small alpha and approach IID for a large one.
    Each class's rows are shuffled first, so the split is independent of the row order, and its
    row counts are the proportions rounded to integers summing to the class size.

    Empty clients are allowed, not redrawn: with a small alpha and many clients some client
    may get no row at all. Redrawing until none is empty would bias the draw toward larger
    alpha and may never end; `describe` reports them as `empty_clients` and
    `to_client_table` drops them.
    """
    _check(num_clients=num_clients, alpha=alpha)
    rng = np.random.default_rng(seed)
    _, label_class = np.unique(np.asarray(labels), return_inverse=True)
    client_of_row = np.empty(label_class.shape[0], dtype=np.int64)
    for cls in range(int(label_class.max(initial=-1)) + 1):
        rows = rng.permutation(np.flatnonzero(label_class == cls))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        counts = _round_to_total(shares * rows.shape[0], rows.shape[0])
        client_of_row[rows] = np.repeat(np.arange(num_clients), counts)
    return client_of_row


def by_key(keys: npt.ArrayLike) -> np.ndarray:
    """One client per distinct key (a user or device id): the key's rank among distinct keys."""
    return np.unique(np.asarray(keys), return_inverse=True)[1].astype(np.int64).reshape(-1)


def power_law_sizes(num_rows: int, num_clients: int, exponent: float, min_size: int = 1
                    ) -> np.ndarray:
    """[num_clients] client sizes, largest first: size of rank r proportional to r^-exponent.

    Clients whose share would fall below `min_size` are raised to it and the others keep
    exact proportionality with a smaller constant (water-filling), so the head of the curve
    keeps its slope. The real-valued sizes are then rounded to integers summing to num_rows
    (floors, plus one row for the largest fractional parts).
    """
    _check(num_rows=num_rows, num_clients=num_clients, exponent=exponent, min_size=min_size)
    if num_rows < num_clients * min_size:
        raise ValueError(
            f"partition: num_rows must be >= num_clients * min_size = {num_clients * min_size}, "
            f"got {num_rows}"
        )
    weight = np.arange(1, num_clients + 1, dtype=np.float64) ** -exponent
    # If the m largest clients are proportional and the rest sit at min_size, the constant is
    # scale[m - 1]; the largest m whose own smallest size still reaches min_size is the answer.
    unfloored = np.arange(1, num_clients + 1)
    scale = (num_rows - (num_clients - unfloored) * min_size) / np.cumsum(weight)
    m = int(np.flatnonzero(scale * weight >= min_size)[-1]) + 1
    sizes = np.where(unfloored <= m, np.maximum(scale[m - 1] * weight, min_size), min_size)
    return _round_to_total(sizes, num_rows)


def power_law(num_rows: int, num_clients: int, exponent: float, seed: int, min_size: int = 1
              ) -> np.ndarray:
    """Zipf-like client sizes (`power_law_sizes`; client 0 is the largest), rows drawn at random.

    exponent 0 gives equal sizes (within one row); larger exponents concentrate the data in a
    few clients (the long tail of small clients seen in cross-device data).
    """
    sizes = power_law_sizes(num_rows, num_clients, exponent, min_size)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_clients), sizes))


def to_client_table(dense: Tensor, sparse: Tensor, label: Tensor, client_of_row: npt.ArrayLike
                    ) -> ClientTable:
    """Rows grouped by partition client (stable: each client keeps the input row order).

    Clients without rows are absent; `client_ids` holds each kept client's partition index.
    """
    client_of_row = np.asarray(client_of_row, dtype=np.int64)
    if client_of_row.shape != (label.shape[0],):
        raise ValueError(
            f"to_client_table: client_of_row has shape {client_of_row.shape}, "
            f"expected ({label.shape[0]},)"
        )
    order = np.argsort(client_of_row, kind="stable")
    index = torch.from_numpy(order)
    return ClientTable.from_sorted(
        dense[index], sparse[index], label[index], torch.from_numpy(client_of_row[order])
    )


def _gini(sizes: np.ndarray) -> float:
    """Gini coefficient: 0 when all sizes are equal, toward 1 when one client has everything."""
    total = sizes.sum()
    if total == 0:
        return 0.0
    n = sizes.shape[0]
    rank = np.arange(1, n + 1)
    return float(((2 * rank - n - 1) * np.sort(sizes)).sum() / (n * total))


def describe(client_of_row: npt.ArrayLike, num_clients: int, labels: npt.ArrayLike | None = None
             ) -> dict[str, float]:
    """Facts about a partition for the log: how unequal the clients' sizes and label mixes are.

    Sizes count every client (an empty one is size 0). With `labels` (clicks: positive = > 0),
    per-client figures cover the non-empty clients: mean and std of the click rate, the total
    variation distance of the client's label mix from the global one (mean and max), and the
    median share of the client's most common label (1.0 = single-label clients).
    """
    _check(num_clients=num_clients)
    client_of_row = np.asarray(client_of_row, dtype=np.int64).reshape(-1)
    if client_of_row.size and not 0 <= client_of_row.min() <= client_of_row.max() < num_clients:
        raise ValueError(f"describe: client_of_row must be in 0..{num_clients - 1}")
    sizes = np.bincount(client_of_row, minlength=num_clients)
    facts: dict[str, float] = {
        "num_rows": int(client_of_row.shape[0]),
        "num_clients": num_clients,
        "empty_clients": int((sizes == 0).sum()),
        "size_min": int(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_mean": float(sizes.mean()),
        "size_p90": float(np.percentile(sizes, 90)),
        "size_max": int(sizes.max()),
        "size_gini": _gini(sizes),
    }
    if labels is None:
        return facts
    labels = np.asarray(labels).reshape(-1)
    if labels.shape != client_of_row.shape:
        raise ValueError(f"describe: {labels.shape[0]} labels for {client_of_row.shape[0]} rows")
    kept = sizes > 0
    classes, label_class = np.unique(labels, return_inverse=True)
    num_classes = classes.shape[0]
    counts = np.bincount(client_of_row * num_classes + label_class,
                         minlength=num_clients * num_classes).reshape(num_clients, num_classes)
    mix = counts[kept] / sizes[kept, None]
    tv = 0.5 * np.abs(mix - np.bincount(label_class) / labels.shape[0]).sum(axis=1)
    rate = np.bincount(client_of_row, weights=labels > 0, minlength=num_clients)[kept] / sizes[kept]
    facts.update(
        positive_rate=float((labels > 0).mean()),
        client_positive_rate_mean=float(rate.mean()),
        client_positive_rate_std=float(rate.std()),
        label_tv_mean=float(tv.mean()),
        label_tv_max=float(tv.max()),
        majority_share_median=float(np.median(mix.max(axis=1))),
    )
    return facts


@dataclass(frozen=True)
class Partitioner:
    """Config front: which partitioner and its arguments, checked when built (before any data).

    `num_clients` is required except for kind "key", whose clients are the distinct keys;
    `alpha` is used by "dirichlet", `exponent` and `min_size` by "power_law".
    """

    kind: Kind
    num_clients: int | None = None
    alpha: float = 0.5
    exponent: float = 1.0
    min_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in get_args(Kind):
            raise ValueError(f"partition: kind must be one of {get_args(Kind)}, got {self.kind!r}")
        if self.kind == "key" and self.num_clients is not None:
            raise ValueError("partition: num_clients must not be set for kind 'key' "
                             "(one client per distinct key)")
        if self.kind != "key":
            _check(num_clients=self.num_clients)
        _check(alpha=self.alpha, exponent=self.exponent, min_size=self.min_size)

    def __call__(self, labels: npt.ArrayLike, keys: npt.ArrayLike | None = None) -> np.ndarray:
        """client_of_row for rows with these labels (and, for kind "key", these keys)."""
        num_rows = np.asarray(labels).reshape(-1).shape[0]
        if self.kind == "key":
            if keys is None or np.asarray(keys).reshape(-1).shape[0] != num_rows:
                raise ValueError(f"partition: kind 'key' needs keys, one per row ({num_rows})")
            return by_key(keys)
        assert self.num_clients is not None  # checked in __post_init__; narrows the type
        if self.kind == "dirichlet":
            return dirichlet(labels, self.num_clients, self.alpha, self.seed)
        if self.kind == "power_law":
            return power_law(num_rows, self.num_clients, self.exponent, self.seed, self.min_size)
        return iid(num_rows, self.num_clients, self.seed)


def config_partitioner(kind: str, num_clients: int, alpha: float, exponent: float, seed: int,
                       allowed: tuple[str, ...]) -> Partitioner:
    """A Partitioner from a datamodule's arguments; errors name the `data.` config key."""
    if kind not in allowed:
        raise ValueError(f"data.partition must be one of {allowed}, got {kind!r}")
    try:
        return Partitioner(cast(Kind, kind), num_clients, alpha, exponent, seed=seed)
    except ValueError as e:
        raise ValueError(f"data.{str(e).removeprefix('partition: ')}") from e


def partition_splits(partitioner: Partitioner, splits: dict[str, tuple[Tensor, Tensor, Tensor]]
                     ) -> tuple[dict[str, ClientTable], dict[str, float]]:
    """ClientTables of the "train", "test" and (if given) "validation" splits' (dense, sparse,
    label) rows, and facts.

    Test and validation rows get their own draws of the same partition (seeds + 1 and + 2, no
    minimum size), so every client's per-client metrics have rows to work on: without a user id
    nothing links a client's evaluation rows to its train rows, so the draws are independent.
    The facts are `describe` of the train partition, keys prefixed `partition_`, and are logged.
    """
    draws = {"train": partitioner}
    for offset, split in enumerate(("test", "validation"), start=1):
        draws[split] = dataclasses.replace(partitioner, seed=partitioner.seed + offset, min_size=0)
    tables, facts = {}, {}
    for split, (dense, sparse, label) in splits.items():
        client_of_row = draws[split](label.numpy())
        tables[split] = to_client_table(dense, sparse, label, client_of_row)
        if split == "train":
            assert partitioner.num_clients is not None  # kind "key" needs keys: not used here
            facts = describe(client_of_row, partitioner.num_clients, label.numpy())
            log.info("data: %s partition of train: %s", partitioner.kind,
                     ", ".join(f"{k}={v:.4g}" for k, v in facts.items()))
    return tables, {f"partition_{k}": v for k, v in facts.items()}
