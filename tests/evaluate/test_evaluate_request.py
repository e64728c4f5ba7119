"""EvaluateRequest: the flow's form checks budgets with the run's own parser."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nds._registry import EVAL_STRATEGIES
from nds.evaluate.request import EvaluateRequest, quick_request


def test_defaults_name_every_registered_strategy():
    assert EvaluateRequest().strategies == EVAL_STRATEGIES.names()
    assert quick_request().budgets == [0.1, 0.3]


def test_counts_and_fractions_are_accepted_whatever_the_index_size():
    assert EvaluateRequest(budgets=[2000, 0.1, 1e9]).budgets == [2000.0, 0.1, 1e9]


@pytest.mark.parametrize("budgets, message", [
    ([], "give at least one budget"),
    ([0], "neither a whole count nor a fraction"),
    ([-5], "neither a whole count nor a fraction"),
    ([1.5], "budget 1.5 is neither a whole count nor a fraction"),
    ([float("nan")], "neither a whole count nor a fraction"),
])
def test_bad_budgets_fail_when_the_form_is_submitted(budgets, message):
    with pytest.raises(ValidationError, match=message):
        EvaluateRequest(budgets=budgets)


def test_unknown_strategy_is_a_validation_error():
    with pytest.raises(ValidationError, match="strategies must be some of: nds, uniform, all, none"):
        EvaluateRequest(strategies=["best"])


def test_the_scorer_is_one_of_the_registered_ones_and_cross_domain_tasks_are_known():
    assert EvaluateRequest().scorer is None  # the client's default for the bundle (runner.default_scorer)
    assert EvaluateRequest(scorer="features", tasks=["digits-m", "nebulae"]).scorer == "features"
    with pytest.raises(ValidationError, match="unknown scorer 'magic'; choose from: linear, rotation, rotation-prob, logme, features"):
        EvaluateRequest(scorer="magic")
