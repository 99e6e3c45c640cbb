"""Device populations: per-client compute speed, bandwidth and online intervals.

A client's simulated round time comes from these (see `clock.py`). Three sources:
`generate_devices` (seeded, heavy-tailed: the default), our own parquet files
(`save_devices` / `load_devices`), and FedScale's pickled traces (`load_fedscale`, only with
an explicit permission because unpickling runs code).

Clients are positions 0..C-1 of the training ClientTable. A population with fewer entries
than clients is reused cyclically (client c gets entry c mod N), as FedScale does.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

DAY_S = 86_400.0


class DeviceError(ValueError):
    """A device file that cannot be used; the message names the file and what was expected."""


@dataclass(frozen=True)
class Availability:
    """Online intervals of every client, repeating with a period. S: intervals in all.

    Attributes:
        offsets: [C + 1]; client c owns intervals offsets[c]:offsets[c + 1].
        start_s, end_s: [S] interval bounds in seconds within [0, period_s], sorted and
            disjoint per client; the client is online in [start, end).
        period_s: the trace repeats every this many seconds.
    """

    offsets: np.ndarray
    start_s: np.ndarray
    end_s: np.ndarray
    period_s: float = DAY_S

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def online_throughout(self, clients: np.ndarray, begin_s: np.ndarray,
                          end_s: np.ndarray) -> np.ndarray:
        """Whether each client is online during all of [begin, end) (simulated seconds).

        One interval must hold the whole span: a client whose session ends mid-round drops out,
        even if it comes back later (also across the period's wrap).
        """
        clients = np.asarray(clients) % self.num_clients
        begin = np.asarray(begin_s, dtype=np.float64) % self.period_s
        end = begin + (np.asarray(end_s, dtype=np.float64) - np.asarray(begin_s))
        lo, hi = self.offsets[clients], self.offsets[clients + 1]
        # the last interval starting at or before `begin`, searched within each client's range
        keyed_starts = self._keyed(self.start_s)
        position = np.searchsorted(keyed_starts, self._key(clients, begin), side="right") - 1
        found = (position >= lo) & (position < hi)
        position = np.clip(position, 0, max(len(self.end_s) - 1, 0))
        return found & (self.end_s[position] >= end) if len(self.end_s) else found

    def online_at(self, num_clients: int, seconds: float) -> np.ndarray:
        """[num_clients] whether each client is online at this simulated time: inside an
        interval [start, end), so that it stays online a while (`session_end` is later)."""
        return self.session_end(np.arange(num_clients), seconds) > seconds

    def session_end(self, clients: np.ndarray, seconds: float) -> np.ndarray:
        """When each client's online interval containing this simulated time ends (simulated
        seconds, > `seconds`); `seconds` itself for a client offline then. As in
        `online_throughout`, an interval ending at the period's wrap ends the session."""
        clients = np.asarray(clients, dtype=np.int64) % self.num_clients
        within = seconds % self.period_s
        if not len(self.end_s):
            return np.full(len(clients), float(seconds))
        position = np.searchsorted(self._keyed(self.start_s), self._key(clients, within),
                                   side="right") - 1
        found = (position >= self.offsets[clients]) & (position < self.offsets[clients + 1])
        end = self.end_s[np.clip(position, 0, len(self.end_s) - 1)]
        return np.where(found & (end > within), seconds + (end - within), float(seconds))

    def _key(self, clients: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        return clients * (2 * self.period_s) + seconds

    def _keyed(self, seconds: np.ndarray) -> np.ndarray:
        owners = np.repeat(np.arange(self.num_clients), np.diff(self.offsets))
        return self._key(owners, seconds)


@dataclass(frozen=True)
class DevicePopulation:
    """Per-client device capacities (arrays of length N) and availability (None: always on).

    Attributes:
        compute_ms_per_sample: local training time per sample, milliseconds.
        down_kbps, up_kbps: download and upload bandwidth, kbit/s.
        availability: online intervals, or None for clients that are always online.
    """

    compute_ms_per_sample: np.ndarray
    down_kbps: np.ndarray
    up_kbps: np.ndarray
    availability: Availability | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.compute_ms_per_sample), len(self.down_kbps), len(self.up_kbps)}
        if len(sizes) != 1:
            raise DeviceError(f"device arrays differ in length: {sorted(sizes)}")
        for name in ("compute_ms_per_sample", "down_kbps", "up_kbps"):
            values = getattr(self, name)
            if not np.all(np.isfinite(values) & (values > 0)):
                raise DeviceError(f"{name} must be finite and > 0 for every device")

    def __len__(self) -> int:
        return len(self.compute_ms_per_sample)

    def of(self, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(compute ms/sample, down kbit/s, up kbit/s) of clients, cycling over the devices."""
        index = np.asarray(clients) % len(self)
        return self.compute_ms_per_sample[index], self.down_kbps[index], self.up_kbps[index]


def generate_devices(num_clients: int, seed: int, *, compute_median_ms: float = 20.0,
                     compute_sigma: float = 1.0, bandwidth_median_kbps: float = 5_000.0,
                     bandwidth_sigma: float = 1.2, upload_ratio: float = 0.25,
                     sessions_mean: float = 3.0, session_median_s: float = 3_600.0,
                     always_online: bool = False) -> DevicePopulation:
    """A heavy-tailed population: log-normal compute time and bandwidth, a few online sessions
    a day. The medians and spreads are knobs; the defaults give a ~20x spread between the 5%
    and 95% slowest devices, the long tail that makes over-commitment and Oort matter.
    """
    rng = np.random.default_rng(seed)
    compute = rng.lognormal(np.log(compute_median_ms), compute_sigma, num_clients)
    down = rng.lognormal(np.log(bandwidth_median_kbps), bandwidth_sigma, num_clients)
    up = down * upload_ratio
    availability = None
    if not always_online:
        sessions = 1 + rng.poisson(max(sessions_mean - 1, 0), num_clients)
        owners = np.repeat(np.arange(num_clients), sessions)
        starts = rng.uniform(0, DAY_S, owners.size)
        ends = starts + np.minimum(rng.lognormal(np.log(session_median_s), 1.0, owners.size),
                                   DAY_S)
        # a session running past midnight continues at the start of the (repeating) day
        wraps = ends > DAY_S
        owners = np.concatenate([owners, owners[wraps]])
        starts = np.concatenate([starts, np.zeros(int(wraps.sum()))])
        ends = np.concatenate([np.minimum(ends, DAY_S), ends[wraps] - DAY_S])
        availability = merge_intervals(owners, starts, ends, num_clients)
    return DevicePopulation(compute, down, up, availability)


def merge_intervals(owners: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                    num_clients: int, period_s: float = DAY_S) -> Availability:
    """Availability from possibly overlapping intervals: sorted, overlaps merged per client."""
    order = np.lexsort((starts, owners))
    owners, starts, ends = owners[order], starts[order], ends[order]
    if owners.size == 0:
        return Availability(np.zeros(num_clients + 1, np.int64), starts, ends, period_s)
    # running max of ends within each client (offset per client keeps clients apart)
    shift = owners * (2 * period_s)
    reach = np.maximum.accumulate(ends + shift) - shift
    new = np.ones(owners.size, dtype=bool)
    new[1:] = (owners[1:] != owners[:-1]) | (starts[1:] > reach[:-1])
    first = np.flatnonzero(new)
    merged_owner = owners[first]
    merged_start = starts[first]
    merged_end = np.maximum.reduceat(reach, first)
    offsets = np.searchsorted(merged_owner, np.arange(num_clients + 1))
    return Availability(offsets.astype(np.int64), merged_start, merged_end, period_s)


def save_devices(population: DevicePopulation, path: str | Path) -> None:
    """Our format: `<path>` (parquet: client, compute_ms_per_sample, down_kbps, up_kbps) and,
    with availability, `<path stem>.availability.parquet` (client, start_s, end_s, period_s)."""
    path = Path(path)
    pl.DataFrame({
        "client": np.arange(len(population)),
        "compute_ms_per_sample": population.compute_ms_per_sample,
        "down_kbps": population.down_kbps,
        "up_kbps": population.up_kbps,
    }).write_parquet(path)
    if population.availability is not None:
        a = population.availability
        pl.DataFrame({
            "client": np.repeat(np.arange(a.num_clients), np.diff(a.offsets)),
            "start_s": a.start_s, "end_s": a.end_s,
            "period_s": np.full(len(a.start_s), a.period_s),
        }).write_parquet(_availability_path(path))


def load_devices(path: str | Path) -> DevicePopulation:
    """Read our parquet format (see `save_devices`); the availability file is optional."""
    path = Path(path)
    frame = _read(path, ["client", "compute_ms_per_sample", "down_kbps", "up_kbps"])
    frame = frame.sort("client")
    if not np.array_equal(frame["client"].to_numpy(), np.arange(frame.height)):
        raise DeviceError(f"{path}: column 'client' must hold 0..N-1 once each")
    availability = None
    intervals = _availability_path(path)
    if intervals.exists():
        trace = _read(intervals, ["client", "start_s", "end_s", "period_s"])
        periods = trace["period_s"].unique().to_list()
        if len(periods) > 1:
            raise DeviceError(f"{intervals}: one period_s for all rows expected, got {periods}")
        availability = merge_intervals(
            trace["client"].to_numpy(), trace["start_s"].to_numpy().astype(np.float64),
            trace["end_s"].to_numpy().astype(np.float64), frame.height,
            float(periods[0]) if periods else DAY_S)
    return DevicePopulation(
        frame["compute_ms_per_sample"].to_numpy().astype(np.float64),
        frame["down_kbps"].to_numpy().astype(np.float64),
        frame["up_kbps"].to_numpy().astype(np.float64), availability)


def load_fedscale(capacity_path: str | Path, behave_path: str | Path | None = None, *,
                  allow_pickle: bool = False) -> DevicePopulation:
    """FedScale's `client_device_capacity` ({id: {'computation': ms/sample, 'communication':
    kbit/s}}) and optional `client_behave_trace` ({id: {'active': [s], 'inactive': [s],
    'finish_time': s}}). Both are pickles, so `allow_pickle` must be set explicitly.
    Entries are taken in sorted-id order; 'communication' is used for both directions.
    """
    if not allow_pickle:
        raise DeviceError(f"{capacity_path}: FedScale traces are Python pickles, and loading a "
                          "pickle can run arbitrary code; pass --systems.allow_pickle true if "
                          "you trust the file")
    capacity = _unpickle(capacity_path)
    ids = sorted(capacity)
    try:
        compute = np.array([float(capacity[i]["computation"]) for i in ids])
        bandwidth = np.array([float(capacity[i]["communication"]) for i in ids])
    except (KeyError, TypeError, ValueError) as error:
        raise DeviceError(f"{capacity_path}: expected {{client_id: {{'computation': float, "
                          f"'communication': float}}}} ({error!r})") from error
    availability = None
    if behave_path is not None:
        availability = _fedscale_availability(_unpickle(behave_path), behave_path)
    return DevicePopulation(compute, bandwidth, bandwidth.copy(), availability)


def _fedscale_availability(trace: dict, path: str | Path) -> Availability:
    ids = sorted(trace)
    try:
        periods = {float(trace[i]["finish_time"]) for i in ids}
        owners = np.concatenate([np.full(len(trace[i]["active"]), n) for n, i in enumerate(ids)])
        starts = np.concatenate([np.asarray(trace[i]["active"], np.float64) for i in ids])
        ends = np.concatenate([np.asarray(trace[i]["inactive"], np.float64)[
            :len(trace[i]["active"])] for i in ids])
    except (KeyError, TypeError, ValueError) as error:
        raise DeviceError(f"{path}: expected {{client_id: {{'active': [s], 'inactive': [s], "
                          f"'finish_time': s}}}} ({error!r})") from error
    if len(starts) != len(ends):
        raise DeviceError(f"{path}: every 'active' time needs an 'inactive' time")
    period = max(periods) if periods else DAY_S
    return merge_intervals(owners.astype(np.int64), starts, np.minimum(ends, period), len(ids),
                           period)


def _unpickle(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise DeviceError(f"{path}: file not found")
    with path.open("rb") as f:
        value = pickle.load(f)  # reached only with allow_pickle (see load_fedscale)
    if not isinstance(value, dict):
        raise DeviceError(f"{path}: expected a dict keyed by client id, got {type(value)}")
    return value


def _read(path: Path, columns: list[str]) -> pl.DataFrame:
    if not path.exists():
        raise DeviceError(f"{path}: file not found")
    frame = pl.read_parquet(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DeviceError(f"{path}: missing column(s) {missing}; expected {columns}")
    return frame


def _availability_path(path: Path) -> Path:
    return path.with_name(path.stem + ".availability.parquet")
