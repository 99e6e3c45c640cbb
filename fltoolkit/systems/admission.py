"""Admission: who of a round's selected clients trains, and the simulated clock.

Without simulated devices every selected client trains. With them, the selector chooses
among the clients online at the round's start (over-committing), each client's round time
comes from its device and the bytes and samples of the round's plan, and the policy keeps
the fastest that stay online and meet the deadline. Durations are known before training, so
stragglers and dropped clients cost no local training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fltoolkit.selection.base import ClientSelector
from fltoolkit.systems.clock import IDLE_WAIT_S, cohort_seconds
from fltoolkit.systems.config import SystemsConfig
from fltoolkit.training.cohort import Cohort

log = logging.getLogger("fltk")

Planner = Callable[[int, Sequence[int]], Cohort]  # (round, clients) -> their plan


@dataclass(frozen=True)
class Admitted:
    """What admission decided for one round.

    Attributes:
        cohort: the plan of the clients that train (empty when the round is skipped).
        selected: how many clients the selector chose.
        dropped: selected clients that went offline or missed the deadline.
        stragglers: selected clients that finished after the round closed.
        skipped: whether the round was skipped (too few clients or survivors).
        durations: simulated seconds of every selected client that stayed online (None
            without simulated devices), for the selector.
        seconds: the round's simulated length (0 without simulated devices).
    """

    cohort: Cohort
    selected: int
    dropped: int = 0
    stragglers: int = 0
    skipped: bool = False
    durations: dict[int, float] | None = None
    seconds: float = 0.0


class Admission:
    """Every selected client trains; no clock."""

    sim_time_s: float | None = None

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients

    def admit(self, round_index: int, wanted: int, selector: ClientSelector,
              plan: Planner) -> Admitted:
        chosen = selector.select(round_index, wanted).tolist()
        return Admitted(plan(round_index, chosen), selected=len(chosen))

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        return


class DeviceAdmission(Admission):
    """Simulated devices: over-commitment among the online clients, deadlines, a clock.

    Args:
        num_clients: training clients.
        systems: the devices and the round policy.
        seed: the run's seed (a generated population derives from it).
    """

    def __init__(self, num_clients: int, systems: SystemsConfig, seed: int) -> None:
        super().__init__(num_clients)
        self.population = systems.population(num_clients, seed)
        self.policy = systems.policy
        self.sim_time_s = 0.0

    def admit(self, round_index: int, wanted: int, selector: ClientSelector,
              plan: Planner) -> Admitted:
        count = min(self.policy.num_selected(wanted), self.num_clients)
        availability = self.population.availability
        online_now = (None if availability is None else
                      availability.online_at(self.num_clients, self.sim_time_s))
        selected = selector.select(round_index, count, online_now)
        if len(selected) < self.policy.min_updates:  # nobody to train: wait for devices
            log.warning("round %d skipped: %d client(s) online, systems.min_updates=%d",
                        round_index, len(selected), self.policy.min_updates)
            return self._skipped(plan, round_index, len(selected), IDLE_WAIT_S)
        cohort = plan(round_index, selected.tolist())
        seconds = cohort_seconds(self.population, cohort)
        online = (np.ones(len(selected), dtype=bool) if availability is None else
                  availability.online_throughout(selected, np.full(len(selected), self.sim_time_s),
                                                 self.sim_time_s + seconds))
        outcome = self.policy.admit(seconds, online, wanted)
        dropped = len(outcome.offline) + len(outcome.late)
        if outcome.skipped:
            log.warning("round %d skipped: %d update(s) survived, systems.min_updates=%d",
                        round_index, len(selected) - dropped, self.policy.min_updates)
            return self._skipped(plan, round_index, len(selected), outcome.duration_s, dropped,
                                 len(outcome.stragglers))
        self.sim_time_s += outcome.duration_s
        # the server sees when every client that stayed online finished: stragglers report
        # after the round closed, late ones were still running at the deadline
        finished = np.concatenate([outcome.kept, outcome.stragglers, outcome.late])
        observed = np.minimum(seconds, self.policy.deadline_s or np.inf)[finished]
        return Admitted(cohort.subset(outcome.kept.tolist()), len(selected),
                        dropped, len(outcome.stragglers),
                        durations=dict(zip(selected[finished].tolist(), observed.tolist(),
                                           strict=True)),
                        seconds=outcome.duration_s)

    def _skipped(self, plan: Planner, round_index: int, selected: int, seconds: float,
                 dropped: int = 0, stragglers: int = 0) -> Admitted:
        self.sim_time_s += seconds
        return Admitted(plan(round_index, []), selected, dropped, stragglers, skipped=True,
                        seconds=seconds)

    def state_dict(self) -> dict[str, float]:
        return {"sim_time_s": self.sim_time_s}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.sim_time_s = state["sim_time_s"]


def admission_for(systems: SystemsConfig | None, num_clients: int, seed: int) -> Admission:
    """Device admission when `systems` is enabled, else everyone trains."""
    if systems is not None and systems.enabled:
        return DeviceAdmission(num_clients, systems, seed)
    return Admission(num_clients)
