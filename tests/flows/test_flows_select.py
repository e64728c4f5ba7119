"""End to end on the tiny index: held-out client images -> scores -> select flow -> manifest."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from nds.select import service as selections
from flows.cli import main as nds_main
from nds.client.images import compute_image_hashes, load_client_images
from nds.corpus.read import load_catalog, load_images_at
from nds.errors import NDSError
from nds.client.scoring import score_experts
from nds.formats.scores import write_scores
from nds.corpus.holdout import export_holdout

DOMAIN = "mnist"


@pytest.fixture(scope="module")
def client_scores(tiny_index, tmp_path_factory):
    ws, _ = tiny_index
    tmp = tmp_path_factory.mktemp("client")
    export_holdout(ws, DOMAIN, tmp / "task", per_class=5)
    data = load_client_images(tmp / "task", progress=False)
    result = score_experts(ws.stage_dir("experts"), data, mode="rotation", progress=False)
    path = tmp / "scores.json"
    write_scores(path, bundle=result.bundle, mode="rotation", scores=result.scores,
                 seconds_per_expert=result.seconds_per_expert)
    return path


def _request(scores_path, **kw):
    return selections.SelectRequest(scores_path=str(scores_path), **{"budget": 0.1, **kw})


def test_selection_is_dominated_by_the_clients_domain(tiny_index, client_scores, tmp_path, monkeypatch):
    from flows.select import select

    ws, _ = tiny_index
    monkeypatch.setenv("NDS_MANIFESTS", str(tmp_path / "manifests"))
    summary = select(_request(client_scores, out_name="first"), str(ws.root))
    n_source = load_catalog(ws.data_dir).num_rows
    assert summary["rows"] == round(0.1 * n_source)
    share = summary["counts_per_dataset"].get(DOMAIN, 0) / summary["rows"]
    corpus_share = 1 / 7
    print(f"tiny: {DOMAIN} share of a 10% selection = {share:.3f} (corpus share {corpus_share:.3f})")
    assert share > 2.5 * corpus_share

    m = pq.read_table(tmp_path / "manifests" / "first" / "manifest.parquet")
    assert m.column_names == ["sample_id", "dataset", "uri", "label", "probability", "expert", "rank", "sha256"]
    assert len(set(m.column("sample_id").to_pylist())) == m.num_rows
    assert m.column("rank").to_pylist() == list(range(m.num_rows))

    # Same seed and inputs -> the same manifest; another seed -> another one.
    again = select(_request(client_scores, out_name="again"), str(ws.root))
    other = select(_request(client_scores, out_name="other", seed=1), str(ws.root))
    assert again["manifest_sha256"] == summary["manifest_sha256"]
    assert other["manifest_sha256"] != summary["manifest_sha256"]

    # The warehouse's selections view lists the runs, queryable by data engineers.
    # The view reads selections/ relative to the warehouse folder (a copy reads its own rows).
    con = duckdb.connect(str(ws.warehouse_path), config={"file_search_path": str(ws.warehouse_path.parent)})
    try:
        rows = con.execute(
            "SELECT selection_id, n_selected, manifest_sha256 FROM selections WHERE selection_id IN (?, ?)",
            [summary["selection_id"], again["selection_id"]],
        ).fetchall()
    finally:
        con.close()
    assert {r[0] for r in rows} == {summary["selection_id"], again["selection_id"]}
    assert all(r[1] == summary["rows"] for r in rows)


def test_contamination_guard_excludes_the_clients_own_images(tiny_index, tmp_path, monkeypatch):
    """A client whose test images ARE in the source: with their hashes, none is selected."""
    ws, _ = tiny_index
    monkeypatch.setenv("NDS_MANIFESTS", str(tmp_path / "manifests"))
    cat = load_catalog(ws.data_dir)
    take = np.flatnonzero(np.asarray(cat.column("dataset").to_pylist()) == DOMAIN)[:40]
    images = load_images_at(ws.data_dir, cat.column("uri").take(take).to_pylist())
    from PIL import Image

    for i, img in enumerate(images):
        folder = tmp_path / "task" / str(i % 2)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    data = load_client_images(tmp_path / "task", progress=False)
    hashes = compute_image_hashes(data.images)
    index = pq.read_table(ws.stage_dir("extract") / "index.parquet").to_pylist()
    pixel_sha256 = {r["sample_id"]: r["pixel_sha256"] for r in index}
    assert set(hashes) == {pixel_sha256[s] for s in cat.column("sample_id").take(take).to_pylist()}
    assert not set(hashes) & set(cat.column("sha256").to_pylist()), "the catalog hashes the PNG bytes, not pixels"
    result = score_experts(ws.stage_dir("experts"), data, mode="rotation", progress=False)
    write_scores(tmp_path / "scores.json", bundle=result.bundle, mode="rotation", scores=result.scores,
                 seconds_per_expert=result.seconds_per_expert, hashes=hashes)
    n_source = cat.num_rows
    summary = selections.run_selection(ws, _request(tmp_path / "scores.json", budget=n_source - 40, out_name="all"))
    assert summary["n_excluded"] == 40 and summary["rows"] == n_source - 40
    selected = set(pq.read_table(tmp_path / "manifests" / "all" / "manifest.parquet").column("sample_id").to_pylist())
    assert not selected & set(cat.column("sample_id").take(take).to_pylist())


def _scores_doc(path: Path) -> dict:
    return json.loads(path.read_text())


BAD_REQUESTS = [
    ("nan score", lambda d: d["scores"].__setitem__(0, float("nan")), {}, "finite|NaN|nan"),
    ("wrong K", lambda d: d["scores"].pop(), {}, "scores|experts"),
    ("other index", lambda d: d.__setitem__("index_version", "0" * 16), {}, "fetch the current expert bundle"),
    ("other bundle", lambda d: d.__setitem__("bundle_sha256", "f" * 64), {}, "different expert bundle"),
    ("budget too big", None, {"budget": 10_000_000}, "eligible|exceeds"),
    ("unknown dataset", None, {"datasets": ["cifar"]}, "unknown dataset filter"),
    ("traversal", None, {"out_name": "../escape"}, r"'\.\.'"),
]


@pytest.mark.parametrize("name,mutate,overrides,match", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_fail_clearly_and_write_nothing(tiny_index, client_scores, tmp_path, monkeypatch,
                                                     name, mutate, overrides, match):
    ws, _ = tiny_index
    monkeypatch.setenv("NDS_MANIFESTS", str(tmp_path / "manifests"))
    doc = _scores_doc(client_scores)
    if mutate:
        mutate(doc)
    before = sorted(p.name for p in selections.selections_dir(ws).glob("*")) if selections.selections_dir(ws).exists() else []
    request = selections.SelectRequest(scores=json.loads(json.dumps(doc, allow_nan=True)), **{"budget": 0.1, **overrides})
    with pytest.raises(NDSError, match=match):
        selections.run_selection(ws, request)
    assert not (tmp_path / "manifests").exists() or not any((tmp_path / "manifests").iterdir())
    after = sorted(p.name for p in selections.selections_dir(ws).glob("*")) if selections.selections_dir(ws).exists() else []
    assert after == before


@pytest.mark.parametrize("fields", [{"budget": 0}, {"budget": -3}, {"temperature": 0}, {"temperature": -1},
                                    {"temperature": math.inf}, {"budget": math.nan},
                                    {"budget": 12.5}])  # a fractional count: refused by the form now, not the run
def test_request_model_rejects_bad_numbers(client_scores, fields):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        selections.SelectRequest(scores_path=str(client_scores), **{"budget": 0.1, **fields})


def test_request_needs_exactly_one_scores_source(client_scores):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly one"):
        selections.SelectRequest(budget=10)


def test_cli_select_and_download(tiny_index, client_scores, tmp_path, capsys):
    ws, _ = tiny_index
    out = tmp_path / "sel"
    assert nds_main(["--root", str(ws.root), "-q", "select", "--scores", str(client_scores), "--budget", "50",
                     "--seed", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 50 and summary["parameters"]["seed"] == 3
    assert nds_main(["--root", str(ws.root), "-q", "client", "download", "--manifest", str(out),
                     "--out", str(tmp_path / "images")]) == 0
    pngs = list((tmp_path / "images").rglob("*.png"))
    assert len(pngs) == 50
    assert load_client_images(tmp_path / "images" / DOMAIN, progress=False).images.shape[1:] == (32, 32, 3)
    # A bad request through the CLI is one line on stderr and exit code 2.
    capsys.readouterr()
    assert nds_main(["--root", str(ws.root), "select", "--scores", str(client_scores), "--budget", "0",
                     "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_cli_client_walkthrough(tiny_index, tmp_path, capsys):
    """The README's client commands, in order: holdout task -> fetch -> score -> select -> status."""
    ws, _ = tiny_index
    root = ["--root", str(ws.root), "-q"]
    assert nds_main(root + ["corpus", "holdout", "--dataset", "fashion", "--per-class", "4", "--out",
                            str(tmp_path / "task")]) == 0
    assert nds_main(root + ["client", "fetch-experts", str(ws.stage_dir("experts")), "--out",
                            str(tmp_path / "experts")]) == 0
    assert nds_main(root + ["client", "score", "--experts", str(tmp_path / "experts"), "--data",
                            str(tmp_path / "task"), "--out", str(tmp_path / "scores.json"), "--emit-hashes"]) == 0
    doc = json.loads((tmp_path / "scores.json").read_text())
    n_task = len(list((tmp_path / "task").rglob("*.png")))
    # no --mode: the default, combined, since the bundle ships cluster statistics
    assert doc["mode"] == "combined" and len(doc["scores"]) == 7 and len(doc["exclude_sha256"]) == n_task
    assert "task" not in json.dumps(doc)  # nothing about the client's files leaves the client
    assert nds_main(root + ["select", "--scores", str(tmp_path / "scores.json"), "--budget", "0.05",
                            "--out", str(tmp_path / "sel")]) == 0
    capsys.readouterr()
    assert nds_main(root + ["status"]) == 0
    assert "clusters of the current version" in capsys.readouterr().out


