"""The package layering: datamodules imports neither recsys nor fltoolkit; recsys never imports
fltoolkit. A back-edge (even a lazy import inside a function) would make the bottom layer
depend on the ones built on it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"datamodules": ("recsys", "fltoolkit"), "recsys": ("fltoolkit",)}


def _imported_packages(path: Path) -> set[str]:
    """Top-level package of every import statement in a file, wherever it stands."""
    packages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            packages.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            packages.add(node.module.split(".")[0])
    return packages


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_goes_up_a_layer(package):
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _imported_packages(path) & set(FORBIDDEN[package])
    }
    assert not offenders
