"""Oort: Lai et al., OSDI 2021, "Oort: Efficient Federated Learning via Guided Participant
Selection".

A client's utility is statistical (how much its data still teaches the model) times a system
penalty (how long it makes the round). Each round part of the cohort explores clients never
selected (a share that decays), the rest exploits the best-scoring explored clients.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fltoolkit.selection.base import ClientSelector
from fltoolkit.training.updates import ClientUpdate


class Oort(ClientSelector):
    """Guided participant selection.

    Statistical utility, measured when a client reports: |B_i| * sqrt(mean of its samples'
    squared losses), over every sample it trained on that round. Score at round t:
    u_i + sqrt(staleness * ln(t) / last_round_i) (clients not seen for a while regain
    priority), times the system penalty (T / t_i) ** alpha when the client's round time t_i
    exceeds the preferred duration T. u_i is the utility scaled to [0, 1] over the explored
    clients (clipped at the `utility_clip` percentile, as FedScale's Oort does), so the
    staleness bonus weighs the same whatever the loss scale and client sizes. Unexplored
    clients are drawn with probability proportional to their system penalty (1 while their
    speed is unknown): exploration prefers fast devices too. Without a simulated clock
    (systems disabled) there is no penalty.

    Args:
        exploration: initial share of the cohort given to never-selected clients (0.9).
        exploration_decay: `exploration` is multiplied by this every round (0.98).
        min_exploration: floor of the exploration share (0.6; the paper's is 0.3). On per-user
            CTR clients a new user is worth more than a revisit, whose own embedding rows
            overfit: with 0.3 and no participation cap Oort plateaued ~0.04 AUC below random
            selection (benchmarks/oort_vs_random.py, README).
        alpha: exponent of the system penalty (2.0).
        staleness: weight of the staleness bonus (0.1).
        cutoff: exploit among clients scoring at least `cutoff` times the k-th best score,
            drawn in proportion to their scores (0.95).
        preferred_percentile: T is this percentile of the round times seen so far (30); the
            pacer moves it.
        pacer_window: every this many rounds the pacer compares the utility collected in the
            last window with the window before (20): within 10% (progress has flattened) it
            relaxes T by `pacer_delta` percentile points (up to 100), more than 5x apart it
            tightens T by as much.
        pacer_delta: percentile points per pacer move (5).
        max_participation: clients selected this many times are no longer selected
            (blacklisted) while enough others are online; None: no limit (5). Without it the
            largest clients (|B_i| scales utility) are exploited nearly every round.
        utility_clip: percentile of the explored clients' utilities above which utility
            counts as that percentile's (95).
    """

    def __init__(self, exploration: float = 0.9, exploration_decay: float = 0.98,
                 min_exploration: float = 0.6, alpha: float = 2.0, staleness: float = 0.1,
                 cutoff: float = 0.95, preferred_percentile: float = 30.0,
                 pacer_window: int = 20, pacer_delta: float = 5.0,
                 max_participation: int | None = 5, utility_clip: float = 95.0) -> None:
        for name, value in (("exploration", exploration), ("min_exploration", min_exploration),
                            ("cutoff", cutoff)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Oort {name} must be in [0, 1], got {value}")
        if pacer_window < 1 or alpha < 0 or staleness < 0:
            raise ValueError("Oort pacer_window must be >= 1, alpha and staleness >= 0")
        self.exploration, self.exploration_decay = exploration, exploration_decay
        self.min_exploration, self.alpha, self.staleness = min_exploration, alpha, staleness
        self.cutoff, self.preferred_percentile = cutoff, preferred_percentile
        self.pacer_window, self.pacer_delta = pacer_window, pacer_delta
        self.max_participation = max_participation
        self.utility_clip = utility_clip
        self.window_utility: list[float] = []

    def bind(self, num_clients: int, seed: int) -> None:
        super().bind(num_clients, seed)
        self.utility = np.zeros(num_clients)
        self.duration = np.full(num_clients, np.nan)
        self.last_round = np.zeros(num_clients, dtype=np.int64)  # 0: never selected
        self.times_selected = np.zeros(num_clients, dtype=np.int64)

    def select(self, round_index: int, k: int, available: np.ndarray | None = None
               ) -> np.ndarray:
        online = np.zeros(self.num_clients, dtype=bool)
        online[self.candidates(available)] = True
        k = min(k, int(online.sum()))
        allowed = online.copy()
        if self.max_participation is not None:
            allowed &= self.times_selected < self.max_participation
        if allowed.sum() < k:  # too many blacklisted: fall back to every online client
            allowed = online
        explored = np.flatnonzero(allowed & (self.last_round > 0))
        unexplored = np.flatnonzero(allowed & (self.last_round == 0))
        share = max(self.exploration, self.min_exploration)
        explore = min(unexplored.size, max(k - explored.size, round(k * share)))
        chosen = [self._exploit(explored, k - explore, round_index),
                  self._explore(unexplored, explore)]
        self.exploration *= self.exploration_decay
        picked = np.sort(np.concatenate(chosen)).astype(np.int64)
        self.times_selected[picked] += 1
        return picked

    def scores(self, clients: np.ndarray, round_index: int) -> np.ndarray:
        """Utility + staleness bonus, times the system penalty for clients slower than T."""
        bonus = np.sqrt(self.staleness * math.log(max(round_index, 1))
                        / np.maximum(self.last_round[clients], 1))
        return (self._scaled_utility(clients) + bonus) * self.penalty(clients)

    def penalty(self, clients: np.ndarray) -> np.ndarray:
        """(T / t_i) ** alpha for clients slower than T, else 1 (also when t_i is unknown)."""
        penalty = np.ones(len(clients))
        durations = self.duration[clients]
        preferred = self.preferred_s
        if preferred is not None:
            slow = np.isfinite(durations) & (durations > preferred)
            penalty[slow] = (preferred / durations[slow]) ** self.alpha
        return penalty

    def _scaled_utility(self, clients: np.ndarray) -> np.ndarray:
        seen = self.utility[self.last_round > 0]
        if seen.size == 0:
            return np.zeros(len(clients))
        low, high = seen.min(), np.percentile(seen, self.utility_clip)
        if high <= low:
            return np.ones(len(clients))
        return (np.minimum(self.utility[clients], high) - low) / (high - low)

    @property
    def preferred_s(self) -> float | None:
        """T: the preferred round time, a percentile of the round times seen (None: none)."""
        if not np.isfinite(self.duration).any():
            return None
        return float(np.nanpercentile(self.duration, self.preferred_percentile))

    def _explore(self, unexplored: np.ndarray, count: int) -> np.ndarray:
        if count <= 0:
            return unexplored[:0]
        weights = self.penalty(unexplored)
        return self.rng.choice(unexplored, size=count, replace=False, p=weights / weights.sum())

    def _exploit(self, explored: np.ndarray, count: int, round_index: int) -> np.ndarray:
        if count <= 0 or explored.size == 0:
            return explored[:0]
        if explored.size <= count:
            return explored
        score = self.scores(explored, round_index)
        kth = np.sort(score)[::-1][count - 1]
        pool = explored[score >= self.cutoff * kth]
        weights = score[score >= self.cutoff * kth]
        if pool.size == count or weights.sum() <= 0:
            return pool[:count]
        return self.rng.choice(pool, size=count, replace=False, p=weights / weights.sum())

    def feedback(self, round_index: int, updates: list[ClientUpdate],
                 durations: dict[int, float] | None = None) -> None:
        collected = 0.0
        for update in updates:
            samples = max(update.samples_trained, 1)
            utility = update.num_samples * math.sqrt(update.loss_squared_sum / samples)
            self.utility[update.client] = utility
            self.last_round[update.client] = round_index
            collected += utility
        for client, seconds in (durations or {}).items():
            self.duration[client] = seconds
        self._pace(collected)

    def _pace(self, collected: float) -> None:
        """Move T's percentile when the windowed utility flattens (relax) or jumps (tighten)."""
        self.window_utility.append(collected)
        window = self.pacer_window
        if len(self.window_utility) < 2 * window or len(self.window_utility) % window:
            return
        last = sum(self.window_utility[-window:])
        before = sum(self.window_utility[-2 * window:-window])
        change = abs(last - before)
        if change <= 0.1 * before:
            self.preferred_percentile = min(100.0, self.preferred_percentile + self.pacer_delta)
        elif change >= 5 * before:
            self.preferred_percentile = max(self.pacer_delta,
                                            self.preferred_percentile - self.pacer_delta)

    ARRAYS = ("utility", "duration", "last_round", "times_selected")

    def state_dict(self) -> dict:
        """Arrays as tensors, so checkpoints load with torch.load(weights_only=True)."""
        return {**super().state_dict(),
                **{key: torch.from_numpy(getattr(self, key).copy()) for key in self.ARRAYS},
                "exploration": self.exploration,
                "preferred_percentile": self.preferred_percentile,
                "window_utility": list(self.window_utility)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for key in self.ARRAYS:
            setattr(self, key, state[key].numpy().copy())
        for key in ("exploration", "preferred_percentile"):
            setattr(self, key, state[key])
        self.window_utility = list(state["window_utility"])
