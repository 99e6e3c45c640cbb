"""What a non-editable install (`pip install .`, a wheel) ships, beyond the Python packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the build reads; copied so that the build leaves no build/ or egg-info in the checkout
SOURCES = ("pyproject.toml", "README.md", "fltoolkit", "recsys", "datamodules", "experiments")


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path / "wheel"), str(source)],
                   check=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    return wheel


def test_the_wheel_ships_the_built_in_experiments(tmp_path):
    """`fltk fit --experiment taobao` must work after `pip install .`, not only from a clone."""
    shipped = set(zipfile.ZipFile(_build_wheel(tmp_path)).namelist())
    experiments = {f"experiments/{path.name}" for path in (ROOT / "experiments").glob("*.yaml")}
    assert experiments
    assert {"experiments/__init__.py", *experiments} - shipped == set()
