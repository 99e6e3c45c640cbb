"""Privacy mechanisms: client-local embedding tables that never leave the client, and the
privacy accountant of client-level DP-FedAvg. Each is imported on first use, so that
`fltk privacy` does not import torch, nor training dp-accounting."""

from importlib import import_module
from typing import Any

_MODULE_OF = {
    "LocalTableStore": "fltoolkit.privacy.local_tables",
    "ClientSampling": "fltoolkit.privacy.accountant",
    "PrivacyAccountant": "fltoolkit.privacy.accountant",
    "default_delta": "fltoolkit.privacy.accountant",
    "noise_multiplier_for": "fltoolkit.privacy.accountant",
}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'fltoolkit.privacy' has no attribute {name!r}")
