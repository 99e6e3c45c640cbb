"""The `report` section of an experiment: what the summary measures beyond the metrics."""

from __future__ import annotations

from typing import Any


class ReportConfig:
    """Targets a run is measured against.

    Args:
        target_auc: if set, summary.json gets `rounds_to_target` and (with simulated devices)
            `time_to_target`: the first evaluation whose AUC reaches it; null if none did.
        centralized_auc: the AUC of the same model trained centrally (e.g. from a run with
            `--federated.enabled false`): a reference line in the plots and report.
    """

    def __init__(self, target_auc: float | None = None,
                 centralized_auc: float | None = None) -> None:
        for name, value in (("target_auc", target_auc), ("centralized_auc", centralized_auc)):
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"report.{name} must be in (0, 1], got {value}")
        self.target_auc = target_auc
        self.centralized_auc = centralized_auc

    def known_baselines(self) -> dict[str, float]:
        """Reference AUCs given in the config, for summary.json."""
        return {} if self.centralized_auc is None else {"centralized_auc": self.centralized_auc}

    def to_target(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Round and simulated seconds of the first evaluation reaching the target AUC."""
        if self.target_auc is None:
            return {}
        reached = next((row for row in history if row["auc"] >= self.target_auc), None)
        return {"target_auc": self.target_auc,
                "rounds_to_target": reached["round"] if reached else None,
                "time_to_target": reached.get("sim_time_s") if reached else None}
