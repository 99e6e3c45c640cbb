"""The `report` section of an experiment: what the summary measures beyond the metrics."""

from __future__ import annotations

from typing import Any


class ReportConfig:
    """Targets a run is measured against.

    Args:
        target_auc: if set, summary.json gets `rounds_to_target` and (with simulated devices)
            `time_to_target`: the first evaluation whose AUC reaches it; null if none did.
    """

    def __init__(self, target_auc: float | None = None) -> None:
        if target_auc is not None and not 0.0 < target_auc <= 1.0:
            raise ValueError(f"report.target_auc must be in (0, 1], got {target_auc}")
        self.target_auc = target_auc

    def to_target(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Round and simulated seconds of the first evaluation reaching the target AUC."""
        if self.target_auc is None:
            return {}
        reached = next((row for row in history if row["auc"] >= self.target_auc), None)
        return {"target_auc": self.target_auc,
                "rounds_to_target": reached["round"] if reached else None,
                "time_to_target": reached.get("sim_time_s") if reached else None}
