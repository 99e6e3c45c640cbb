"""VectorizedTrainer: a round's clients step together (`federated.vectorize`).

The sequential trainer runs one small optimizer step at a time through the module's
`training_step`; at batch ~32 that step is almost all fixed cost. Here step k of every client
of the round is one batched computation: the dense part of the model runs with per-client
weights (stacked [C, ...]) through `torch.func` (`functional_call` under `vmap`), the
embedding rows of all clients are gathered at once from the cohort's compact buffers (whose
segments are disjoint, so one buffer serves every client), and one backward gives every
client its own gradients. Step k computes for the clients that have a k-th batch only
(shorter batches padded and masked), so a client whose steps are over stays as it was; the
clients of a step run in buckets of similar batch widths, and large cohorts in chunks that
fit `federated.vectorize_memory_mb` (step_plan.py).

Each client's local optimizers step its rows of the stacked weights and of the buffers, with
their state stacked the same way (stacked_optimizers.py: torch.optim's math, including what
it does with the tables' sparse gradients), and a client's kept optimizer state goes in and
out in ClientOptimizerStates' format, so sequential and vectorized runs resume each other.

Supported: CTRModule's own loss and forward (any DLRM-shaped `model` with one feature per
table); SGD (momentum, dampening, nesterov, weight decay), Adam, AdamW and Adagrad for the
dense part and SGD, Adagrad and SparseAdam for the tables, one setting per kind of parameter;
FedProx's term; local tables (their rows sit in the same compact buffers); kept optimizer
state. Not: other optimizers, and what torch refuses on sparse gradients in the sequential
trainer too (Adam on the tables, weight decay on them, keeping SGD's sparse momentum).
`vectorization_blockers` names what stands in the way, so a run can fall back to the
sequential trainer with a reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
from fltoolkit.training.stacked_optimizers import LocalOptimizers, LocalRules, local_rules
from fltoolkit.training.step_plan import Bucket, StepPlan
from fltoolkit.training.trainer import CohortTrainer
from fltoolkit.training.updates import ClientUpdate
from recsys.dlrm import dense_input
from recsys.module import CTRModule
from recsys.parts import TablePart, dense_parameters, embedding_tables

# the CTRModule methods a subclass must not override for the batched step to be its step
CONTRACT = ("training_step", "logits_and_embeddings", "loss")
ARCHES = ("dense_arch", "inter_arch", "over_arch")

log = logging.getLogger("fltk")


def vectorization_blockers(module: torch.nn.Module, keep_optimizer_state: bool) -> list[str]:
    """Why this module and these settings cannot train vectorized (empty: they can)."""
    if not isinstance(module, CTRModule):
        return [f"the module ({type(module).__name__}) is not a CTRModule"]
    blockers = [f"{type(module).__name__} overrides CTRModule.{name}" for name in CONTRACT
                if getattr(type(module), name) is not getattr(CTRModule, name)]
    if not all(hasattr(module.model, arch) for arch in ARCHES):
        blockers.append("the network has no dense_arch / inter_arch / over_arch (DLRM)")
    configs = {name: config for name, (_, config) in embedding_tables(module).items()}
    shared = [name for name, config in configs.items() if len(config.feature_names) != 1]
    if shared:
        blockers.append(f"tables fed by several features ({', '.join(shared)})")
    if len({config.embedding_dim for config in configs.values()}) > 1:
        blockers.append("tables of different widths")
    rules = optimizer_rules(module)
    found = [rules] if isinstance(rules, str) else rules.blockers(keep_optimizer_state)
    return blockers + [f"optimizer: {blocker}" for blocker in found]


def optimizer_rules(module: CTRModule, dense: dict[str, torch.nn.Parameter] | None = None
                    ) -> LocalRules | str:
    """What `configure_optimizers` gives, as one stacked rule (with its learning rate and
    hyper-parameters, read from the param groups) per kind of parameter, dense or table; or
    why it does not vectorize. `dense`: the dense parameters by name (default: by position).

    The optimizers are built over emptied tables: only their param groups are read, and
    Adagrad allocates state as large as its parameters, here the global tables."""
    tables = {name: weight for name, (weight, _) in embedding_tables(module).items()}
    if dense is None:
        dense = {str(i): param for i, param in enumerate(dense_parameters(module))}
    held = {name: weight.data for name, weight in tables.items()}
    try:
        for weight in tables.values():
            weight.data = weight.data[:0]
        optimizers = as_optimizer_list(module.configure_optimizers())
    finally:
        for name, weight in tables.items():
            weight.data = held[name]
    return local_rules(optimizers, dense, tables)


def trainer_for(module: torch.nn.Module, config: FederatedConfig
                ) -> Callable[..., CohortTrainer]:
    """The trainer `federated.vectorize` asks for: the vectorized one when it can serve
    (`auto`, `true`), else the sequential one (`false`; `auto` says why in one log line,
    `true` refuses with the reasons)."""
    if config.vectorize is False:
        return CohortTrainer
    blockers = vectorization_blockers(module, config.keep_optimizer_state)
    if not blockers:
        log.info("a round's clients step together (federated.vectorize %s)",
                 str(config.vectorize).lower())
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
        rules = optimizer_rules(self.module, self._arch_parameters())  # read once: it walks
        if isinstance(rules, str):                                     # the module
            raise ConfigError(f"federated.vectorize: optimizer: {rules}")
        self.rules = rules

    def chunk_clients(self, batch_size: int) -> int:
        """How many clients step together so that their working set (weight gradients,
        embeddings and activations of a batch) stays within `memory_mb`."""
        layers = sum(m.out_features for m in self.network.modules()
                     if isinstance(m, torch.nn.Linear))
        features = len(self.parts.tables)
        width = max((part.weight.shape[1] for part in self.parts.tables.values()), default=0)
        row_floats = 2 * features * width + 2 * (layers + (features + 1) ** 2
                                                 + (features + 1) * width)
        client_bytes = 4 * (3 * self.dense_size + batch_size * row_floats)
        return max(1, int(self.memory_mb * 2**20 // client_bytes))

    def _train_clients(self, cohort: Cohort) -> list[ClientUpdate]:
        widest = max(step.stop - step.start for steps in cohort.steps for step in steps)
        plan = StepPlan(cohort, self.chunk_clients(widest), device=self.device)
        start = self._start_rows(cohort)
        rows = _FlatRows(start, cohort, self.parts.tables)
        work = rows.tables
        global_dense = torch.nn.utils.parameters_to_vector(self.parts.dense).detach()
        global_weights = {name: param.detach() for name, param in self._arch_parameters().items()}
        stacked = global_dense.expand(plan.clients, -1).clone()  # row p: client at position p
        weights = self._views(stacked)
        losses = torch.zeros(plan.clients, dtype=torch.float64, device=self.device)
        square_sums = torch.zeros(plan.clients, dtype=torch.float64, device=self.device)
        owners = ({name: plan.position[cohort.row_owners(name)] for name in work}
                  if self.proximal_mu or self.rules.tables.linear_rate() is None else {})
        optimizers = self._local_optimizers(cohort, plan, weights, work, owners)
        for buckets in plan.steps:
            for bucket in buckets:
                mine = {name: value[bucket.clients] for name, value in weights.items()}
                weight_gradients, row_gradients, step_losses, samples = self._step(
                    cohort, mine, rows, bucket)
                if self.proximal_mu:  # FedProx: grad += mu (w - w_global), on rows too
                    for name, value in mine.items():
                        weight_gradients[name] = weight_gradients[name] + self.proximal_mu * (
                            value - global_weights[name])
                pulls = self._proximal_pulls(work, start, owners, bucket.clients)
                self._step_dense(optimizers, weights, mine, weight_gradients, bucket)
                self._step_tables(optimizers, rows, bucket, row_gradients, pulls)
                losses[bucket.clients] += step_losses.double()
                square_sums[bucket.clients] += (samples.double().square() * bucket.mask).sum(1)
        by_slot = plan.position
        mean_losses = (losses / plan.step_counts)[by_slot]
        return self._updates(cohort, start, work, stacked.sub_(global_dense),
                             mean_losses.tolist(), square_sums[by_slot].tolist(),
                             self._kept_states(cohort, plan, optimizers), by_slot.tolist())

    def _step_dense(self, optimizers: LocalOptimizers, weights: dict[str, Tensor],
                    mine: dict[str, Tensor], gradients: dict[str, Tensor], bucket: Bucket
                    ) -> None:
        """The local optimizer's step of the bucket's clients on their stacked weights (plain
        SGD: in place on the slice)."""
        rate = self.rules.dense.linear_rate()
        if rate is not None:
            for name, value in mine.items():
                value.add_(gradients[name], alpha=rate)
            return
        positions = torch.arange(bucket.clients.start, bucket.clients.stop, device=self.device)
        optimizers.dense.step(positions, weights, {name: [(positions, gradient)] for
                                                   name, gradient in gradients.items()},
                              coalesced=True)

    def _step_tables(self, optimizers: LocalOptimizers, rows: _FlatRows, bucket: Bucket,
                     gradients: Tensor, pulls: dict[str, tuple[Tensor, Tensor]]) -> None:
        """The local optimizer's step of the bucket's clients on their rows: the batch rows'
        embedding gradients and FedProx's pull, as the sequential trainer's sparse gradient
        (plain SGD: both added into the one buffer)."""
        rate = self.rules.tables.linear_rate()
        if rate is not None:
            rows.add(bucket, gradients, rate)
            for name, (table_rows, pull) in pulls.items():
                rows.tables[name].index_add_(0, table_rows, pull, alpha=rate)
            return
        positions = torch.arange(bucket.clients.start, bucket.clients.stop, device=self.device)
        optimizers.tables.step(positions, rows.tables, rows.pieces(bucket, gradients, pulls))

    def _local_optimizers(self, cohort: Cohort, plan: StepPlan, weights: dict[str, Tensor],
                          work: dict[str, Tensor], owners: dict[str, Tensor]
                          ) -> LocalOptimizers:
        """Every client's local optimizers over its rows, with the state it kept loaded."""
        optimizers = LocalOptimizers(self.rules, weights, work, owners, plan.clients)
        if self.optimizer_states is not None:
            for slot, client in enumerate(cohort.clients):
                optimizers.load(int(plan.position[slot]),
                                self.optimizer_states.states.get(client),
                                self._segments(cohort, slot))
        return optimizers

    def _kept_states(self, cohort: Cohort, plan: StepPlan, optimizers: LocalOptimizers
                     ) -> list[Any]:
        """Each client's optimizer state to keep, as the sequential trainer gives it."""
        if self.optimizer_states is None:
            return [None] * len(cohort.clients)
        return [optimizers.snapshot(int(plan.position[slot]),
                                    self.optimizer_states.states.get(client),
                                    self._segments(cohort, slot))
                for slot, client in enumerate(cohort.clients)]

    def _segments(self, cohort: Cohort, slot: int) -> dict[str, tuple[Tensor, slice]]:
        """Per table, a client's global row ids and the buffer rows that hold them."""
        return {name: (cohort.row_ids[name][cohort.rows(name, slot)], cohort.rows(name, slot))
                for name in self.parts.tables}

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
        dense, label = dense_input(cohort.dense[bucket.rows]), cohort.label[bucket.rows]
        embedded = rows.gather(bucket).requires_grad_()
        leaves = {name: value.detach().requires_grad_() for name, value in weights.items()}
        losses, samples = vmap(partial(functional_call, self.network, tie_weights=False))(
            leaves, (embedded, dense, label, bucket.mask))
        gradients = torch.autograd.grad(losses.sum(), [*leaves.values(), embedded])
        return dict(zip(leaves, gradients[:-1], strict=True)), gradients[-1], \
            losses.detach(), samples

    def _proximal_pulls(self, work: dict[str, Tensor], start: dict[str, Tensor],
                        owners: dict[str, Tensor], clients: slice
                        ) -> dict[str, tuple[Tensor, Tensor]]:
        """FedProx's table term at the current weights (none without FedProx): mu (w -
        w_start) on every row of the segments of the clients at positions `clients`
        (`owners`: each buffer row's position), as the sequential trainer adds it to the
        data gradient."""
        pulls = {}
        if not self.proximal_mu:
            return pulls
        for name, owner in owners.items():
            rows = torch.nonzero((owner >= clients.start) & (owner < clients.stop)).reshape(-1)
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
        self.offsets = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()], dtype=torch.int64,
                                    device=self.flat.device)
        self.columns = [part.columns[0] for part in tables.values()]
        self.cohort = cohort
        self.last: tuple[Bucket | None, Tensor] = (None, self.offsets)

    def ids(self, bucket: Bucket) -> Tensor:
        """[n, W, F] the rows of `flat` that the bucket's batches look up (kept for the
        bucket's gradients, which follow its gather)."""
        if self.last[0] is not bucket:
            self.last = (bucket, self.cohort.sparse[bucket.rows][..., self.columns]
                         + self.offsets)
        return self.last[1]

    def gather(self, bucket: Bucket) -> Tensor:
        """[n, W, F, E] the bucket's embeddings."""
        return self.flat[self.ids(bucket)]

    def pieces(self, bucket: Bucket, gradients: Tensor, pulls: dict[str, tuple[Tensor, Tensor]]
               ) -> dict[str, list[tuple[Tensor, Tensor]]]:
        """Per table, its gradient as the sequential trainer's sparse one, uncoalesced: the
        rows of the bucket's batches with their embedding gradients, then FedProx's pull."""
        ids, real = self.ids(bucket)[bucket.mask], gradients[bucket.mask]
        pieces = {}
        for feature, name in enumerate(self.tables):
            pieces[name] = [(ids[:, feature] - self.offsets[feature], real[:, feature])]
            if name in pulls:
                pieces[name].append(pulls[name])
        return pieces

    def add(self, bucket: Bucket, gradients: Tensor, alpha: float) -> None:
        """flat[row] += alpha * gradient for the real rows of the bucket's batches: each row
        belongs to one client's segment, so every client's rows move alone."""
        ids, mask = self.ids(bucket), bucket.mask
        self.flat.index_add_(0, ids[mask].reshape(-1),
                             gradients[mask].reshape(-1, self.flat.shape[1]), alpha=alpha)
