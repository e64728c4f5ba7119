"""Faults while serving: a server killed mid-request, an index republished under load, a locked
warehouse, S3 down during the manifest publish, an unexpected error (no traceback leaves)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from servehelpers import (  # noqa: F401 - synth is a fixture
    ServeProcess, audit_rows, bearer, free_port, synth, synthetic_scores, tokens, write_synthetic_index,
)

from nds.client.request import request_selection
from nds.config import Workspace
from nds.platform import warehouse
from nds.select.service import manifests_root
from nds.serve.state import default_state_dir


def test_killed_mid_request_then_retry_gives_one_selection(tmp_path):
    ws = Workspace((tmp_path / "ws").resolve())
    info = write_synthetic_index(ws.root, n=400_000, k=16)  # a 300k-row manifest takes long enough to cut
    token = tokens(ws, "alice")["alice"]
    body = {"scores": synthetic_scores(info), "budget": 300_000, "seed": 4, "request_id": "big-1", "include_rows": False}
    port = free_port()
    server = ServeProcess(ws.root, "--rate-limit", "0", port=port).start()
    outcome = {}

    def call():
        try:
            outcome["response"] = httpx.post(f"{server.url}/v1/selections", json=body, headers=bearer(token), timeout=120)
        except httpx.TransportError as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    requests_dir = default_state_dir(ws) / "clients"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(requests_dir.glob("*/requests/*.json")):
        time.sleep(0.005)
    promised = json.loads(next(requests_dir.glob("*/requests/*.json")).read_text())["selection_id"]
    time.sleep(0.05)
    server.kill()
    caller.join(timeout=60)
    assert "error" in outcome, "the request finished before the kill; make it larger"
    rows_before = [r["selection_id"] for r in audit_rows(ws)]
    assert rows_before in ([], [promised])  # cut before or after its audit row, never a second one
    print(f"killed {'before' if not rows_before else 'after'} the audit row")
    # the client retries with the same request id against the restarted server (same port)
    server = ServeProcess(ws.root, "--rate-limit", "0", port=port, log=server.log_path).start()
    try:
        scores = tmp_path / "scores.json"
        scores.write_text(json.dumps(body["scores"]))
        summary = request_selection(server.url, token, scores, tmp_path / "out", budget=300_000, seed=4,
                                    request_id="big-1")
        assert summary["selection_id"] == promised
        again = httpx.post(f"{server.url}/v1/selections", json=body, headers=bearer(token), timeout=120)
        assert again.json()["selection_id"] == promised and again.headers["idempotent-replayed"] == "true"
    finally:
        server.stop()
    assert [r["selection_id"] for r in audit_rows(ws)] == [promised]
    assert [p.name for p in manifests_root(ws).iterdir() if not p.name.startswith(".")] == [promised]


def test_index_republished_while_requests_are_in_flight(tmp_path):
    ws = Workspace((tmp_path / "ws").resolve())
    v1 = write_synthetic_index(ws.root, n=20_000, k=6, version="v1", prefix="a")
    token = tokens(ws, "alice")["alice"]
    results: list[tuple[str, httpx.Response]] = []
    stop = threading.Event()
    versions = {"v1": v1}

    def client(i):
        with httpx.Client(base_url=server.url, timeout=120, headers=bearer(token)) as http:
            n = 0
            while not stop.is_set():
                name = "v1" if (n + i) % 2 or "v2" not in versions else "v2"
                scores = synthetic_scores(versions[name], favour=n)
                results.append((name, http.post("/v1/selections", json={"scores": scores, "budget": 200, "seed": n})))
                n += 1

    with ServeProcess(ws.root, "--rate-limit", "0", "--poll", "0.2") as server:
        workers = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        v2 = write_synthetic_index(ws.root, n=30_000, k=9, version="v2", prefix="b")  # extract, experts, weights
        versions["v2"] = v2
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and httpx.get(f"{server.url}/v1/index").json()["index_version"] != "v2":
            time.sleep(0.1)
        time.sleep(1.0)
        stop.set()
        for w in workers:
            w.join(timeout=120)
        assert httpx.get(f"{server.url}/v1/index").json()["index_version"] == "v2"
        assert "Traceback" not in server.log()
    served = {"v1": 0, "v2": 0}
    retry_later = 0
    for name, r in results:
        if r.status_code == 400:  # scores of the other version: the one-line mismatch message
            assert "scores are for index" in r.json()["detail"] and "fetch the current expert bundle" in r.json()["detail"]
            continue
        if r.status_code == 503:  # v2 scores while v2 is being loaded: retry shortly (the client does)
            assert "a new index is being loaded" in r.json()["detail"] and r.headers["retry-after"]
            retry_later += 1
            continue
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["index_version"] == name  # answered from exactly the version the scores were made for
        prefix, k = ("a", 6) if name == "v1" else ("b", 9)
        assert all(row["sample_id"].startswith(prefix) and row["expert"] < k for row in doc["manifest"])
        assert doc["summary"]["bundle_sha256"] == versions[name]["bundle_sha256"]
        served[name] += 1
    assert served["v1"] > 0 and served["v2"] > 0, served
    print(f"answered {served}, {retry_later} told to retry while v2 loaded, "
          f"{len(results) - sum(served.values()) - retry_later} refused as the other version")


def test_selections_go_on_while_a_writer_locks_the_warehouse(synth):
    ws, info = synth
    with warehouse.connect(ws.warehouse_path):
        pass  # the DDL, as an index build leaves it
    token = tokens(ws, "alice")["alice"]
    locker = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); "
                               "con.execute('BEGIN TRANSACTION'); print('locked', flush=True); time.sleep(120)",
                               str(ws.warehouse_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match="locked"):
            warehouse.query(ws.warehouse_path, "SELECT 1")
        with ServeProcess(ws.root, "--rate-limit", "0") as server:
            answers = [httpx.post(f"{server.url}/v1/selections", headers=bearer(token), timeout=60,
                                  json={"scores": synthetic_scores(info, favour=i), "budget": 25}) for i in range(3)]
    finally:
        locker.kill()
        locker.wait(timeout=10)
    assert [a.status_code for a in answers] == [200, 200, 200]
    rows = warehouse.query(ws.warehouse_path, "SELECT selection_id, origin, requester FROM selections")
    assert sorted((r["selection_id"], r["origin"], r["requester"]) for r in rows) == \
        sorted((a.json()["selection_id"], "service", "alice") for a in answers)


def test_s3_down_during_manifest_publish(synth, tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    ws, info = synth
    token = tokens(ws, "alice")["alice"]
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def start_s3():
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        s3.start()
        boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in creds.items()
                                                     if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1") \
            .create_bucket(Bucket="nds")
        return s3

    s3 = start_s3()
    env = {**creds, "NDS_STORAGE_URL": "s3://nds/store", "NDS_S3_ENDPOINT_URL": endpoint}
    body = {"scores": synthetic_scores(info), "budget": 50, "request_id": "pub-1", "include_rows": False}
    try:
        with ServeProcess(ws.root, "--rate-limit", "0", env=env) as server:
            ok = httpx.post(f"{server.url}/v1/selections", json={**body, "request_id": "pub-0"}, headers=bearer(token),
                            timeout=120)
            assert ok.status_code == 200 and ok.json()["summary"]["selection_id"]
            s3.stop()
            t0 = time.monotonic()
            down = httpx.post(f"{server.url}/v1/selections", json=body, headers=bearer(token), timeout=180)
            took = time.monotonic() - t0
            assert down.status_code == 503 and down.headers["retry-after"], down.text
            assert "\n" not in down.json()["detail"] and "Traceback" not in down.text and took < 120
            print(f"S3 down: 503 after {took:.1f}s: {down.json()['detail']}")
            promised = json.loads(_promise_file(ws, "pub-1").read_text())["selection_id"]
            assert promised not in {r["selection_id"] for r in audit_rows(ws)}
            assert not (manifests_root(ws) / promised).exists()  # no unrecorded manifest left behind
            s3 = start_s3()  # back (empty: moto keeps nothing)
            again = httpx.post(f"{server.url}/v1/selections", json=body, headers=bearer(token), timeout=120)
            assert again.status_code == 200 and again.json()["selection_id"] == promised
            listed = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                                  aws_secret_access_key="testing").list_objects_v2(Bucket="nds")
            keys = {o["Key"] for o in listed.get("Contents", [])}
            assert f"store/manifests/{promised}/summary.json" in keys  # published on the retry
            assert httpx.get(f"{server.url}/v1/health").status_code == 200
    finally:
        s3.stop()
    assert [r["selection_id"] for r in audit_rows(ws)].count(promised) == 1
    row = next(r for r in audit_rows(ws) if r["selection_id"] == promised)
    assert row["manifest_location"] == f"s3://nds/store/manifests/{promised}/"


def _promise_file(ws, request_id):
    import hashlib

    key = hashlib.sha256(request_id.encode()).hexdigest()
    found = list((default_state_dir(ws) / "clients").glob(f"*/requests/{key}.json"))
    assert len(found) == 1
    return found[0]


def test_an_unexpected_error_is_a_500_without_traceback(synth, tmp_path):
    ws, info = synth
    token = tokens(ws, "alice")["alice"]
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # the manifests root is a file: writing a manifest fails with an OSError
    with ServeProcess(ws.root, "--rate-limit", "0", env={"NDS_MANIFESTS": str(blocker / "manifests")}) as server:
        r = httpx.post(f"{server.url}/v1/selections", json={"scores": synthetic_scores(info), "budget": 5},
                       headers=bearer(token), timeout=60)
        assert r.status_code == 500, r.text
        detail = r.json()["detail"]
        assert detail.startswith("internal server error (reference ") and "Traceback" not in r.text
        assert "not-a-folder" not in r.text and 'File "' not in r.text
        ref = detail.split("reference ")[1].split(")")[0]
        assert httpx.get(f"{server.url}/v1/health").status_code == 200  # still serving
        time.sleep(0.5)
        log = server.log()
    assert f"internal error {ref}" in log and "Traceback" in log  # the operator has the details
    assert token not in log
