"""The HTTP API against a real `nds serve` on 127.0.0.1: index, bundle, selections, errors, auth, limits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import httpx
import pyarrow.parquet as pq
import pytest
from servehelpers import (  # noqa: F401 - synth is a fixture
    REPO, ServeProcess, audit_rows, bearer, synth, synthetic_scores, tokens, write_synthetic_index,
)

from nds.client.fetch import fetch_experts
from nds.config import Workspace
from nds.formats.bundle import load_bundle
from nds.formats.manifest import load_manifest
from nds.select.service import SelectRequest, manifests_root, run_selection, selections_dir
from nds.serve.state import default_state_dir
from nds.serve.tokens import TokenStore


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server for the module (rate limit off): (ws, info, server, {name: token})."""
    ws = Workspace((tmp_path_factory.mktemp("serve-api") / "ws").resolve())
    info = write_synthetic_index(ws.root, n=3000, k=8)
    toks = tokens(ws, "alice", "bob")
    with ServeProcess(ws.root, "--rate-limit", "0", "--max-request-kb", "64", "--max-inline-rows", "100") as server:
        yield ws, info, server, toks


def post(server, token, body, **kw):
    return httpx.post(f"{server.url}/v1/selections", json=body, headers=bearer(token), timeout=60, **kw)


def test_index_and_bundle_over_http(served, tmp_path):
    ws, info, server, _ = served
    doc = httpx.get(f"{server.url}/v1/index").json()
    assert doc["index_version"] == info["index_version"] and doc["k"] == 8 and doc["n_samples"] == 3000
    assert doc["bundle_sha256"] == info["bundle_sha256"] and "rotation" in doc["scorer_modes"]
    assert doc["datasets"] == info["datasets"] and doc["bundle_url"] == "/v1/bundle"
    assert httpx.get(f"{server.url}/v1/bundle").json() == load_bundle(ws.stage_dir("experts"), verify=False)
    # the client's fetch-experts against the service: every checksum verified
    bundle = fetch_experts(f"{server.url}/v1/bundle", tmp_path / "experts")
    assert bundle["bundle_sha256"] == info["bundle_sha256"] and len(list((tmp_path / "experts").iterdir())) == 9
    missing = httpx.get(f"{server.url}/v1/bundle/../tokens.json")
    assert missing.status_code == 404
    r = httpx.get(f"{server.url}/v1/bundle/expert_999.pt")
    assert r.status_code == 404 and "not a file of bundle" in r.json()["detail"]


def test_selection_round_trip_matches_nds_select(served, tmp_path):
    ws, info, server, toks = served
    scores = synthetic_scores(info, favour=3)
    r = post(server, toks["alice"], {"scores": scores, "budget": 40, "seed": 7, "temperature": 0.05})
    assert r.status_code == 200, r.text
    doc = r.json()
    sid = doc["selection_id"]
    assert doc["rows"] == 40 == len(doc["manifest"]) and sum(doc["counts_per_dataset"].values()) == 40
    assert [row["rank"] for row in doc["manifest"]] == list(range(40))
    # each row carries the catalog's content hash of its image, for the client to verify the download
    catalog = pq.read_table(ws.stage_dir("extract") / "index.parquet", columns=["sample_id", "sha256"]).to_pydict()
    hashes = dict(zip(catalog["sample_id"], catalog["sha256"]))
    assert [row["sha256"] for row in doc["manifest"]] == [hashes[row["sample_id"]] for row in doc["manifest"]]
    # manifest.parquet is made when first asked for, and summary.json then records its checksum
    assert not (manifests_root(ws) / sid / "manifest.parquet").exists()
    files = {}
    for key in ("parquet", "csv", "summary", "json"):
        got = httpx.get(f"{server.url}{doc['links'][key]}", headers=bearer(toks["alice"]))
        assert got.status_code == 200, (key, got.text)
        files[key] = got.content
    assert hashlib.sha256(files["csv"]).hexdigest() == doc["manifest_sha256"]
    assert json.loads(files["json"]) == doc["manifest"]
    (tmp_path / "m").mkdir()
    for key, name in (("parquet", "manifest.parquet"), ("csv", "manifest.csv"), ("summary", "summary.json")):
        (tmp_path / "m" / name).write_bytes(files[key])
    assert load_manifest(tmp_path / "m").to_pylist() == doc["manifest"]
    # the same request through the one selection path, as `nds select` runs it: the same manifest
    local = run_selection(ws, SelectRequest(scores=scores, budget=40, seed=7, temperature=0.05), out_dir=tmp_path / "cli")
    assert local["manifest_sha256"] == doc["manifest_sha256"]
    assert (tmp_path / "cli" / "manifest.parquet").read_bytes() == files["parquet"]
    assert json.loads(files["summary"])["parquet_sha256"] == hashlib.sha256(files["parquet"]).hexdigest()
    # one audit row from the service, naming the requester
    row = next(r for r in audit_rows(ws) if r["selection_id"] == sid)
    assert (row["origin"], row["requester"], row["n_selected"]) == ("service", "alice", 40)
    got = httpx.get(f"{server.url}/v1/selections/{sid}", headers=bearer(toks["alice"])).json()
    assert got["summary"]["manifest_sha256"] == doc["manifest_sha256"] and "manifest" not in got


