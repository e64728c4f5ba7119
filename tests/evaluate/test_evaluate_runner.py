"""Transfer evaluation: budgets, and the quick flow end to end (table, plot, warehouse rows, CLI)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from nds.errors import InvalidInputError, NDSError
from nds.evaluate.request import quick_request
from nds.evaluate.runner import resolve_budgets

# --------------------------------------------------------------------------- budgets + inputs


def test_resolve_budgets_counts_and_fractions():
    assert resolve_budgets([0.1, 50, 0.1], 1000) == [50, 100]


@pytest.mark.parametrize("budgets", [[], [0], [-5], [1.5], [5000], [float("inf")]])
def test_resolve_budgets_rejects_bad_values(budgets):
    with pytest.raises(NDSError):
        resolve_budgets(budgets, 1000)


def test_resolve_budgets_reads_whole_floats_as_counts():
    # The CLI and the request carry floats: 1.0 and 500.0 are counts, not the whole source.
    assert resolve_budgets([1.0, 500.0, 0.5], 1000) == [1, 500]
    assert resolve_budgets([np.float32(0.25), np.int64(7)], 100) == [7, 25]


def test_resolve_budgets_rejects_a_non_number():
    with pytest.raises(InvalidInputError, match="budget must be a count"):
        resolve_budgets(["10"], 1000)


# --------------------------------------------------------------------------- the quick flow


@pytest.fixture(scope="module")
def quick_run(tiny_index, tmp_path_factory):
    from flows.evaluate import evaluate

    ws, _ = tiny_index
    out = tmp_path_factory.mktemp("eval") / "quick"
    summary = evaluate(quick_request(out_dir=str(out)), str(ws.root))
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
