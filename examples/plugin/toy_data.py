"""ToyClicksDataModule: a seeded, planted click log whose users are the federated clients.

It stands in for a user's own data: `load()` is the one method a datamodule must write. The
click probabilities are known, so the run can be read against the best achievable AUC.
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.base import CTRDataModule, FeatureSpec, PreparedData
from datamodules.clients import ClientTable
from recsys.metrics import auc

SPARSE = ["user", "item", "category"]
DENSE = ["price"]


class ToyClicksDataModule(CTRDataModule):
    """Impressions of `num_items` items (in `num_categories` categories) to `num_users` users.

    Each user has a taste per category and each item a bias and a price; a click is drawn with
    probability sigmoid(-1.5 + taste[user, category] + bias[item] - 0.5 * price). User activity
    follows a power law, so client sizes are as uneven as in real logs. The last `test_fraction`
    of the time span is the test split.

    Args:
        num_rows: impressions to generate.
        num_users / num_items / num_categories: vocabulary sizes.
        test_fraction: share of the time span held out as test.
        **kwargs: CTRDataModule's (batch sizes, min_client_samples, seed).
    """

    def __init__(
        self,
        num_rows: int = 5000,
        num_users: int = 200,
        num_items: int = 100,
        num_categories: int = 8,
        test_fraction: float = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if min(num_rows, num_users, num_items, num_categories) < 1:
            raise ValueError("data.num_rows, num_users, num_items, num_categories must be >= 1")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        self.num_rows = num_rows
        self.num_users, self.num_items = num_users, num_items
        self.num_categories = num_categories
        self.test_fraction = test_fraction

    def load(self) -> PreparedData:
        g = torch.Generator().manual_seed(self.seed)
        n, users, items = self.num_rows, self.num_users, self.num_items
        taste = torch.randn(users, self.num_categories, generator=g)
        category = torch.randint(self.num_categories, (items,), generator=g)
        bias = 0.5 * torch.randn(items, generator=g)
        price = torch.randn(items, generator=g)  # already standardized
        activity = torch.arange(1, users + 1, dtype=torch.float64).pow(-0.8)
        user = torch.multinomial(activity, n, replacement=True, generator=g)
        item = torch.randint(items, (n,), generator=g)
        time = torch.rand(n, generator=g)
        logit = -1.5 + taste[user, category[item]] + bias[item] - 0.5 * price[item]
        probability = torch.sigmoid(logit)
        label = torch.bernoulli(probability, generator=g)

        sparse = torch.stack([user, item, category[item]], dim=1)
        dense = price[item].unsqueeze(1)
        is_test = time >= 1.0 - self.test_fraction
        train, test = (_by_client(dense[m], sparse[m], label[m], user[m]) for m in
                       (~is_test, is_test))
        features = FeatureSpec(
            sparse=SPARSE, cardinalities=[users, items, self.num_categories], dense=DENSE,
            label_mean=float(label[~is_test].mean()),
        )
        return PreparedData(train, test, features,
                            info={"oracle_auc": auc(probability[is_test], label[is_test])})


def _by_client(dense: Tensor, sparse: Tensor, label: Tensor, client: Tensor) -> ClientTable:
    """ClientTable wants rows grouped by client: one stable sort, no per-row Python."""
    order = torch.argsort(client, stable=True)
    return ClientTable.from_sorted(dense[order].float(), sparse[order], label[order].float(),
                                   client[order])