def test_fill_adds_reserve_rows_after_the_budget(served):
    _, info, server, toks = served
    body = {"scores": synthetic_scores(info, favour=2), "budget": 30, "seed": 4}
    plain = post(server, toks["alice"], body).json()
    filled = post(server, toks["alice"], {**body, "fill": 0.25}).json()
    assert (filled["budget"], filled["reserve"], filled["rows"]) == (30, 8, 38)
    assert filled["manifest"][:30] == plain["manifest"] and plain["reserve"] == 0
    r = post(server, toks["alice"], {**body, "fill": 1.5})
    assert r.status_code == 422 and "fill: Input should be less than or equal to 1" in r.json()["detail"]


def test_filters_and_the_fast_path_agree(served):
    """A dataset filter naming every dataset takes the O(N) path; no filter the O(K + B) one: same manifest."""
    _, info, server, toks = served
    scores = synthetic_scores(info, favour=1)
    plain = post(server, toks["alice"], {"scores": scores, "budget": 0.05, "seed": 2, "include_rows": False}).json()
    every = post(server, toks["alice"], {"scores": scores, "budget": 0.05, "seed": 2, "include_rows": False,
                                         "datasets": info["datasets"]}).json()
    assert plain["manifest_sha256"] == every["manifest_sha256"] and plain["selection_id"] != every["selection_id"]
    assert "manifest" not in plain
    one = post(server, toks["alice"], {"scores": scores, "budget": 30, "datasets": ["emoji"]}).json()
    assert set(one["counts_per_dataset"]) == {"emoji"} and one["rows"] == 30


