"""Prepared parquet splits -> the contiguous tensors a ClientTable holds.

Both datamodules store their splits as parquet with a `label` column and one column per
feature; reading them back the same way keeps dtypes and layout identical across datasets.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import Tensor

Rows = tuple[Tensor, Tensor, Tensor]  # dense [N, D] float32, sparse [N, F] int64, label [N]


def frame_tensor(frame: pl.DataFrame, columns: list[str], dtype: type) -> Tensor:
    """Columns of a frame as one contiguous, writable [N, len(columns)] tensor."""
    if not columns:  # select() of no columns would lose the row count
        return torch.zeros((frame.height, 0), dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    array = frame.select(columns).to_numpy()
    return torch.from_numpy(np.require(array, dtype, requirements=["C", "W"]))


def labelled_rows(frame: pl.DataFrame, dense: list[str], sparse: list[str]) -> Rows:
    """The dense, sparse and label tensors of a prepared split."""
    return (frame_tensor(frame, dense, np.float32), frame_tensor(frame, sparse, np.int64),
            frame_tensor(frame, ["label"], np.float32).reshape(-1))
