"""Client selectors, chosen by class_path (fltoolkit.selection.UniformSelector, Oort,
EpochSelector, PoissonSelector)."""

from fltoolkit.selection.base import ClientSelector
from fltoolkit.selection.epoch import EpochSelector
from fltoolkit.selection.oort import Oort
from fltoolkit.selection.poisson import PoissonSelector
from fltoolkit.selection.uniform import UniformSelector

__all__ = ["ClientSelector", "EpochSelector", "Oort", "PoissonSelector", "UniformSelector"]
