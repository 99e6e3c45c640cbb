"""Simulated round time of a client: download + local compute + upload.

Payloads are the bytes the round's plan moves (`Cohort.download_bytes` and `upload_bytes`:
touched rows, never whole tables; uploads as the strategy's protocol sends them), so sparse
updates and local tables make a round shorter in simulated time just as they would on a
device, and secure aggregation's masked vector over the cohort's rows makes it longer.
"""

from __future__ import annotations

import numpy as np

from fltoolkit.systems.devices import DevicePopulation
from fltoolkit.training.cohort import Cohort

BITS_PER_KBIT = 1_000
IDLE_WAIT_S = 60.0  # simulated wait before selecting again when too few clients are online


def client_seconds(population: DevicePopulation, clients: np.ndarray,
                   download_bytes: np.ndarray, samples_trained: np.ndarray,
                   upload_bytes: np.ndarray) -> np.ndarray:
    """Seconds each client needs for its round.

    download_bytes * 8 / (down kbit/s * 1000) + samples_trained * ms per sample / 1000
    + upload_bytes * 8 / (up kbit/s * 1000).
    """
    compute_ms, down_kbps, up_kbps = population.of(clients)
    download = np.asarray(download_bytes, np.float64) * 8 / (down_kbps * BITS_PER_KBIT)
    compute = np.asarray(samples_trained, np.float64) * compute_ms / 1_000
    upload = np.asarray(upload_bytes, np.float64) * 8 / (up_kbps * BITS_PER_KBIT)
    return download + compute + upload


def cohort_seconds(population: DevicePopulation, cohort: Cohort) -> np.ndarray:
    """Seconds each client of a planned cohort needs: its plan's bytes and samples."""
    return client_seconds(population, np.asarray(cohort.clients, dtype=np.int64),
                          cohort.download_bytes, np.array(cohort.samples_trained),
                          cohort.upload_bytes)
