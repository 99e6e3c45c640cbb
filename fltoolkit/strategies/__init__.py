"""Server aggregation strategies, selected by class_path (fltoolkit.strategies.FedYogi, ...)."""

from fltoolkit.strategies.base import AggregationError, ServerModel, Strategy
from fltoolkit.strategies.fedavg import FedAvg
from fltoolkit.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedOpt, FedYogi
from fltoolkit.strategies.fedprox import FedProx
from fltoolkit.strategies.qfedavg import QFedAvg
from fltoolkit.strategies.robust import CoordinateMedian, NormClippedFedAvg, TrimmedMean

__all__ = ["AggregationError", "CoordinateMedian", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM",
           "FedOpt", "FedProx", "FedYogi", "NormClippedFedAvg", "QFedAvg", "ServerModel",
           "Strategy", "TrimmedMean"]
