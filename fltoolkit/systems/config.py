"""The `systems` section of an experiment: simulated devices, clock and round policy."""

from __future__ import annotations

from fltoolkit.systems.devices import (
    DevicePopulation,
    generate_devices,
    load_devices,
    load_fedscale,
)
from fltoolkit.systems.policy import RoundPolicy


class SystemsConfig:
    """How devices are simulated (off by default: every selected client is aggregated).

    Args:
        enabled: simulate devices: a clock (`sim_time_s` in metrics.csv and summary.json),
            over-commitment, a deadline and clients going offline.
        devices: a device file in our parquet format (`fltoolkit.systems.devices.save_devices`);
            unset: a seeded heavy-tailed population is generated.
        fedscale_capacity: FedScale's `client_device_capacity` pickle (instead of `devices`).
        fedscale_behave: FedScale's `client_behave_trace` pickle (availability), optional.
        allow_pickle: must be true to read FedScale's files: unpickling can run code.
        availability: clients go offline per the population's online intervals; false: they
            are always online.
        over_commit: select ceil(clients_per_round * over_commit) and keep the first to finish.
        deadline_s: drop clients slower than this (simulated seconds); unset: no deadline.
        min_updates: skip a round (logged) when fewer updates survive.
    """

    def __init__(self, enabled: bool = False, devices: str | None = None,
                 fedscale_capacity: str | None = None, fedscale_behave: str | None = None,
                 allow_pickle: bool = False, availability: bool = True,
                 over_commit: float = 1.0, deadline_s: float | None = None,
                 min_updates: int = 1) -> None:
        if devices and fedscale_capacity:
            raise ValueError("set at most one of systems.devices and systems.fedscale_capacity")
        if (fedscale_capacity or fedscale_behave) and not allow_pickle:
            raise ValueError("systems.fedscale_capacity / fedscale_behave are Python pickles, and "
                             "loading a pickle can run arbitrary code; pass "
                             "--systems.allow_pickle true if you trust the files")
        self.enabled = enabled
        self.devices = devices
        self.fedscale_capacity = fedscale_capacity
        self.fedscale_behave = fedscale_behave
        self.allow_pickle = allow_pickle
        self.availability = availability
        self.policy = RoundPolicy(over_commit, deadline_s, min_updates)

    def population(self, num_clients: int, seed: int) -> DevicePopulation:
        """The devices of the run's clients (reused cyclically if the file has fewer)."""
        if self.devices:
            population = load_devices(self.devices)
        elif self.fedscale_capacity:
            population = load_fedscale(self.fedscale_capacity, self.fedscale_behave,
                                       allow_pickle=self.allow_pickle)
        else:
            population = generate_devices(num_clients, seed)
        if not self.availability:
            population = DevicePopulation(population.compute_ms_per_sample,
                                          population.down_kbps, population.up_kbps)
        return population
