"""VectorizedTrainer: a round's clients step together (`federated.vectorize`).

The sequential trainer runs one small optimizer step at a time through the module's
`training_step`; at batch ~32 that step is almost all fixed cost. Here step k of every client
of the round is one batched computation: the dense part of the model runs with per-client
weights (stacked [C, ...]) through `torch.func` (`functional_call` under `vmap`), the
embedding rows of all clients are gathered at once from the cohort's compact buffers (whose
segments are disjoint, so one buffer serves every client), and one backward gives every
client its own gradients. Step k computes for the clients that have a k-th batch only
(shorter batches padded and masked), so a client whose steps are over stays as it was.

Supported so far: CTRModule's own loss and forward (any DLRM-shaped `model` with one feature
per table), plain SGD for the dense part and the tables, FedProx's term, local tables (their
rows sit in the same compact buffers); not yet: momentum, Adam, Adagrad, kept optimizer
state. `vectorization_blockers` names what stands in the
way, so a run can fall back to the sequential trainer with a reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from fltoolkit.run.config import ConfigError, FederatedConfig
from fltoolkit.training.cohort import Cohort
from fltoolkit.training.optimizer_state import as_optimizer_list
from fltoolkit.training.trainer import CohortTrainer
from fltoolkit.training.updates import ClientUpdate
from recsys.module import CTRModule
from recsys.parts import TablePart, embedding_tables

# the CTRModule methods a subclass must not override for the batched step to be its step
CONTRACT = ("training_step", "logits_and_embeddings", "loss")
ARCHES = ("dense_arch", "inter_arch", "over_arch")

MIN_PADDING_SAVED = 256  # padded rows a further bucket must save (a bucket costs ~1 ms)

log = logging.getLogger("fltk")


def vectorization_blockers(module: torch.nn.Module, keep_optimizer_state: bool) -> list[str]:
    """Why this module and these settings cannot train vectorized (empty: they can)."""
    if not isinstance(module, CTRModule):
        return [f"the module ({type(module).__name__}) is not a CTRModule"]
    blockers = [f"{type(module).__name__} overrides CTRModule.{name}" for name in CONTRACT
                if getattr(type(module), name) is not getattr(CTRModule, name)]
    if not all(hasattr(module.model, arch) for arch in ARCHES):
        blockers.append("the network has no dense_arch / inter_arch / over_arch (DLRM)")
    shared = [name for name, (_, config) in embedding_tables(module).items()
              if len(config.feature_names) != 1]
    if shared:
        blockers.append(f"tables fed by several features ({', '.join(shared)})")
    rates = sgd_learning_rates(module)
    if isinstance(rates, str):
        blockers.append(f"optimizer: {rates}")
    if keep_optimizer_state:
        blockers.append("federated.keep_optimizer_state is not vectorized yet")
    return blockers


def sgd_learning_rates(module: CTRModule) -> tuple[float, float] | str:
    """(dense lr, table lr) when `configure_optimizers` gives plain SGD with one learning rate
    per kind of parameter; otherwise why not."""
    tables = {id(weight) for weight, _ in embedding_tables(module).values()}
    rates: dict[bool, set[float]] = {False: set(), True: set()}
    for optimizer in as_optimizer_list(module.configure_optimizers()):
        if type(optimizer) is not torch.optim.SGD:
            return f"{type(optimizer).__name__} is not vectorized yet (plain SGD is)"
        for group in optimizer.param_groups:
            if group["momentum"] or group["weight_decay"] or group["maximize"]:
                return "SGD with momentum, weight decay or maximize is not vectorized yet"
            rates[True].update(group["lr"] for p in group["params"] if id(p) in tables)
            rates[False].update(group["lr"] for p in group["params"] if id(p) not in tables)
    if len(rates[False]) != 1 or len(rates[True]) != 1:
        return "several learning rates for the dense parameters or for the tables"
    return rates[False].pop(), rates[True].pop()


def trainer_for(module: torch.nn.Module, config: FederatedConfig
                ) -> Callable[..., CohortTrainer]:
    """The trainer `federated.vectorize` asks for: the vectorized one when it can serve
    (`auto`, `true`), else the sequential one (`false`; `auto` says why in one log line,
    `true` refuses with the reasons)."""
    if config.vectorize is False:
        return CohortTrainer
    blockers = vectorization_blockers(module, config.keep_optimizer_state)
    if not blockers:
        return partial(VectorizedTrainer, memory_mb=config.vectorize_memory_mb)
    if config.vectorize is True:
        raise ConfigError(f"federated.vectorize true: {'; '.join(blockers)}")
    log.info("clients train one after another (federated.vectorize auto): %s", blockers[0])
    return CohortTrainer


class VectorizedTrainer(CohortTrainer):
    """CohortTrainer whose clients take their local steps together (see the module doc)."""

    def __init__(self, *args: Any, memory_mb: float = 512, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.network = _DenseNetwork(self.module)
        self.memory_mb = memory_mb
        rates = sgd_learning_rates(self.module)  # configure_optimizers walks the module: once
        if isinstance(rates, str):
            raise ConfigError(f"the vectorized trainer cannot train this module: {rates}")
        self.dense_lr, self.table_lr = rates

    def chunk_clients(self, batch_size: int) -> int:
        """How many clients step together so that their working set (weight gradients,
        embeddings and activations of a batch) stays within `memory_mb`."""
        layers = sum(m.out_features for m in self.network.modules()
                     if isinstance(m, torch.nn.Linear))
        features, width = len(self.parts.tables), self.network.embedding_dim
        row_floats = 2 * features * width + 2 * (layers + (features + 1) ** 2
                                                 + (features + 1) * width)
        client_bytes = 4 * (3 * self.dense_size + batch_size * row_floats)
        return max(1, int(self.memory_mb * 2**20 // client_bytes))

    def _train_clients(self, cohort: Cohort) -> list[ClientUpdate]:
        dense_lr, table_lr = self.dense_lr, self.table_lr
        widest = max(step.stop - step.start for steps in cohort.steps for step in steps)
        plan = StepPlan(cohort, self.chunk_clients(widest))
        start = self._start_rows(cohort)
        rows = _FlatRows(start, cohort, self.parts.tables)
        work = rows.tables
        global_dense = torch.nn.utils.parameters_to_vector(self.parts.dense).detach()
        global_weights = {name: param.detach() for name, param in self._arch_parameters().items()}
        stacked = global_dense.expand(plan.clients, -1).clone()  # row p: client at position p
        weights = self._views(stacked)
        losses = torch.zeros(plan.clients, dtype=torch.float64)
        square_sums = torch.zeros(plan.clients, dtype=torch.float64)
        owners = ({name: plan.position[cohort.row_owners(name)] for name in work}
                  if self.proximal_mu else {})
        for stepping, buckets in plan.steps:
            pulls = self._proximal_pulls(work, start, owners, stepping)
            for bucket in buckets:
                mine = {name: value[bucket.clients] for name, value in weights.items()}
                weight_gradients, row_gradients, step_losses, samples = self._step(
                    cohort, mine, rows, bucket)
                for name, value in mine.items():
                    gradient = weight_gradients[name]
                    if self.proximal_mu:  # FedProx: grad += mu (w - w_global)
                        gradient = gradient + self.proximal_mu * (value - global_weights[name])
                    value.sub_(gradient, alpha=dense_lr)
                rows.add(bucket, row_gradients, -table_lr)
                losses[bucket.clients] += step_losses.double()
                square_sums[bucket.clients] += (samples.double().square() * bucket.mask).sum(1)
            for name, (table_rows, pull) in pulls.items():
                work[name].index_add_(0, table_rows, pull, alpha=-table_lr)
        by_slot = plan.position
        mean_losses = (losses / plan.step_counts)[by_slot]
        return self._updates(cohort, start, work, stacked.sub_(global_dense),
                             mean_losses.tolist(), square_sums[by_slot].tolist(),
                             [None] * plan.clients, by_slot.tolist())

    def _arch_parameters(self) -> dict[str, torch.nn.Parameter]:
        model = self.module.model
        return {f"{arch}.{name}": param for arch in ARCHES
                for name, param in getattr(model, arch).named_parameters()}

    def _views(self, stacked: Tensor) -> dict[str, Tensor]:
        """Each dense parameter's [C, ...] view of the clients' flat weights [C, dense size]
        (laid out like `parts.dense`, as ClientUpdate.dense): the deltas need no copy."""
        name_of = {id(param): name for name, param in self._arch_parameters().items()}
        views, offset = {}, 0
        for param in self.parts.dense:
            views[name_of[id(param)]] = stacked[:, offset:offset + param.numel()].view(
                -1, *param.shape)
            offset += param.numel()
        return views

    def _step(self, cohort: Cohort, weights: dict[str, Tensor],
              rows: _FlatRows, bucket: Bucket
              ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """One local step of a bucket's clients: the gradients of their weights and of their
        embeddings [n, W, F, E], their losses [n] and their rows' log losses [n, W].

        The forward runs vmapped over the clients; one ordinary backward of the summed losses
        gives each client its own gradients, since a client's loss depends on its weights
        only (cheaper than vmapping a grad transform)."""
        dense, label = cohort.dense[bucket.rows], cohort.label[bucket.rows]
        if dense.shape[-1] == 0:  # DLRM's dense arch needs one input; feed a constant
            dense = torch.zeros(*dense.shape[:-1], 1)
        embedded = rows.gather(bucket).requires_grad_()
        leaves = {name: value.detach().requires_grad_() for name, value in weights.items()}
        losses, samples = vmap(partial(functional_call, self.network))(
            leaves, (embedded, dense, label, bucket.mask))
        gradients = torch.autograd.grad(losses.sum(), [*leaves.values(), embedded])
        return dict(zip(leaves, gradients[:-1], strict=True)), gradients[-1], \
            losses.detach(), samples

    def _proximal_pulls(self, work: dict[str, Tensor], start: dict[str, Tensor],
                        owners: dict[str, Tensor], stepping: slice
                        ) -> dict[str, tuple[Tensor, Tensor]]:
        """FedProx's table term at the current weights: mu (w - w_start) on every row of the
        segments of the `stepping` positions (`owners`: each buffer row's position; empty
        without FedProx), as the sequential trainer adds it, to subtract times the table
        learning rate along with the data gradient."""
        pulls = {}
        for name, owner in owners.items():
            rows = torch.nonzero((owner >= stepping.start) & (owner < stepping.stop)).reshape(-1)
            pulls[name] = (rows, self.proximal_mu * (work[name][rows] - start[name][rows]))
        return pulls


class _DenseNetwork(torch.nn.Module):
    """The network's dense, interaction and over arches with CTRModule's training loss, as one
    module: a single `functional_call` runs a client's loss with that client's weights (the
    parameter names are the network's own, `dense_arch.…`)."""

    def __init__(self, module: CTRModule) -> None:
        super().__init__()
        self.dense_arch, self.inter_arch, self.over_arch = (
            getattr(module.model, arch) for arch in ARCHES)
        self.embedding_l2 = module.embedding_l2
        self.embedding_dim = module.embedding_dim

    def forward(self, embedded: Tensor, dense: Tensor, label: Tensor, mask: Tensor
                ) -> tuple[Tensor, Tensor]:
        """One client's loss on its padded batch (mean BCE plus the embedding L2 term, over
        the rows `mask` keeps) and its rows' log losses."""
        interactions = self.inter_arch(dense_features=self.dense_arch(dense),
                                       sparse_features=embedded)
        logits = self.over_arch(interactions).squeeze(-1)
        samples = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
        count = mask.sum().clamp(min=1)
        loss = (samples * mask).sum() / count
        if self.embedding_l2:
            norms = embedded.square().sum(dim=(1, 2))
            loss = loss + self.embedding_l2 * (norms * mask).sum() / count
        return loss, samples.detach()


class _FlatRows:
    """The cohort's compact buffers of every table in one tensor [sum of U, E], so a step
    gathers its clients' embeddings of all features with one index and applies their row
    gradients with one `index_add_` (per table, 15 of each cost more than the step's math).
    `tables` are views of it by table name."""

    def __init__(self, start: dict[str, Tensor], cohort: Cohort,
                 tables: dict[str, TablePart]) -> None:
        self.flat = torch.cat([start[name] for name in tables])
        sizes = [start[name].shape[0] for name in tables]
        self.tables = dict(zip(tables, self.flat.split(sizes), strict=True))
        self.offsets = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()], dtype=torch.int64)
        self.columns = [part.columns[0] for part in tables.values()]
        self.cohort = cohort

    def ids(self, bucket: Bucket) -> Tensor:
        """[n, W, F] the rows of `flat` that the bucket's batches look up."""
        return self.cohort.sparse[bucket.rows][..., self.columns] + self.offsets

    def gather(self, bucket: Bucket) -> Tensor:
        """[n, W, F, E] the bucket's embeddings."""
        return self.flat[self.ids(bucket)]

    def add(self, bucket: Bucket, gradients: Tensor, alpha: float) -> None:
        """flat[row] += alpha * gradient for the real rows of the bucket's batches: each row
        belongs to one client's segment, so every client's rows move alone."""
        ids, mask = self.ids(bucket), bucket.mask
        self.flat.index_add_(0, ids[mask].reshape(-1),
                             gradients[mask].reshape(-1, self.flat.shape[1]), alpha=alpha)


