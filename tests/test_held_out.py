"""The validation protocol: the test split is held out and reported for the final model and
for the round with the best validation AUC; a diverged model stops the run."""

from __future__ import annotations

import math

import pytest
import torch

from fltoolkit.server.held_out import HeldOutTest


def _metrics(auc: float) -> dict[str, float]:
    return {"auc": auc, "logloss": 1 - auc, "ne": 1.0, "gauc": auc, "calibration": 1.0}


def test_best_round_is_chosen_on_validation_and_reports_its_test_metrics():
    held = HeldOutTest()
    held.observe(10, _metrics(0.70), _metrics(0.60))
    held.observe(20, _metrics(0.75), _metrics(0.58))  # best on validation, worse on test
    held.observe(30, _metrics(math.nan), _metrics(0.90))  # NaN never wins
    held.observe(40, _metrics(0.74), _metrics(0.65))
    summary = held.summary(_metrics(0.74))
    assert summary["auc"] == 0.65  # the final model's test AUC
    assert summary["validation"]["auc"] == 0.74
    assert (summary["best_round"], summary["best_validation_auc"]) == (20, 0.75)
    assert summary["best_round_test"]["auc"] == 0.58
    again = HeldOutTest()
    again.load_state_dict(held.state_dict())
    assert again.summary(_metrics(0.74)) == summary


def test_a_federated_run_reports_validation_while_training_and_test_at_the_end(
        synthetic_data_with_validation):
    from tests.test_federated import _loop

    data = synthetic_data_with_validation
    loop = _loop(data, rounds=4, eval_interval=2)
    final = loop.run()
    from fltoolkit.server.evaluation import evaluate

    test = evaluate(loop.module, loop.parts, data.test, 4096, data.train.client_ids)
    validation = evaluate(loop.module, loop.parts, data.validation, 4096,
                          data.train.client_ids)
    assert loop.history[-1]["auc"] == pytest.approx(validation.metrics["auc"])
    assert final["auc"] == pytest.approx(test.metrics["auc"])
    assert final["validation"]["auc"] == pytest.approx(validation.metrics["auc"])
    assert final["best_round"] in (2, 4)


def test_a_diverged_global_model_stops_the_run_with_a_clear_error(synthetic_data):
    """Finite but huge weights (here a table learning rate of 1e30) give NaN logits: the run
    stops with one line instead of logging NaN metrics for the remaining rounds."""
    from tests.test_federated import _loop

    loop = _loop(synthetic_data, rounds=2, eval_interval=1, local_tables=["user"],
                 optimizers=(lambda p: torch.optim.SGD(p, lr=0.3),
                             lambda p: torch.optim.SGD(p, lr=1e30)))
    with pytest.raises(FloatingPointError, match="round 1: the global model gives non-finite"):
        loop.run()


def test_the_centralized_section_replaces_only_the_optimizers_it_sets(synthetic_data):
    from fltoolkit.run.centralized import CentralizedConfig
    from recsys.module import CTRModule

    module = CTRModule(embedding_dim=4, features=synthetic_data.features,
                       dense_optimizer=lambda p: torch.optim.SGD(p, lr=0.3),
                       sparse_optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    CentralizedConfig(sparse_optimizer=lambda p: torch.optim.SGD(p, lr=3.0)).apply(module)
    dense, sparse = module.configure_optimizers().optimizers
    assert dense.param_groups[0]["lr"] == 0.3 and sparse.param_groups[0]["lr"] == 3.0
