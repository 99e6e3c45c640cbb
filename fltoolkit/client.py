"""CohortTrainer: local training of a round's clients on the shared global module.

No copy of the model per client and no snapshot-and-restore of the tables. For a round the
trainer lays every client's touched rows out in one compact buffer per table (client after
client, ids remapped into its own segment) and points the module's table weights at that
buffer; the dense parameters are views of one flat working vector, reset from the global
vector before each client. Clients therefore never see each other's rows, the global tables
are never written, a client's cost follows its data and not the tables' size, and every
delta is one subtraction. Training goes through the module's own `training_step` and
`configure_optimizers` (called once per round; each client's local optimizer state starts
fresh unless a ClientOptimizerStates store carries it over).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.clients import Batch, ClientTable
from fltoolkit.model_parts import ModelParts
from fltoolkit.optimizer_state import ClientOptimizerStates, RoundOptimizers, as_optimizer_list
from fltoolkit.privacy.local_tables import LocalTableStore
from fltoolkit.server_tables import ServerTables
from fltoolkit.updates import ID_BYTES, ClientUpdate, SparseRows


@dataclass(frozen=True)
class LocalSchedule:
    """How much a client trains per round.

    Attributes:
        batch_size: rows per local mini-batch (a client with fewer rows uses all of them).
        local_steps: mini-batches per round, cycling over the client's shuffled rows.
        local_epochs: if set, passes over the client's rows instead of `local_steps`.
    """

    batch_size: int = 32
    local_steps: int = 1
    local_epochs: int | None = None

    def batches(self, num_rows: int, generator: torch.Generator) -> list[Tensor]:
        """Row positions (within the client) of each local mini-batch."""
        if self.local_epochs:
            return [batch for _ in range(self.local_epochs)
                    for batch in torch.randperm(num_rows, generator=generator)
                    .split(self.batch_size)]
        size = min(self.batch_size, num_rows)
        needed = self.local_steps * size
        order = torch.randperm(num_rows, generator=generator)
        order = order.repeat(math.ceil(needed / num_rows))[:needed]
        return list(order.view(self.local_steps, size))


@dataclass(frozen=True)
class Cohort:
    """A round's clients laid out for training. R: rows of all local batches, C: clients.

    Attributes:
        clients: the clients, in training order.
        dense, label: [R, D] and [R] the rows of every local batch, client after client.
        sparse: [R, F] their ids, remapped to positions in the compact buffers.
        num_samples: per client, its training rows (its FedAvg weight).
        samples_trained: per client, the rows of all its local batches (epochs x rows).
        steps: per client, the slices of those rows that make its local batches.
        row_ids: table -> [U] global row id of each compact buffer row.
        segments: table -> C + 1 bounds; client c owns compact rows segments[c]:segments[c + 1].
    """

    clients: list[int]
    num_samples: list[int]
    samples_trained: list[int]
    dense: Tensor
    sparse: Tensor
    label: Tensor
    steps: list[list[slice]]
    row_ids: dict[str, Tensor]
    segments: dict[str, list[int]]

    def rows(self, table: str, slot: int) -> slice:
        bounds = self.segments[table]
        return slice(bounds[slot], bounds[slot + 1])


class CohortTrainer:
    """Trains a round's clients one after another from the same global weights.

    Args:
        module: the global LightningModule; its `training_step` gives the loss and its
            `configure_optimizers` the local optimizer (built once per round, its state reset
            for every client).
        parts: the module's dense parameters and tables (see `model_parts.split_parameters`).
        data: the training ClientTable.
        schedule: local batch size and steps.
        proximal_mu: FedProx coefficient; the gradient of mu/2 ||w - w_global||^2 is added.
        server_tables: where the global rows of the tables that are not local come from.
        local_tables: store of client-local tables (their rows are never uploaded), or None.
        optimizer_states: store that keeps each client's optimizer state between its rounds,
            or None for fresh local state every round.
    """

    def __init__(self, module: torch.nn.Module, parts: ModelParts, data: ClientTable,
                 schedule: LocalSchedule, server_tables: ServerTables,
                 proximal_mu: float = 0.0, local_tables: LocalTableStore | None = None,
                 optimizer_states: ClientOptimizerStates | None = None) -> None:
        self.module, self.parts, self.data, self.schedule = module, parts, data, schedule
        self.server_tables = server_tables
        self.proximal_mu = proximal_mu
        self.local_tables = local_tables
        self.optimizer_states = optimizer_states
        self.dense_size = sum(p.numel() for p in parts.dense)
        self.dense_bytes = sum(p.numel() * p.element_size() for p in parts.dense)

    def train_round(self, clients: Sequence[int], seeds: Sequence[int]) -> list[ClientUpdate]:
        """Train each client from the current global weights; the module is left unchanged.

        Every rank calls this every round, with its own clients or none, since fetching the
        rows of sharded tables is collective."""
        if not clients:
            empty = torch.empty(0, dtype=torch.int64)
            self.server_tables.fetch({name: empty for name in self.server_tables.names})
            return []
        cohort = self.plan(clients, seeds)
        global_dense = parameters_to_vector(self.parts.dense).detach().clone()
        global_tables = {name: part.weight.data for name, part in self.parts.tables.items()}
        start = self._start_rows(cohort)
        work = {name: rows.clone() for name, rows in start.items()}
        work_dense = global_dense.clone()
        dense_deltas = torch.empty(len(clients), global_dense.numel())
        losses, squares = [], []
        try:
            for name, part in self.parts.tables.items():
                part.weight.data = work[name]
            vector_to_parameters(work_dense, self.parts.dense)  # parameters become views
            optimizers = RoundOptimizers(
                as_optimizer_list(self.module.configure_optimizers()),
                [part.weight for part in self.parts.tables.values()])
            self.module.train()
            for slot in range(len(clients)):
                work_dense.copy_(global_dense)
                loss, square = self._train_client(cohort, slot, optimizers, global_dense, start)
                losses.append(loss)
                squares.append(square)
                torch.sub(work_dense, global_dense, out=dense_deltas[slot])
        finally:
            for name, part in self.parts.tables.items():
                part.weight.data = global_tables[name]
            vector_to_parameters(global_dense, self.parts.dense)
        return self._updates(cohort, start, work, dense_deltas, losses, squares)

    def plan(self, clients: Sequence[int], seeds: Sequence[int]) -> Cohort:
        """Each client's local batches and the compact layout of the rows they touch.

        One `torch.unique` per table over (client slot, row id) keys gives, sorted by slot,
        every client's distinct rows and, through the inverse, the remapped ids of its batches.
        """
        positions, steps, counts, num_samples, offset = [], [], [], [], 0
        for client, seed in zip(clients, seeds, strict=True):
            rows = self.data.client_rows(client)
            num_samples.append(rows.stop - rows.start)
            generator = torch.Generator().manual_seed(seed)
            batches = self.schedule.batches(rows.stop - rows.start, generator)
            positions += [rows.start + batch for batch in batches]
            sizes = [len(batch) for batch in batches]
            bounds = [offset, *(offset + total for total in accumulate(sizes))]
            steps.append([slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)])
            counts.append(sum(sizes))
            offset += counts[-1]
        order = torch.cat(positions)
        slot = torch.repeat_interleave(torch.arange(len(clients)), torch.tensor(counts))
        ids = self.data.sparse[order]
        remapped = ids.clone()  # columns that feed no table keep their ids
        row_ids, segments = {}, {}
        for name, part in self.parts.tables.items():
            vocab = part.num_rows
            keys = slot[:, None] * vocab + ids[:, part.columns]
            unique, inverse = torch.unique(keys, return_inverse=True)
            remapped[:, part.columns] = inverse
            row_ids[name] = unique % vocab
            segments[name] = torch.searchsorted(
                unique, torch.arange(len(clients) + 1) * vocab).tolist()
        return Cohort(list(clients), num_samples, counts, self.data.dense[order], remapped,
                      self.data.label[order], steps, row_ids, segments)

    def payloads(self, cohort: Cohort) -> tuple[np.ndarray, np.ndarray]:
        """(bytes each client downloads = uploads, samples it trains) for the simulated clock.

        Known before training: the dense weights and the touched rows of every table that is
        not local, exactly what `ClientUpdate.download_bytes` and `upload_bytes()` count.
        """
        moved = np.full(len(cohort.clients), self.dense_bytes, dtype=np.int64)
        for name, part in self.parts.tables.items():
            if self._is_local(name):
                continue
            row_bytes = ID_BYTES + part.weight.shape[1] * part.weight.element_size()
            moved += np.diff(cohort.segments[name]) * row_bytes
        return moved, np.array(cohort.samples_trained)

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
                      global_dense: Tensor, start: dict[str, Tensor]) -> tuple[float, float]:
        """Local steps of one client on its segment: (mean training loss, sum of its samples'
        squared losses)."""
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
        if self.optimizer_states is not None:
            self.optimizer_states.save(client, optimizers, segments)
        return float(torch.stack(losses).mean()), float(torch.cat(sample_losses).square().sum())

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
            positions = torch.arange(rows.start, rows.stop)[None]
            sparse = torch.sparse_coo_tensor(positions, pull, weight.shape)
            weight.grad = sparse if weight.grad is None else weight.grad + sparse

    def _updates(self, cohort: Cohort, start: dict[str, Tensor], work: dict[str, Tensor],
                 dense_deltas: Tensor, losses: list[float], squares: list[float]
                 ) -> list[ClientUpdate]:
        """Split the round's deltas per client; local tables' rows go to their store."""
        deltas = {name: work[name] - start[name] for name in work}
        finite = _finite_per_client(cohort, dense_deltas, deltas, losses)
        updates = []
        for slot, client in enumerate(cohort.clients):
            tables, download = {}, self.dense_bytes
            for name, delta in deltas.items():
                rows = cohort.rows(name, slot)
                ids = cohort.row_ids[name][rows]
                if self._is_local(name):
                    self.local_tables.save(name, client, ids, work[name][rows])
                    continue
                tables[name] = SparseRows(ids, delta[rows])
                download += tables[name].num_bytes()
            updates.append(ClientUpdate(
                client=client, num_samples=cohort.num_samples[slot], loss=losses[slot],
                dense=dense_deltas[slot], tables=tables, download_bytes=download,
                samples_trained=cohort.samples_trained[slot],
                loss_squared_sum=squares[slot], finite=finite[slot]))
        return updates


def _finite_per_client(cohort: Cohort, dense_deltas: Tensor, deltas: dict[str, Tensor],
                       losses: list[float]) -> list[bool]:
    """Whether each client's loss and deltas are all finite: a few ops for the whole round.

    Row sums stand for their rows (NaN and Inf propagate through sums; isfinite(...).all()
    over the dense deltas took 13 ms a round, the sums 1 ms).
    """
    finite = torch.isfinite(dense_deltas.sum(dim=1)) & torch.isfinite(torch.tensor(losses))
    for name, delta in deltas.items():
        bad_rows = (~torch.isfinite(delta.sum(dim=1))).to(torch.int64)
        sizes = torch.tensor(np.diff(cohort.segments[name]))
        owner = torch.repeat_interleave(torch.arange(len(cohort.clients)), sizes)
        finite &= torch.zeros(len(cohort.clients), dtype=torch.int64).index_add_(
            0, owner, bad_rows) == 0
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

