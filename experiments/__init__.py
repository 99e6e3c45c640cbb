"""The built-in experiments: this folder's YAML files, shipped as package data so that
`fltk fit --experiment taobao` runs from any folder and after a non-editable install."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def names() -> list[str]:
    """The built-in experiments' names (their files' stems), sorted."""
    return sorted(entry.name.removesuffix(".yaml") for entry in files(__name__).iterdir()
                  if entry.name.endswith(".yaml"))


def find(name: str) -> Traversable | None:
    """The built-in experiment `name` (`taobao` or `taobao.yaml`); None if there is none."""
    stem = name.removesuffix(".yaml")
    return files(__name__) / f"{stem}.yaml" if stem in names() else None


def description(name: str) -> str:
    """What the experiment runs: the first comment line of its YAML."""
    lines = (files(__name__) / f"{name}.yaml").read_text().splitlines()
    return next((line.lstrip("#").strip() for line in lines if line.startswith("#")), "")
