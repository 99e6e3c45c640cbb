"""Server aggregation strategies, selected by class_path (fltoolkit.strategies.FedYogi, ...)."""

from fltoolkit.strategies.base import AggregationError, ServerModel, Strategy
from fltoolkit.strategies.fedavg import FedAvg
from fltoolkit.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedOpt, FedYogi
from fltoolkit.strategies.fedprox import FedProx
from fltoolkit.strategies.qfedavg import QFedAvg

__all__ = ["AggregationError", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedOpt", "FedProx",
           "FedYogi", "QFedAvg", "ServerModel", "Strategy"]
