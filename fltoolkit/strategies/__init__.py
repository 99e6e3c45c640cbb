"""Server aggregation strategies, selected by class_path (fltoolkit.strategies.FedYogi, ...),
and wrappers that add a concern to any of them (NormClipping)."""

from fltoolkit.strategies.base import (
    AggregationError,
    ServerModel,
    Strategy,
    StrategyWrapper,
)
from fltoolkit.strategies.clipping import NormClipping
from fltoolkit.strategies.fedavg import FedAvg
from fltoolkit.strategies.fedavgm import FedAvgM
from fltoolkit.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi, ServerOptimizer
from fltoolkit.strategies.qfedavg import QFedAvg
from fltoolkit.strategies.robust import CoordinateMedian, TrimmedMean

__all__ = ["AggregationError", "CoordinateMedian", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM",
           "FedOpt", "FedYogi", "NormClipping", "QFedAvg", "ServerModel", "ServerOptimizer",
           "Strategy", "StrategyWrapper", "TrimmedMean"]
