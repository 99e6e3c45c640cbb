"""CohortTrainer: local training of a round's planned cohort on the shared global module.

No copy of the model per client and no snapshot-and-restore of the tables. The trainer
points the module's table weights at the cohort's compact buffers (every client's touched
rows, client after client) and makes the dense parameters views of one flat working vector,
reset from the global vector before each client. Clients therefore never see each other's
rows, the global tables are never written, a client's cost follows its data and not the
tables' size, and every delta is one subtraction. Training goes through the module's own
`training_step` and `configure_optimizers` (called once per round; each client's local
optimizer state starts fresh unless a ClientOptimizerStates store carries it over).

What a client keeps between its rounds (its local-table rows, its optimizer state) is held
back until the server has screened its update: `keep` stores it for the accepted clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.clients import Batch
from fltoolkit.privacy.local_tables import LocalTableStore
from fltoolkit.server.tables import ServerTables
from fltoolkit.training.cohort import Cohort
from fltoolkit.training.optimizer_state import (
    ClientOptimizerStates,
    RoundOptimizers,
    as_optimizer_list,
)
from fltoolkit.training.updates import ClientRows, ClientUpdate, RoundRows, SparseRows
from recsys.parts import ModelParts


@dataclass(frozen=True)
class ClientState:
    """What one client keeps after a round: its new local-table rows and optimizer state."""

    local_rows: Mapping[str, SparseRows]
    optimizer: Any = None


class CohortTrainer:
    """Trains a round's clients one after another from the same global weights.

    Args:
        module: the global LightningModule; its `training_step` gives the loss and its
            `configure_optimizers` the local optimizer (built once per round, its state reset
            for every client).
        parts: the module's dense parameters and tables (see `recsys.parts.split_parameters`).
        server_tables: where the global rows of the tables that are not local come from.
        proximal_mu: FedProx coefficient; the gradient of mu/2 ||w - w_global||^2 is added.
        local_tables: store of client-local tables (their rows are never uploaded), or None.
        optimizer_states: store that keeps each client's optimizer state between its rounds,
            or None for fresh local state every round.
    """

    def __init__(self, module: torch.nn.Module, parts: ModelParts, server_tables: ServerTables,
                 proximal_mu: float = 0.0, local_tables: LocalTableStore | None = None,
                 optimizer_states: ClientOptimizerStates | None = None) -> None:
        self.module, self.parts, self.server_tables = module, parts, server_tables
        self.proximal_mu = proximal_mu
        self.local_tables = local_tables
        self.optimizer_states = optimizer_states
        self.dense_size = sum(p.numel() for p in parts.dense)
        self.device = next(module.parameters()).device
        self.pending: dict[int, ClientState] = {}

    def train_round(self, cohort: Cohort) -> list[ClientUpdate]:
        """Train each client from the current global weights; the module is left unchanged.

        Every rank calls this every round, with its own clients or none, since fetching the
        rows of sharded tables is collective."""
        self.pending = {}
        if not cohort.clients:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            self.server_tables.fetch({name: empty for name in self.server_tables.names})
            return []
        return self._train_clients(cohort.to(self.device))

    def _train_clients(self, cohort: Cohort) -> list[ClientUpdate]:
        """One client after another (VectorizedTrainer steps them together)."""
        global_dense = parameters_to_vector(self.parts.dense).detach().clone()
        global_tables = {name: part.weight.data for name, part in self.parts.tables.items()}
        start = self._start_rows(cohort)
        work = {name: rows.clone() for name, rows in start.items()}
        work_dense = global_dense.clone()
        dense_deltas = torch.empty(len(cohort.clients), global_dense.numel(),
                                   device=self.device)
        losses, squares, optimizer_kept = [], [], []
        try:
            for name, part in self.parts.tables.items():
                part.weight.data = work[name]
            vector_to_parameters(work_dense, self.parts.dense)  # parameters become views
            optimizers = RoundOptimizers(
                as_optimizer_list(self.module.configure_optimizers()),
                [part.weight for part in self.parts.tables.values()])
            self.module.train()
            for slot in range(len(cohort.clients)):
                work_dense.copy_(global_dense)
                loss, square, kept = self._train_client(cohort, slot, optimizers, global_dense,
                                                        start)
                losses.append(loss)
                squares.append(square)
                optimizer_kept.append(kept)
                torch.sub(work_dense, global_dense, out=dense_deltas[slot])
        finally:
            for name, part in self.parts.tables.items():
                part.weight.data = global_tables[name]
            vector_to_parameters(global_dense, self.parts.dense)
        return self._updates(cohort, start, work, dense_deltas, losses, squares, optimizer_kept)

    def keep(self, clients: list[int]) -> None:
        """Store the local rows and optimizer state of these clients from the last round
        (those whose updates the server accepted); the others' are dropped."""
        self.commit({client: self.pending[client] for client in clients})
        self.pending = {}

    def commit(self, states: Mapping[int, ClientState]) -> None:
        """Store these clients' local rows and optimizer state: `keep` for states taken from
        `pending` earlier (the asynchronous server holds them until the update is
        aggregated, which may be several aggregations after training)."""
        for client, state in states.items():
            for name, rows in state.local_rows.items():
                self.local_tables.save(name, client, rows.ids, rows.values)
            if self.optimizer_states is not None:
                self.optimizer_states.put(client, state.optimizer)

    def _is_local(self, table: str) -> bool:
        return self.local_tables is not None and table in self.local_tables

    def _start_rows(self, cohort: Cohort) -> dict[str, Tensor]:
        """The compact buffers' initial values: global rows, or a local table's client rows."""
        served = self.server_tables.fetch(
            {name: cohort.row_ids[name] for name in self.server_tables.names})
        return {name: served[name] if name in served else torch.cat([
            self.local_tables.client_rows(name, client, cohort.row_ids[name][
                cohort.rows(name, slot)]) for slot, client in enumerate(cohort.clients)])
            for name in self.parts.tables}

    def _train_client(self, cohort: Cohort, slot: int, round_optimizers: RoundOptimizers,
                      global_dense: Tensor, start: dict[str, Tensor]
                      ) -> tuple[float, float, Any]:
        """Local steps of one client on its segment: (mean training loss, sum of its samples'
        squared losses, its optimizer state to keep or None)."""
        round_optimizers.reset()
        optimizers = round_optimizers.optimizers
        client = cohort.clients[slot]
        if self.optimizer_states is not None:
            segments = {part.weight: (cohort.row_ids[name][cohort.rows(name, slot)],
                                      cohort.rows(name, slot))
                        for name, part in self.parts.tables.items()}
            self.optimizer_states.load(client, optimizers, segments)
        losses, sample_losses = [], []
        for step, rows in enumerate(cohort.steps[slot]):
            batch = Batch(cohort.dense[rows], cohort.sparse[rows], cohort.label[rows])
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss, samples = _loss_and_samples(self.module.training_step(batch, step), len(batch))
            loss.backward()
            if self.proximal_mu:
                self._add_proximal_gradient(cohort, slot, global_dense, start)
            for optimizer in optimizers:
                optimizer.step()
            losses.append(loss.detach())
            sample_losses.append(samples)
        kept = (None if self.optimizer_states is None
                else self.optimizer_states.snapshot(client, optimizers, segments))
        return (float(torch.stack(losses).mean()), float(torch.cat(sample_losses).square().sum()),
                kept)

    def _add_proximal_gradient(self, cohort: Cohort, slot: int, global_dense: Tensor,
                               start: dict[str, Tensor]) -> None:
        """grad += mu (w - w_start): the gradient of mu/2 ||w - w_start||^2.

        For tables only the client's own segment can differ from its start, so the term is a
        sparse gradient on those rows, added to the data gradient.
        """
        mu = self.proximal_mu
        offset = 0
        for param in self.parts.dense:
            begin = global_dense[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
            pull = mu * (param.detach() - begin)
            param.grad = pull if param.grad is None else param.grad + pull
        for name, part in self.parts.tables.items():
            rows = cohort.rows(name, slot)
            weight = part.weight
            pull = mu * (weight.detach()[rows] - start[name][rows])
            positions = torch.arange(rows.start, rows.stop, device=self.device)[None]
            sparse = torch.sparse_coo_tensor(positions, pull, weight.shape, device=weight.device)
            weight.grad = sparse if weight.grad is None else weight.grad + sparse

    def _updates(self, cohort: Cohort, start: dict[str, Tensor], work: dict[str, Tensor],
                 dense_deltas: Tensor, losses: list[float], squares: list[float],
                 optimizer_kept: list[Any], dense_rows: list[int] | None = None
                 ) -> list[ClientUpdate]:
        """Split the round's deltas per client; local tables' rows wait in `pending`.

        Client `slot`'s dense delta is row `dense_rows[slot]` of `dense_deltas` (by default
        row `slot`)."""
        dense_rows = list(range(len(cohort.clients))) if dense_rows is None else dense_rows
        deltas = {name: work[name] - start[name] for name in work}
        finite = _finite_per_client(cohort, dense_deltas, deltas, losses, dense_rows)
        uploaded, local = {}, {}  # table -> the round's rows: deltas; a local table's new rows
        for name, delta in deltas.items():
            if self._is_local(name):
                local[name] = RoundRows(cohort.row_ids[name], work[name], cohort.segments[name])
            else:
                uploaded[name] = RoundRows(cohort.row_ids[name], delta, cohort.segments[name])
        dense = dense_deltas.unbind()
        updates = []
        for slot, client in enumerate(cohort.clients):
            self.pending[client] = ClientState(ClientRows(local, slot), optimizer_kept[slot])
            updates.append(ClientUpdate(
                client=client, num_samples=cohort.num_samples[slot], loss=losses[slot],
                dense=dense[dense_rows[slot]], tables=ClientRows(uploaded, slot),
                download_bytes=int(cohort.download_bytes[slot]),
                samples_trained=cohort.samples_trained[slot],
                loss_squared_sum=squares[slot], finite=finite[slot]))
        return updates


def _finite_per_client(cohort: Cohort, dense_deltas: Tensor, deltas: dict[str, Tensor],
                       losses: list[float], dense_rows: list[int] | None = None) -> list[bool]:
    """Whether each client's loss and deltas are all finite: a few ops for the whole round.

    Row sums stand for their rows (NaN and Inf propagate through sums; isfinite(...).all()
    over the dense deltas took 13 ms a round, the sums 1 ms).
    """
    dense_finite = torch.isfinite(dense_deltas.sum(dim=1))
    if dense_rows is not None:
        dense_finite = dense_finite[dense_rows]
    finite = dense_finite & torch.isfinite(torch.tensor(losses, device=dense_finite.device))
    for name, delta in deltas.items():
        bad_rows = (~torch.isfinite(delta.sum(dim=1))).to(torch.int64)
        finite &= torch.zeros(len(cohort.clients), dtype=torch.int64,
                              device=delta.device).index_add_(
            0, cohort.row_owners(name), bad_rows) == 0
    return finite.tolist()


def _loss_and_samples(output: Tensor | dict[str, Tensor], batch_size: int
                      ) -> tuple[Tensor, Tensor]:
    """training_step may return the loss or Lightning's dict form with "loss". Per-sample
    losses come from its "sample_losses" if present; otherwise every row is taken to have the
    batch's mean loss (an approximation of Oort's utility)."""
    if isinstance(output, dict):
        loss = output["loss"]
        samples = output.get("sample_losses")
    else:
        loss, samples = output, None
    if samples is None:
        samples = loss.detach().expand(batch_size)
    return loss, samples
