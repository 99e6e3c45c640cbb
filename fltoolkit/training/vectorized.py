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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from fltoolkit.run.config import ConfigError, FederatedConfig
from fltoolkit.training.cohort import Cohort
from fltoolkit.training.optimizer_state import as_optimizer_list
from fltoolkit.training.trainer import CohortTrainer
from fltoolkit.training.updates import ClientUpdate
from recsys.module import CTRModule
from recsys.parts import embedding_tables

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


def trainer_class(module: torch.nn.Module, config: FederatedConfig) -> type[CohortTrainer]:
    """The trainer `federated.vectorize` asks for: the vectorized one when it can serve
    (`auto`, `true`), else the sequential one (`false`; `auto` says why in one log line,
    `true` refuses with the reasons)."""
    if config.vectorize is False:
        return CohortTrainer
    blockers = vectorization_blockers(module, config.keep_optimizer_state)
    if not blockers:
        return VectorizedTrainer
    if config.vectorize is True:
        raise ConfigError(f"federated.vectorize true: {'; '.join(blockers)}")
    log.info("clients train one after another (federated.vectorize auto): %s", blockers[0])
    return CohortTrainer


class VectorizedTrainer(CohortTrainer):
    """CohortTrainer whose clients take their local steps together (see the module doc)."""

    def _train_clients(self, cohort: Cohort) -> list[ClientUpdate]:
        dense_lr, table_lr = sgd_learning_rates(self.module)
        start = self._start_rows(cohort)
        work = {name: rows.clone() for name, rows in start.items()}
        global_dense = torch.nn.utils.parameters_to_vector(self.parts.dense).detach()
        weights = self._stacked_weights(len(cohort.clients))
        global_weights = {name: param.detach() for name, param in self._arch_parameters().items()}
        step_losses, square_sums = _StepLosses(len(cohort.clients)), torch.zeros(
            len(cohort.clients), dtype=torch.float64)
        owners = ({name: cohort.row_owners(name) for name in work} if self.proximal_mu
                  else {})
        for active, rows, mask in _step_rows(cohort):  # only the clients with a k-th step
            mine = {name: value[active] for name, value in weights.items()}
            gradients, (losses, samples) = self._step(cohort, mine, work, rows, mask)
            pulls = self._proximal_pulls(work, start, owners, active, len(cohort.clients))
            for name, value in weights.items():
                gradient = gradients[0][name]
                if self.proximal_mu:  # FedProx: grad += mu (w - w_global)
                    gradient = gradient + self.proximal_mu * (mine[name] - global_weights[name])
                value.index_add_(0, active, gradient, alpha=-dense_lr)
            self._apply_table_gradients(cohort, work, rows, mask, gradients[1], table_lr)
            for name, (table_rows, pull) in pulls.items():
                work[name].index_add_(0, table_rows, pull, alpha=-table_lr)
            step_losses.add(active, losses)
            square_sums.index_add_(0, active, (samples.double().square() * mask).sum(dim=1))
        dense_deltas = self._flat(weights) - global_dense
        return self._updates(cohort, start, work, dense_deltas, step_losses.means(),
                             square_sums.tolist(), [None] * len(cohort.clients))

    def _stacked_weights(self, clients: int) -> dict[str, Tensor]:
        """Every client's copy of the dense weights, by parameter name: [C, ...] each."""
        return {name: param.detach().expand(clients, *param.shape).clone()
                for name, param in self._arch_parameters().items()}

    def _arch_parameters(self) -> dict[str, torch.nn.Parameter]:
        model = self.module.model
        return {f"{arch}.{name}": param for arch in ARCHES
                for name, param in getattr(model, arch).named_parameters()}

    def _flat(self, weights: dict[str, Tensor]) -> Tensor:
        """[C, dense size] in the order of `parts.dense` (what ClientUpdate.dense holds)."""
        name_of = {id(param): name for name, param in self._arch_parameters().items()}
        stacked = [weights[name_of[id(param)]] for param in self.parts.dense]
        return torch.cat([value.reshape(value.shape[0], -1) for value in stacked], dim=1)

    def _step(self, cohort: Cohort, weights: dict[str, Tensor], work: dict[str, Tensor],
              rows: Tensor, mask: Tensor) -> tuple[Any, tuple[Tensor, Tensor]]:
        """One local step of every client: gradients of (its weights, its embeddings) and
        (its loss, its rows' log losses)."""
        dense, label = cohort.dense[rows], cohort.label[rows]
        if dense.shape[-1] == 0:  # DLRM's dense arch needs one input; feed a constant
            dense = torch.zeros(*dense.shape[:-1], 1)
        embedded = torch.stack([work[name][cohort.sparse[rows, part.columns[0]]]
                                for name, part in self.parts.tables.items()], dim=2)
        step = grad_and_value(self._client_loss, argnums=(0, 1), has_aux=True)
        gradients, (losses, samples) = vmap(step)(weights, embedded, dense, label, mask)
        return gradients, (losses.detach(), samples)

    def _client_loss(self, weights: dict[str, Tensor], embedded: Tensor, dense: Tensor,
                     label: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """One client's training loss on its padded batch (CTRModule's: mean BCE plus the
        embedding L2 term, over the rows `mask` keeps)."""
        model = self.module.model

        def arch(name: str, *inputs: Tensor, **named: Tensor) -> Tensor:
            """An arch of the network with this client's weights (the interaction arch has
            some in DCN)."""
            prefix = f"{name}."
            own = {key[len(prefix):]: value for key, value in weights.items()
                   if key.startswith(prefix)}
            return functional_call(getattr(model, name), own, inputs, named)

        interactions = arch("inter_arch", dense_features=arch("dense_arch", dense),
                            sparse_features=embedded)
        logits = arch("over_arch", interactions).squeeze(-1)
        samples = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
        count = mask.sum().clamp(min=1)
        loss = (samples * mask).sum() / count
        if self.module.embedding_l2:
            norms = embedded.square().sum(dim=(1, 2))
            loss = loss + self.module.embedding_l2 * (norms * mask).sum() / count
        return loss, samples.detach()

    def _proximal_pulls(self, work: dict[str, Tensor], start: dict[str, Tensor],
                        owners: dict[str, Tensor], active: Tensor, clients: int
                        ) -> dict[str, tuple[Tensor, Tensor]]:
        """FedProx's table term at the current weights: mu (w - w_start) on every row of the
        segments of the `active` slots (`owners`: each buffer row's slot; empty without
        FedProx), as the sequential trainer adds it, to subtract times the table learning
        rate along with the data gradient."""
        if not owners:
            return {}
        stepping = torch.zeros(clients, dtype=torch.bool)
        stepping[active] = True
        pulls = {}
        for name, owner in owners.items():
            rows = torch.nonzero(stepping[owner]).reshape(-1)
            pulls[name] = (rows, self.proximal_mu * (work[name][rows] - start[name][rows]))
        return pulls

    def _apply_table_gradients(self, cohort: Cohort, work: dict[str, Tensor], rows: Tensor,
                               mask: Tensor, gradients: Tensor, lr: float) -> None:
        """SGD on the compact buffers: each row belongs to one client's segment, so adding
        every client's row gradients into the one buffer updates each client alone."""
        kept = rows[mask]
        for feature, (name, part) in enumerate(self.parts.tables.items()):
            ids = cohort.sparse[kept, part.columns[0]]
            work[name].index_add_(0, ids, gradients[:, :, feature][mask], alpha=-lr)


class _StepLosses:
    """Per client, the mean of its step losses over the steps it took."""

    def __init__(self, clients: int) -> None:
        self.total = torch.zeros(clients, dtype=torch.float64)
        self.steps = torch.zeros(clients, dtype=torch.float64)

    def add(self, clients: Tensor, losses: Tensor) -> None:
        self.total.index_add_(0, clients, losses.double())
        self.steps.index_add_(0, clients, torch.ones(len(clients), dtype=torch.float64))

    def means(self) -> list[float]:
        return (self.total / self.steps.clamp(min=1)).tolist()


def _step_rows(cohort: Cohort) -> list[tuple[Tensor, Tensor, Tensor]]:
    """For each local step k: [A] the slots of the clients that have a k-th batch, [A, B]
    the cohort rows of those batches (padded with row 0) and [A, B] which of them are real.
    Clients differ in size by orders of magnitude, so a step computes for its clients only:
    a client whose steps are over is left exactly as it is."""
    longest = max(len(steps) for steps in cohort.steps)
    batches = []
    for k in range(longest):
        active = [slot for slot, steps in enumerate(cohort.steps) if k < len(steps)]
        width = max(cohort.steps[slot][k].stop - cohort.steps[slot][k].start for slot in active)
        rows = torch.zeros(len(active), width, dtype=torch.int64)
        mask = torch.zeros(len(active), width, dtype=torch.bool)
        for position, slot in enumerate(active):
            batch = cohort.steps[slot][k]
            rows[position, :batch.stop - batch.start] = torch.arange(batch.start, batch.stop)
            mask[position, :batch.stop - batch.start] = True
        batches.append((torch.tensor(active, dtype=torch.int64), rows, mask))
    return batches
