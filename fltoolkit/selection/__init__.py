"""Client selectors, chosen by class_path (fltoolkit.selection.UniformSelector, ...)."""

from fltoolkit.selection.base import ClientSelector
from fltoolkit.selection.uniform import UniformSelector

__all__ = ["ClientSelector", "UniformSelector"]