@dataclass(frozen=True)
class Bucket:
    """Clients that compute one local step together. n: clients, W: the widest batch.

    Attributes:
        clients: their positions (see StepPlan), a contiguous range.
        rows: [n, W] the cohort rows of their batches, padded with row 0.
        mask: [n, W] which of those rows are real.
    """

    clients: slice
    rows: Tensor
    mask: Tensor


class StepPlan:
    """The order in which a cohort's clients step together.

    Clients are placed by decreasing number of local steps (then decreasing rows), so the
    clients that have a k-th step are always the first positions of their chunk and their
    weights a slice of the stacked ones, not a copy. Clients differ in size by orders of
    magnitude, so a step computes for its clients only and a client whose steps are over
    stays exactly as it is. Chunks of `chunk_clients` positions take all their steps one
    chunk after another (the memory of a step follows its clients). A step's clients split
    into buckets of similar batch widths when padding all of them to the widest would waste
    more than `min_padding_saved` rows of compute.

    Attributes:
        clients: C.
        order: [C] the slot at each position; position: [C] the position of each slot.
        step_counts: [C] local steps of the client at each position (float64).
        steps: per chunk and local step k, (the positions that have a k-th step, their
            buckets).
    """

    def __init__(self, cohort: Cohort, chunk_clients: int,
                 min_padding_saved: int = MIN_PADDING_SAVED) -> None:
        counts = np.array([len(steps) for steps in cohort.steps], dtype=np.int64)
        order = np.lexsort((-np.asarray(cohort.samples_trained), -counts))
        self.clients = len(order)
        self.order = torch.from_numpy(order)
        self.position = torch.from_numpy(np.argsort(order))
        counts = counts[order]
        self.step_counts = torch.from_numpy(counts).double()
        batches = [cohort.steps[slot] for slot in order.tolist()]
        starts = np.fromiter((b.start for steps in batches for b in steps), dtype=np.int64)
        widths = np.fromiter((b.stop - b.start for steps in batches for b in steps),
                             dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.steps: list[tuple[slice, list[Bucket]]] = []
        for lo in range(0, self.clients, chunk_clients):
            hi = min(lo + chunk_clients, self.clients)
            for k in range(int(counts[lo])):
                stop = lo + int((counts[lo:hi] > k).sum())
                entries = first[lo:stop] + k
                self.steps.append((slice(lo, stop), _buckets(
                    starts[entries], widths[entries], lo, min_padding_saved)))


def _buckets(starts: np.ndarray, widths: np.ndarray, first: int, min_saved: int
             ) -> list[Bucket]:
    """Contiguous ranges of the step's clients (at positions `first`, ...), each padded to
    its own widest batch: a range ends where the widest batch of all later clients is at
    most half as wide, if that saves at least `min_saved` padded rows."""
    widest_after = np.maximum.accumulate(widths[::-1])[::-1]  # non-increasing
    bounds = [0]
    while True:
        cap = widest_after[bounds[-1]]
        cut = int(np.searchsorted(-widest_after, -(cap // 2)))
        if cut >= len(widths) or (len(widths) - cut) * (cap - widest_after[cut]) < min_saved:
            break
        bounds.append(cut)
    bounds.append(len(widths))
    buckets = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        offsets = torch.arange(int(widest_after[lo]))
        mask = offsets < torch.from_numpy(widths[lo:hi])[:, None]
        rows = torch.where(mask, torch.from_numpy(starts[lo:hi])[:, None] + offsets, 0)
        buckets.append(Bucket(slice(first + lo, first + hi), rows, mask))
    return buckets
