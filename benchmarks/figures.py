"""How every benchmark reports: one aligned line per figure, the command, then JSON."""

from __future__ import annotations

import json
from typing import Any


def print_figures(benchmark: str, figures: dict[str, Any], command: str) -> None:
    """Print the figures, the command that reproduces them, and JSON on the last line."""
    width = max(map(len, figures), default=0) + 2
    for key, value in figures.items():
        print(f"{key:<{width}s} {value}")
    print(f"command: {command}")
    print(json.dumps({"benchmark": benchmark, **figures}))