def test_clustered_sampler_through_the_flow_respects_exclusions(tiny_index, client_scores, tmp_path):
    """The O(K + B) path the scale benchmark measures is the one the selection flow runs."""
    ws, _ = tiny_index
    cat = load_catalog(ws.data_dir)
    excluded = cat.column("sample_id").to_pylist()[:100]
    request = _request(client_scores, method="clustered", exclude=excluded, budget=300)
    summary = selections.run_selection(ws, request, out_dir=tmp_path / "sel")
    picked = pq.read_table(tmp_path / "sel" / "manifest.parquet").column("sample_id").to_pylist()
    assert summary["rows"] == 300 and len(set(picked)) == 300
    assert not set(picked) & set(excluded)
    again = selections.run_selection(ws, request, out_dir=tmp_path / "again")
    assert again["manifest_sha256"] == summary["manifest_sha256"]


def test_default_sampler_is_the_clustered_fast_path_and_es_keys_without_a_layout(tiny_index, client_scores, tmp_path,
                                                                                monkeypatch):
    ws, _ = tiny_index
    summary = selections.run_selection(ws, _request(client_scores, budget=200), out_dir=tmp_path / "auto")
    assert summary["sampler"] == "clustered" and summary["parameters"]["method"] == "auto"
    explicit = selections.run_selection(ws, _request(client_scores, budget=200, method="clustered"),
                                        out_dir=tmp_path / "explicit")
    assert explicit["manifest_sha256"] == summary["manifest_sha256"]
    # An index built before layouts existed: auto falls back to es-keys (same law, O(N)).
    real = selections.load_current_index
    monkeypatch.setattr(selections, "load_current_index", lambda w: dataclasses.replace(real(w), layout=None))
    old = selections.run_selection(ws, _request(client_scores, budget=200), out_dir=tmp_path / "old")
    assert old["sampler"] == "es-keys" and old["rows"] == 200
