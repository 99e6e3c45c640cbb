"""ClickLogDataModule: the options Taobao and Criteo share, stated and checked once.

Both preprocess raw files once into a cache and may deal their rows to synthetic clients; the
arguments for that (and the cache folder's default) belong to one constructor, so the two
datasets cannot drift apart in names, defaults or validation.
"""

from __future__ import annotations

import os
from pathlib import Path

from datamodules.base import CTRDataModule
from datamodules.cache import PreparedCache
from datamodules.clients import Partitioner, config_partitioner


class ClickLogDataModule(PreparedCache, CTRDataModule):
    """Base of the click-log datamodules: a cache folder and how rows are dealt to clients.

    A subclass names its `partitions` (the choices of `partition`) and, if its rows carry
    their own client (a user id), the `natural_partition` that uses it without a Partitioner.

    Args:
        partition: how rows are dealt to clients, one of the subclass's `partitions`: its
            natural partition, or `iid`, `dirichlet` (label skew, `alpha`) or `power_law`
            (Zipf-like sizes, `exponent`), seeded by `seed`; see datamodules.clients.
        num_clients, alpha, exponent: passed to the Partitioner (unused by the natural one).
        cache_dir: where generated data and preprocessed parquet caches live (default:
            $FLTK_CACHE, else ~/.cache/fltk).
        batch_size, eval_batch_size, min_client_samples, seed: see CTRDataModule.
    """

    partitions: tuple[str, ...] = ()
    natural_partition: str | None = None

    def __init__(
        self,
        partition: str,
        num_clients: int = 1000,
        alpha: float = 0.5,
        exponent: float = 1.0,
        cache_dir: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 65536,
        min_client_samples: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, min_client_samples, seed)
        self.partitioner: Partitioner | None = (
            None if partition == self.natural_partition
            else config_partitioner(partition, num_clients, alpha, exponent, seed,
                                    self.partitions))
        self.cache_dir = Path(cache_dir or os.environ.get("FLTK_CACHE")
                              or Path.home() / ".cache" / "fltk")
