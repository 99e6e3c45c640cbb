"""The part of an update one rank's shards cover, and the whole-update norm it keeps."""

from __future__ import annotations

import pytest
import torch

from fltoolkit.server.tables import ShardedServerTables
from fltoolkit.strategies import QFedAvg
from fltoolkit.strategies.base import ServerModel
from fltoolkit.strategies.clipping import clipped
from fltoolkit.training.updates import ClientUpdate, SparseRows


class _ColumnsOneToThree:
    """Stands in for recsys.sharding.ShardedTables on a rank holding columns 1:3 of `ad`."""

    names = ["ad", "user"]

    def __init__(self) -> None:
        self.shard = torch.zeros(5, 2)

    def owned(self) -> dict[str, tuple[int, torch.Tensor]]:
        return {"ad": (1, self.shard)}


def _update() -> ClientUpdate:
    ad = SparseRows(torch.tensor([0, 4]), torch.tensor([[1.0, 2.0, 2.0, 0.0],
                                                        [0.0, 0.0, 4.0, 0.0]]))
    user = SparseRows(torch.tensor([1]), torch.tensor([[0.0, 0.0, 0.0, 2.0]]))
    return ClientUpdate(client=3, num_samples=2, loss=0.5, dense=torch.tensor([2.0]),
                        tables={"ad": ad, "user": user})


def test_owned_part_keeps_this_ranks_columns_and_the_whole_norm():
    tables = ShardedServerTables(_ColumnsOneToThree())
    part = tables.owned_part(_update())
    assert set(part.tables) == {"ad"}
    assert torch.equal(part.tables["ad"].values, torch.tensor([[2.0, 2.0], [0.0, 4.0]]))
    # 2^2 (dense) + 1 + 4 + 4 + 16 (ad) + 4 (user) = 33, not the part's 4 + 24 = 28
    assert part.squared_norm() == 33.0 and part.norm() == pytest.approx(33 ** 0.5)
    assert clipped(part, 33 ** 0.5 / 2).squared_norm() == pytest.approx(33 / 4)
    assert tables.owned() == {"ad": tables.tables.shard}


def test_qfedavg_weighs_a_part_by_the_whole_update():
    """q-FedAvg's step on the owned part equals the same columns of its step on the whole."""
    whole = ServerModel(torch.zeros(1), {"ad": torch.zeros(5, 4), "user": torch.zeros(2, 4)})
    QFedAvg(q=1.0, client_lr=0.5).aggregate([_update()], whole)
    tables = ShardedServerTables(_ColumnsOneToThree())
    part = ServerModel(torch.zeros(1), tables.owned())
    QFedAvg(q=1.0, client_lr=0.5).aggregate([tables.owned_part(_update())], part)
    assert torch.equal(part.tables["ad"], whole.tables["ad"][:, 1:3])
    assert torch.equal(part.dense, whole.dense)
