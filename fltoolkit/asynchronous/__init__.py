"""Asynchronous federated learning with buffered aggregation (FedBuff) on the simulated
clock: the server's timeline (who trains from which model version, when updates arrive and
are aggregated), its settings and the staleness weights."""

from fltoolkit.asynchronous.policy import AsyncPolicy
from fltoolkit.asynchronous.records import Aggregation, Arrival, Job
from fltoolkit.asynchronous.staleness import StalenessWeight
from fltoolkit.asynchronous.timeline import AsyncTimeline

__all__ = ["Aggregation", "Arrival", "AsyncPolicy", "AsyncTimeline", "Job", "StalenessWeight"]
