"""Evaluation outputs: the files write_outputs leaves (atomically) and the warehouse rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nds.config import Workspace
from nds.evaluate.fit import load_fits
from nds.evaluate.outputs import (EVALUATION_COLUMNS, RESULT_COLUMNS, RESULTS_SCHEMA, record_evaluation,
                                  summarize, write_outputs)


def _results() -> pa.Table:
    rows = []
    for strategy, budgets in (("none", [0]), ("uniform", [10, 100]), ("all", [1000]), ("nds", [10, 100])):
        for budget in budgets:
            for seed in (0, 1):
                rows.append({
                    "task": "digits", "domain": "mnist", "strategy": strategy, "budget": budget,
                    "budget_fraction": budget / 1000, "seed": seed,
                    "accuracy": 0.5 + 0.01 * seed + (0.02 * len(str(budget)) if budget else 0.0),
                    "domain_precision": None if strategy == "none" else 0.4, "n_pretrain": budget,
                    "pretrain_seconds": 0.1, "finetune_seconds": 0.2,
                })
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


def test_summary_lists_strategies_in_registry_order():
    summary = summarize(_results()).to_pylist()
    assert [(r["strategy"], r["budget"]) for r in summary] == [
        ("nds", 10), ("nds", 100), ("uniform", 10), ("uniform", 100), ("all", 1000), ("none", 0)]
    assert all(r["n_seeds"] == 2 for r in summary)


def test_write_outputs_writes_every_file_and_no_temporaries(tmp_path):
    out = tmp_path / "run"
    written = write_outputs(_results(), out, meta={"n_source": 1000, "evaluation_id": "eval-x"})
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.parquet", "summary.parquet", "summary.csv", "summary.md", "fits.json", "accuracy_vs_budget.png"])
    assert written["paths"] == {k: str(out / n) for k, n in (
        ("results", "results.parquet"), ("summary", "summary.parquet"), ("summary_csv", "summary.csv"),
        ("markdown", "summary.md"), ("fits", "fits.json"), ("plot", "accuracy_vs_budget.png"))}
    assert pq.read_table(out / "results.parquet").equals(_results())
    text = (out / "fits.json").read_text()
    assert text.endswith("}\n") and list(json.loads(text)) == ["meta", "fits"]
    assert (out / "summary.md").read_text() == written["markdown"]
    fits, meta = load_fits(out)
    assert fits == written["fits"] and set(fits["digits"]) == {"nds", "uniform"}
    assert meta["n_source"] == 1000


def test_record_evaluation_names_its_columns_and_replaces_its_rows(tmp_path):
    from nds.platform import warehouse

    ws = Workspace(tmp_path)
    assert EVALUATION_COLUMNS[3:-1] == RESULT_COLUMNS
    for _ in range(2):
        n = record_evaluation(ws, _results(), evaluation_id="eval-1", index_version="v1", params={"shots": 2})
    assert n == _results().num_rows
    rows = warehouse.query(ws.warehouse_path, "SELECT * FROM evaluations WHERE evaluation_id = ? "
                           "ORDER BY strategy, budget, seed", ["eval-1"])
    assert len(rows) == n
    first = rows[0]
    assert (first["strategy"], first["budget"], first["seed"], first["index_version"]) == ("all", 1000, 0, "v1")
    assert first["accuracy"] == pytest.approx(0.58) and json.loads(first["params"]) == {"shots": 2}
    assert first["domain"] == "mnist" and first["n_pretrain"] == 1000 and first["finetune_seconds"] == 0.2
