"""The test split, held out: settings are chosen on validation, the test split is reported once.

While a run trains, every evaluation scores the validation split (metrics.csv, logs, progress).
The test split is scored alongside, but its metrics stay here until the run ends: then the
final model's test metrics and those of the evaluation with the best validation AUC (early
stopping's choice, reported, not applied) go to summary.json. A datamodule without a
validation split is evaluated on its test split during training, as before; it then has no
best round to report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

METRIC_KEYS = ("auc", "logloss", "ne", "gauc", "calibration")  # summary.json's, of the test split


@dataclass
class HeldOutTest:
    """Test metrics of the latest evaluation and of the best one by validation AUC.

    Attributes:
        last: {"round": r, **test metrics} of the latest evaluation (None before the first).
        best: the same for the best validation AUC so far, with its "validation_auc".
    """

    last: dict[str, Any] | None = None
    best: dict[str, Any] | None = None

    def observe(self, round_index: int, validation: dict[str, float],
                test: dict[str, float]) -> None:
        scored = {"round": round_index, **{key: test[key] for key in METRIC_KEYS}}
        self.last = scored
        auc = validation["auc"]
        best_auc = -math.inf if self.best is None else self.best["validation_auc"]
        if not math.isnan(auc) and auc > best_auc:
            self.best = {**scored, "validation_auc": auc}

    def summary(self, validation: dict[str, Any]) -> dict[str, Any]:
        """The summary's keys: test metrics of the final model at top level, the final
        validation metrics, and the best-validation round with its test metrics."""
        if self.last is None:
            return {}
        return {
            **{key: self.last[key] for key in METRIC_KEYS},
            "evaluated_on": "validation",
            "validation": {key: validation[key] for key in METRIC_KEYS},
            "best_round": (self.best or {}).get("round"),
            "best_validation_auc": (self.best or {}).get("validation_auc"),
            "best_round_test": self.best and {key: self.best[key] for key in METRIC_KEYS},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last, self.best = state["last"], state["best"]
