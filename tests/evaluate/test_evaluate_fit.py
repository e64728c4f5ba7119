"""The log-linear fit of accuracy against budget, its inverse and the fits.json round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nds.errors import NDSError, NotFoundError
from nds.evaluate.fit import (LogLinearFit, budget_answer_lines, fit_log_linear, fits_from_dict, fits_to_dict,
                              load_fits, predict_budget)

# --------------------------------------------------------------------------- fit + inverse


def test_fit_log_linear_recovers_exact_line():
    budgets = [100, 300, 1000, 3000, 10000]
    accs = [0.2 + 0.05 * math.log(b) for b in budgets]
    a, b, se_a, se_b = fit_log_linear(budgets, accs)
    assert a == pytest.approx(0.2, abs=1e-9)
    assert b == pytest.approx(0.05, abs=1e-10)
    assert se_a == pytest.approx(0, abs=1e-6) and se_b == pytest.approx(0, abs=1e-6)


def test_fit_log_linear_standard_errors_match_textbook():
    rng = np.random.default_rng(0)
    x = np.repeat([100, 500, 2000, 8000], 3).astype(float)
    y = 0.3 + 0.04 * np.log(x) + rng.normal(0, 0.01, len(x))
    fit = fit_log_linear(x, y)
    lx = np.log(x)
    resid = y - (fit.a + fit.b * lx)
    s2 = resid @ resid / (len(x) - 2)
    se_b = math.sqrt(s2 / ((lx - lx.mean()) ** 2).sum())
    assert fit.se_b == pytest.approx(se_b, rel=1e-9)
    assert fit.n_points == 12 and fit.budget_range == (100.0, 8000.0)


def test_two_points_fit_has_no_standard_errors():
    fit = fit_log_linear([10, 100], [0.5, 0.6])
    assert math.isnan(fit.se_a) and math.isnan(fit.se_b)
    budget, low, high = predict_budget(fit, 0.55)
    assert budget == pytest.approx(math.sqrt(1000))
    assert math.isnan(low) and math.isnan(high)


@settings(max_examples=50, deadline=None)
@given(a=st.floats(-1, 1), b=st.floats(0.001, 0.2), budget=st.floats(2, 1e6))
def test_predict_budget_inverts_the_fit(a, b, budget):
    fit = LogLinearFit(a, b, 0.0, 0.0)
    acc = a + b * math.log(budget)
    if not 0 < acc <= 1:
        return
    got, low, high = predict_budget(fit, acc)
    assert got == pytest.approx(budget, rel=1e-6)
    assert low == pytest.approx(budget, rel=1e-6) and high == pytest.approx(budget, rel=1e-6)


def test_predict_budget_interval_brackets_the_estimate():
    fit = fit_log_linear([100, 100, 1000, 1000, 10000, 10000], [0.50, 0.52, 0.61, 0.60, 0.70, 0.71])
    budget, low, high = predict_budget(fit, 0.65)
    assert low < budget < high
    assert 1000 < budget < 10000


def test_predict_budget_out_of_reach():
    fit = LogLinearFit(0.5, 0.01, 0.01, 0.001)
    assert predict_budget(fit, 0.99, max_budget=20000)[0] == math.inf  # needs e^49 samples
    assert predict_budget(LogLinearFit(0.5, -0.01, 0, 0), 0.6)[0] == math.inf
    assert predict_budget(LogLinearFit(0.5, 0.0, 0, 0), 0.6)[0] == math.inf
    lines = budget_answer_lines({"digits": {"nds": fit}}, 0.99, n_source=20000)
    assert "out of reach" in lines[0]


@pytest.mark.parametrize("budgets, accs", [([10], [0.5]), ([10, 10], [0.5, 0.6]), ([0, 10], [0.5, 0.6]),
                                           ([-1, 10], [0.5, 0.6]), ([10, 100], [0.5]),
                                           ([10, 100], [0.5, float("nan")])])
def test_fit_log_linear_rejects_bad_input(budgets, accs):
    with pytest.raises(NDSError):
        fit_log_linear(budgets, accs)


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5])
def test_predict_budget_rejects_impossible_accuracy(target):
    with pytest.raises(NDSError, match="target accuracy"):
        predict_budget(LogLinearFit(0.5, 0.1, 0, 0), target)


# --------------------------------------------------------------------------- fits.json


def test_fits_dict_round_trip():
    fits = {"digits": {"nds": fit_log_linear([10, 100, 1000], [0.5, 0.62, 0.7])}}
    assert fits_from_dict(fits_to_dict(fits)) == fits


def test_load_fits_of_a_missing_folder_says_how_to_make_it(tmp_path):
    with pytest.raises(NotFoundError, match=r"fits\.json not found: run `nds evaluate --out "):
        load_fits(tmp_path / "nowhere")
