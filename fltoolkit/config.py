"""Typed sections of an experiment that are fltk's own (not a model's or a datamodule's).

LightningCLI reads these signatures, so every key is documented, typed, overridable on the
command line (`--federated.enabled false`) and rejected with its name when misspelled.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FederatedConfig:
    """How the model is trained.

    Attributes:
        enabled: train federated (each user a client) when true; centrally with a Lightning
            Trainer when false (the baseline: same data, model and metrics).
    """

    enabled: bool = False


class ConfigError(ValueError):
    """A configuration value that parses but cannot be used; the message names the key."""
