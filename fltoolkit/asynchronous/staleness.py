"""How much a stale update counts.

An update's staleness s is the number of aggregations between the model version its client
trained from and the version it is aggregated into (0: trained from the current model).
Stale updates point the model where it was, so asynchronous servers scale them down:

    constant    w(s) = 1                                  FedBuff without staleness scaling
    polynomial  w(s) = (1 + s)^-a                         FedAsync (Xie et al., 2019); a = 1/2
                                                          is FedBuff's 1 / sqrt(1 + s) (Nguyen
                                                          et al., AISTATS 2022) and FedScale's
                                                          async aggregator's
    hinge       w(s) = 1 if s <= b, else                  FedAsync: no discount up to b
                       1 / (a (s - b) + 1)                aggregations, then ~1/s

The weight multiplies the update's share of the buffered aggregate. FedBuff sums the
scaled deltas and divides by the buffer size; FedScale divides by the sum of the weights
(a weighted mean, in which equally stale updates are not discounted at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")


@dataclass(frozen=True)
class StalenessWeight:
    """A staleness weight function, chosen by name; calling it gives w(s).

    Attributes:
        function: constant, polynomial or hinge (formulas in the module docstring).
        exponent: a of polynomial (>= 0; 0.5 is FedBuff's and FedScale's).
        slope: a of hinge (>= 0).
        hinge: b of hinge: the staleness up to which updates count fully (>= 0).
    """

    function: Literal["constant", "polynomial", "hinge"] = "polynomial"
    exponent: float = 0.5
    slope: float = 1.0
    hinge: int = 0

    def __post_init__(self) -> None:
        if self.function not in STALENESS_FUNCTIONS:
            raise ValueError(f"unknown staleness function {self.function!r}; choose one of "
                             f"{', '.join(STALENESS_FUNCTIONS)}")
        for name in ("exponent", "slope", "hinge"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"staleness {name} must be finite and >= 0, got {value}")

    def __call__(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        if self.function == "polynomial":
            return (1 + staleness) ** -self.exponent
        if self.function == "hinge" and staleness > self.hinge:
            return 1 / (self.slope * (staleness - self.hinge) + 1)
        return 1.0