@pytest.mark.parametrize("change, status, words", [
    ({"budget": -1}, 422, "budget: Input should be greater than 0"),
    ({"budget": 1.5}, 400, "neither a whole count nor a fraction"),
    ({"budget": 10**9}, 400, "exceeds the 3000 eligible samples"),
    ({"scores": "index_version"}, 422, "scores: Input should be a valid dictionary"),
    ({"datasets": ["Fashion"]}, 400, "unknown dataset filter ['Fashion']: choose from"),
    ({"surprise": 1}, 422, "surprise: Extra inputs are not permitted"),
    ({"temperature": 0}, 422, "temperature: Input should be greater than 0"),
    ({"request_id": "has space"}, 422, "request_id: String should match pattern"),
    ({"scores.index_version": "old"}, 400, "scores are for index old but the server holds"),
    ({"scores.k": 7}, 400, "has 8 values but k = 7"),
    ({"scores.scores": [0.1] * 9}, 400, "has 9 values but k = 8"),
])
def test_bad_input_is_one_json_line_and_stores_nothing(served, change, status, words):
    ws, info, server, toks = served
    body = {"scores": synthetic_scores(info), "budget": 10}
    for key, value in change.items():
        if key.startswith("scores."):
            body["scores"][key.split(".", 1)[1]] = value
        else:
            body[key] = value
    before = (sorted(p.name for p in manifests_root(ws).glob("*")), len(audit_rows(ws)))
    r = post(server, toks["bob"], body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail and "\n" not in detail and "Traceback" not in r.text
    assert (sorted(p.name for p in manifests_root(ws).glob("*")), len(audit_rows(ws))) == before


def test_malformed_and_oversized_bodies(served):
    _, info, server, toks = served
    r = httpx.post(f"{server.url}/v1/selections", content=b"{not json", headers={**bearer(toks["bob"]),
                   "content-type": "application/json"})
    assert r.status_code == 422 and "JSON decode error" in r.json()["detail"]
    big = {"scores": synthetic_scores(info), "budget": 10, "exclude": ["x" * 64] * 2000}  # ~140 KB > 64 KiB
    r = post(server, toks["bob"], big)
    assert r.status_code == 413 and "64" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while streaming
        yield json.dumps(big).encode()

    r = httpx.post(f"{server.url}/v1/selections", content=chunks(), headers={**bearer(toks["bob"]),
                   "content-type": "application/json"}, timeout=30)
    assert r.status_code == 413


def test_tokens_are_checked_and_revocation_is_immediate(served):
    ws, info, server, toks = served
    body = {"scores": synthetic_scores(info), "budget": 5}
    for headers in ({}, {"Authorization": "Bearer nds_wrong"}, {"Authorization": f"Basic {toks['bob']}"}):
        r = httpx.post(f"{server.url}/v1/selections", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert "nds tokens create" in r.json()["detail"]
    carol = tokens(ws, "carol")["carol"]
    assert post(server, carol, body).status_code == 200
    TokenStore(default_state_dir(ws)).revoke("carol")
    assert post(server, carol, body).status_code == 401
    assert httpx.get(f"{server.url}/v1/selections", headers=bearer(carol)).status_code == 401


def test_selections_are_private_to_their_token(served):
    _, info, server, toks = served
    mine = post(server, toks["alice"], {"scores": synthetic_scores(info), "budget": 5}).json()["selection_id"]
    for path in (f"/v1/selections/{mine}", f"/v1/selections/{mine}/manifest.parquet", f"/v1/selections/{mine}/summary.json"):
        r = httpx.get(f"{server.url}{path}", headers=bearer(toks["bob"]))
        assert r.status_code == 404 and "no selection" in r.json()["detail"]
        assert httpx.get(f"{server.url}{path}", headers=bearer(toks["alice"])).status_code == 200
    assert mine not in {s["selection_id"] for s in httpx.get(f"{server.url}/v1/selections",
                                                              headers=bearer(toks["bob"])).json()["selections"]}
    for bad in ("../../tokens", "sel-x", "%2e%2e"):
        assert httpx.get(f"{server.url}/v1/selections/{bad}", headers=bearer(toks["alice"])).status_code == 404
    r = httpx.get(f"{server.url}/v1/selections/{mine}/tokens.json", headers=bearer(toks["alice"]))
    assert r.status_code == 404


def test_request_id_makes_retries_idempotent(served):
    ws, info, server, toks = served
    body = {"scores": synthetic_scores(info, favour=5), "budget": 12, "seed": 1, "request_id": "job-17"}
    first = post(server, toks["alice"], body)
    again = post(server, toks["alice"], {**body, "include_rows": False})
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    sid = first.json()["selection_id"]
    assert again.json()["selection_id"] == sid
    assert [r["selection_id"] for r in audit_rows(ws)].count(sid) == 1
    # the same id with other parameters is refused; another token's same id is its own request
    r = post(server, toks["alice"], {**body, "budget": 13})
    assert r.status_code == 409 and "different request" in r.json()["detail"]
    other = post(server, toks["bob"], body).json()["selection_id"]
    assert other != sid


def test_openapi_docs(served):
    _, _, server, _ = served
    assert httpx.get(f"{server.url}/docs").status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/index", "/v1/bundle", "/v1/selections", "/v1/selections/{selection_id}"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "request_id" in spec["components"]["schemas"]["SelectionBody"]["properties"]


def test_no_token_reaches_a_log_or_a_file(served):
    ws, _, server, toks = served
    text = server.log()
    assert "POST /v1/selections" in text
    state = default_state_dir(ws)
    blobs = [p.read_bytes() for p in list(state.rglob("*")) + list(manifests_root(ws).rglob("*")) +
             list(selections_dir(ws).rglob("*")) if p.is_file() and "index-cache" not in p.parts]
    for token in toks.values():
        assert token not in text and not any(token.encode() in b for b in blobs)
        assert hashlib.sha256(token.encode()).hexdigest() in (state / "tokens.json").read_text()


def test_rate_limit_per_token(synth):
    ws, info = synth
    toks = tokens(ws, "fast", "other")
    body = {"scores": synthetic_scores(info), "budget": 3, "include_rows": False}
    with ServeProcess(ws.root, "--rate-limit", "0.2", "--burst", "2") as server:
        codes = [post(server, toks["fast"], body) for _ in range(5)]
        assert [r.status_code for r in codes] == [200, 200, 429, 429, 429]
        assert int(codes[-1].headers["retry-after"]) >= 1 and "rate limit" in codes[-1].json()["detail"]
        assert post(server, toks["other"], body).status_code == 200  # another token has its own bucket
    assert len(audit_rows(ws)) == 3


def test_cli_request_writes_a_manifest_folder(served, tmp_path):
    ws, info, server, toks = served
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(synthetic_scores(info, favour=4)))
    cmd = [sys.executable, "-m", "flows.cli", "client", "request", "--server", server.url, "--scores", str(scores),
           "--budget", "0.01", "--request-id", "cli-1", "--out"]
    env = {**os.environ, "NDS_TOKEN": toks["bob"]}
    r = subprocess.run([*cmd, str(tmp_path / "sel")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "selection sel-" in r.stdout and "nds client download --manifest" in r.stdout
    table = load_manifest(tmp_path / "sel")
    summary = json.loads((tmp_path / "sel" / "summary.json").read_text())
    assert table.num_rows == summary["rows"] == 30
    assert pq.read_table(tmp_path / "sel" / "manifest.parquet").equals(table)
    again = subprocess.run([*cmd, str(tmp_path / "sel2")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "answered again" in again.stdout
    assert (tmp_path / "sel2" / "manifest.csv").read_bytes() == (tmp_path / "sel" / "manifest.csv").read_bytes()
    bad = subprocess.run([*cmd, str(tmp_path / "sel3")], cwd=REPO, env={**env, "NDS_TOKEN": "nds_nope"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "refused the token" in bad.stderr
    assert not (tmp_path / "sel3").exists()


def test_large_selections_point_to_their_files(served):
    ws, info, server, toks = served
    doc = post(server, toks["alice"], {"scores": synthetic_scores(info), "budget": 101}).json()
    assert doc["manifest"] is None and doc["links"]["parquet"] in doc["manifest_note"]
    rows = httpx.get(f"{server.url}{doc['links']['json']}", headers=bearer(toks["alice"])).json()
    assert len(rows) == 101
    # a manifest deleted on the server: 404, not an error
    import shutil

    shutil.rmtree(manifests_root(ws) / doc["selection_id"])
    for suffix in ("", "/manifest.json", "/manifest.parquet"):
        r = httpx.get(f"{server.url}/v1/selections/{doc['selection_id']}{suffix}", headers=bearer(toks["alice"]))
        assert r.status_code == 404 and "no manifest on this server" in r.json()["detail"]
