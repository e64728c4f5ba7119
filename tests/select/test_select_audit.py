"""Audit rows on the tiny index: `nds select` and an evaluation's selection are told apart by origin."""

from __future__ import annotations

import json

import pytest

from flows.cli import main as nds_main
from nds.client.images import load_client_images
from nds.client.scoring import score_experts
from nds.corpus.holdout import export_holdout
from nds.formats.scores import load_scores, write_scores
from nds.platform import warehouse


@pytest.fixture(scope="module")
def scores_path(tiny_index, tmp_path_factory):
    ws, _ = tiny_index
    tmp = tmp_path_factory.mktemp("audit-client")
    export_holdout(ws, "mnist", tmp / "task", per_class=3)
    result = score_experts(ws.stage_dir("experts"), load_client_images(tmp / "task", progress=False),
                           mode="rotation", progress=False)
    path = tmp / "scores.json"
    write_scores(path, bundle=result.bundle, mode="rotation", scores=result.scores,
                 seconds_per_expert=result.seconds_per_expert)
    return path


def _rows(ws, ids):
    return {r["selection_id"]: r for r in warehouse.query(
        ws.warehouse_path,
        "SELECT selection_id, origin, requester, flow_run_id, datasets, n_selected, "
        "json_extract(parameters, '$.budget')::DOUBLE AS budget FROM selections WHERE list_contains(?, selection_id)",
        [list(ids)])}


def test_cli_and_evaluation_selections_carry_their_origin(tiny_index, scores_path, tmp_path):
    from nds.evaluate.strategies import load_source_pool, select_for_strategy

    ws, _ = tiny_index
    before = {r["selection_id"] for r in warehouse.query(ws.warehouse_path, "SELECT selection_id FROM selections")}

    assert nds_main(["--root", str(ws.root), "-q", "select", "--scores", str(scores_path), "--budget", "20",
                     "--dataset", "mnist", "--dataset", "fashion", "--out", str(tmp_path / "cli")]) == 0
    cli_id = json.loads((tmp_path / "cli" / "summary.json").read_text())["selection_id"]

    pool = load_source_pool(ws)
    picked = select_for_strategy(ws, pool, "nds", 15, seed=0, scores=load_scores(scores_path))
    assert len(picked) == 15

    after = {r["selection_id"] for r in warehouse.query(ws.warehouse_path, "SELECT selection_id FROM selections")}
    new = after - before
    assert cli_id in new and len(new) == 2
    rows = _rows(ws, new)
    (eval_id,) = new - {cli_id}
    assert rows[cli_id]["origin"] == "cli" and rows[cli_id]["budget"] == 20.0
    assert sorted(rows[cli_id]["datasets"]) == ["fashion", "mnist"]
    assert rows[eval_id]["origin"] == "evaluation" and rows[eval_id]["n_selected"] == 15
    assert rows[eval_id]["datasets"] is None and rows[eval_id]["requester"] is None
