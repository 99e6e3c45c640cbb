"""The gate between a round's training and its aggregation: faults and checks."""

from fltoolkit.gate.faults import Faults
from fltoolkit.gate.gate import Screened, UpdateGate

__all__ = ["Faults", "Screened", "UpdateGate"]
