"""Transfer evaluation: the log-linear fit and its inverse, bad input, and the quick flow end to end."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nds.evaluate import runner as evaluation
from nds.errors import NDSError

# --------------------------------------------------------------------------- fit + inverse


def test_fit_log_linear_recovers_exact_line():
    budgets = [100, 300, 1000, 3000, 10000]
    accs = [0.2 + 0.05 * math.log(b) for b in budgets]
    a, b, se_a, se_b = evaluation.fit_log_linear(budgets, accs)
    assert a == pytest.approx(0.2, abs=1e-9)
    assert b == pytest.approx(0.05, abs=1e-10)
    assert se_a == pytest.approx(0, abs=1e-6) and se_b == pytest.approx(0, abs=1e-6)


def test_fit_log_linear_standard_errors_match_textbook():
    rng = np.random.default_rng(0)
    x = np.repeat([100, 500, 2000, 8000], 3).astype(float)
    y = 0.3 + 0.04 * np.log(x) + rng.normal(0, 0.01, len(x))
    fit = evaluation.fit_log_linear(x, y)
    lx = np.log(x)
    resid = y - (fit.a + fit.b * lx)
    s2 = resid @ resid / (len(x) - 2)
    se_b = math.sqrt(s2 / ((lx - lx.mean()) ** 2).sum())
    assert fit.se_b == pytest.approx(se_b, rel=1e-9)
    assert fit.n_points == 12 and fit.budget_range == (100.0, 8000.0)


def test_two_points_fit_has_no_standard_errors():
    fit = evaluation.fit_log_linear([10, 100], [0.5, 0.6])
    assert math.isnan(fit.se_a) and math.isnan(fit.se_b)
    budget, low, high = evaluation.predict_budget(fit, 0.55)
    assert budget == pytest.approx(math.sqrt(1000))
    assert math.isnan(low) and math.isnan(high)


@settings(max_examples=50, deadline=None)
@given(a=st.floats(-1, 1), b=st.floats(0.001, 0.2), budget=st.floats(2, 1e6))
def test_predict_budget_inverts_the_fit(a, b, budget):
    fit = evaluation.LogLinearFit(a, b, 0.0, 0.0)
    acc = a + b * math.log(budget)
    if not 0 < acc <= 1:
        return
    got, low, high = evaluation.predict_budget(fit, acc)
    assert got == pytest.approx(budget, rel=1e-6)
    assert low == pytest.approx(budget, rel=1e-6) and high == pytest.approx(budget, rel=1e-6)


def test_predict_budget_interval_brackets_the_estimate():
    fit = evaluation.fit_log_linear([100, 100, 1000, 1000, 10000, 10000], [0.50, 0.52, 0.61, 0.60, 0.70, 0.71])
    budget, low, high = evaluation.predict_budget(fit, 0.65)
    assert low < budget < high
    assert 1000 < budget < 10000


def test_predict_budget_out_of_reach():
    fit = evaluation.LogLinearFit(0.5, 0.01, 0.01, 0.001)
    assert evaluation.predict_budget(fit, 0.99, max_budget=20000)[0] == math.inf  # needs e^49 samples
    assert evaluation.predict_budget(evaluation.LogLinearFit(0.5, -0.01, 0, 0), 0.6)[0] == math.inf
    assert evaluation.predict_budget(evaluation.LogLinearFit(0.5, 0.0, 0, 0), 0.6)[0] == math.inf
    lines = evaluation.budget_answer_lines({"digits": {"nds": fit}}, 0.99, n_source=20000)
    assert "out of reach" in lines[0]


@pytest.mark.parametrize("budgets, accs", [([10], [0.5]), ([10, 10], [0.5, 0.6]), ([0, 10], [0.5, 0.6]),
                                           ([-1, 10], [0.5, 0.6]), ([10, 100], [0.5]),
                                           ([10, 100], [0.5, float("nan")])])
def test_fit_log_linear_rejects_bad_input(budgets, accs):
    with pytest.raises(NDSError):
        evaluation.fit_log_linear(budgets, accs)


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5])
def test_predict_budget_rejects_impossible_accuracy(target):
    with pytest.raises(NDSError, match="target accuracy"):
        evaluation.predict_budget(evaluation.LogLinearFit(0.5, 0.1, 0, 0), target)


# --------------------------------------------------------------------------- budgets + inputs


def test_resolve_budgets_counts_and_fractions():
    assert evaluation.resolve_budgets([0.1, 50, 0.1], 1000) == [50, 100]


@pytest.mark.parametrize("budgets", [[], [0], [-5], [1.5], [5000], [float("inf")]])
def test_resolve_budgets_rejects_bad_values(budgets):
    with pytest.raises(NDSError):
        evaluation.resolve_budgets(budgets, 1000)


def test_unknown_task_lists_the_valid_ones(tmp_path):
    from nds.config import Workspace

    with pytest.raises(NDSError, match="digits.*clothing.*letters"):
        evaluation.build_target_task(Workspace(tmp_path), "cifar")


def test_pretrain_schedule_is_epochs_clamped_to_floor_and_cap():
    cfg = evaluation.TrainConfig()  # 30 epochs of batch 128, clamped to [300, 3600] steps
    assert evaluation.pretrain_schedule(448, cfg) == 300
    assert evaluation.pretrain_schedule(2240, cfg) == 525
    assert evaluation.pretrain_schedule(4480, cfg) == 1050
    assert evaluation.pretrain_schedule(22402, cfg) == 3600
    fixed = evaluation.TrainConfig(pretrain_epochs=None, pretrain_steps=150)
    assert evaluation.pretrain_schedule(10, fixed) == evaluation.pretrain_schedule(10**6, fixed) == 150
    assert evaluation.pretrain_schedule(10, evaluation.TrainConfig(pretrain_steps=20)) == 20  # floor <= cap
    assert evaluation.quick_request().train.pretrain_epochs is None


def test_finetune_rejects_test_classes_without_training_images():
    x = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(NDSError, match="test set"):
        evaluation.finetune_and_test(None, x, np.array(["a", "b", "a", "b"]), x, np.array(["a", "c", "a", "b"]))


def test_finetune_does_not_modify_the_pretrained_model():
    import torch

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    y = np.array(["a", "b"] * 8)
    cfg = evaluation.TrainConfig(pretrain_steps=2, finetune_steps=2, pretrain_batch=8, finetune_batch=8)
    model = evaluation.pretrain(x, y, config=cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = evaluation.finetune_and_test(model, x, y, x, y, config=cfg)
    assert 0 <= acc <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- the quick flow


@pytest.fixture(scope="module")
def quick_run(tiny_index, tmp_path_factory):
    from flows.evaluate import evaluate

    ws, _ = tiny_index
    out = tmp_path_factory.mktemp("eval") / "quick"
    summary = evaluate(evaluation.quick_request(out_dir=str(out)), str(ws.root))
    return ws, summary


def test_quick_flow_writes_table_plot_and_warehouse_rows(quick_run):
    from nds.platform import warehouse
    ws, summary = quick_run
    results = pq.read_table(summary["paths"]["results"]).to_pylist()
    # 2 budgets x (nds, uniform) + all + none, one task, one seed
    assert len(results) == summary["rows"] == 6
    by = {}
    for r in results:
        by.setdefault(r["strategy"], []).append(r)
    assert len(by["nds"]) == len(by["uniform"]) == 2
    assert len(by["all"]) == 1 and by["all"][0]["budget"] == summary["n_source"]
    assert len(by["none"]) == 1 and by["none"][0]["budget"] == 0 and by["none"][0]["n_pretrain"] == 0
    assert all(0 <= r["accuracy"] <= 1 for r in results)
    assert [r["n_pretrain"] for r in by["nds"]] == [r["budget"] for r in by["nds"]]
    assert open(summary["paths"]["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(summary["paths"]["markdown"]).read()
    assert "| digits | nds |" in md and "| digits | none |" in md
    assert set(summary["fits"]["digits"]) == {"nds", "uniform"}
    rows = warehouse.query(ws.warehouse_path, "SELECT strategy, count(*) AS n FROM evaluations "
                           "WHERE evaluation_id = ? GROUP BY 1 ORDER BY 1", [summary["evaluation_id"]])
    assert {r["strategy"]: r["n"] for r in rows} == {"all": 1, "nds": 2, "none": 1, "uniform": 2}


def test_quick_flow_nds_selects_the_target_domain(quick_run):
    from nds.select.service import load_current_index

    ws, summary = quick_run
    results = pq.read_table(summary["paths"]["results"]).to_pylist()
    datasets = load_current_index(ws).catalog.column("dataset").to_pylist()
    share = datasets.count("mnist") / len(datasets)
    for r in results:
        if r["strategy"] == "nds":
            assert r["domain_precision"] > share
        if r["strategy"] == "none":
            assert r["domain_precision"] is None


def test_cli_answers_target_accuracy_from_a_finished_run(quick_run, capsys):
    from flows.cli import main

    _, summary = quick_run
    assert main(["-q", "evaluate", "--from", summary["out_dir"], "--target-accuracy", "0.99"]) == 0
    out = capsys.readouterr().out
    assert "digits nds: accuracy 0.990" in out
    assert main(["-q", "evaluate", "--from", summary["out_dir"]]) == 2
    assert main(["--root", summary["out_dir"], "-q", "evaluate", "--quick", "--task", "cifar"]) == 2
    assert "unknown target task" in capsys.readouterr().err
