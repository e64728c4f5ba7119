"""A real Prefect server on loopback: `nds server up` deploys every prefect.yaml deployment (the
`index` schedule from params.yaml), points the UI at its own API, sets the select form from the
workspace's index and publishes that index's summary; `select` runs are triggered through the
API and a worker runs them: one completes with its artifact, one NDS refuses fails cleanly."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.cli import main as nds_main
from nds.errors import NDSError
from nds.formats.bundle import load_bundle
from nds.formats.scores import write_scores
from nds.params import load_params
from nds.platform import prefect_server, prefect_ui
from nds.platform import warehouse

from conftest import REPO
from s3fixtures import BUCKET, s3_env, s3_server  # noqa: F401  (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
from linkserver import link_server  # noqa: E402,F401  (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scores(ws, path, *, index_version=None):
    bundle = load_bundle(ws.stage_dir("experts"), verify=False)
    k = int(bundle["k"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_scores(path, bundle=bundle, mode="rotation", scores=[0.9] + [0.5] * (k - 1), seconds_per_expert=[0.0] * k)
    if index_version:
        doc = json.loads(path.read_text())
        doc["index_version"] = index_version
        path.write_text(json.dumps(doc))
    return path


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


def test_api_call_retries_what_prefect_marks_retryable(link_server, monkeypatch):
    """A busy Prefect server (SQLite locked) answers 503: the call waits and retries; other errors fail at once."""
    monkeypatch.setattr(prefect_ui, "RETRY_BASE_S", 0.01)
    api = link_server.url("/api")
    link_server.add("/api/deployments/d1", (503, b'{"exception_message":"Service Unavailable"}'),
                    (502, b""), (200, b'{"id": "d1"}'))
    assert prefect_ui.api_call(api, "PATCH", "deployments/d1", {"parameter_openapi_schema": {}}) == {"id": "d1"}
    assert link_server.hits["/api/deployments/d1"] == 3
    link_server.add("/api/artifacts/", (503, b'{"exception_message":"Service Unavailable"}'))
    with pytest.raises(NDSError, match=r"POST artifacts/ answered 503: .*Service Unavailable"):
        prefect_ui.api_call(api, "POST", "artifacts/", {"key": "k"})
    assert link_server.hits["/api/artifacts/"] == prefect_ui.RETRIES + 1
    link_server.add("/api/deployments/d2", (500, b'{"exception_message":"Internal Server Error"}'), (200, b"{}"))
    with pytest.raises(NDSError, match="answered 500"):
        prefect_ui.api_call(api, "GET", "deployments/d2")
    assert link_server.hits["/api/deployments/d2"] == 1
    assert prefect_ui.api_call(api, "GET", "deployments/missing") is None


def test_server_up_deploy_run_select_down(tiny_index, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ws, index_summary = tiny_index
    scores = _scores(ws, tmp_path / "acme" / "scores.json")
    stale = _scores(ws, tmp_path / "old" / "scores.json", index_version="0123456789abcdef")
    home = tmp_path / "prefect-home"
    port = _free_port()
    t0 = time.monotonic()
    assert nds_main(["--root", str(ws.root), "server", "up", "--repo", str(REPO), "--home", str(home),
                     "--port", str(port), "--no-worker"]) == 0
    state = prefect_server.read_state(home)
    try:
        assert state["api_url"] == f"http://127.0.0.1:{port}/api" and state["workspace"] == str(ws.root)
        # The UI's pages call this server's API, not Prefect's default port 4200.
        assert _get_json(f"{state['ui_url']}/ui-settings")["api_url"] == state["api_url"]
        with urllib.request.urlopen(state["ui_url"] + "/", timeout=30) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        with temporary_settings({PREFECT_API_URL: state["api_url"]}):
            with get_client(sync_client=True) as client:
                deployments = {d.name: d for d in client.read_deployments()}
                assert sorted(deployments) == ["evaluate", "index", "select"]
                assert {deployments[n].work_pool_name for n in deployments} == {prefect_server.WORK_POOL}
                sched = load_params(REPO / "params.yaml").schedule
                (index_schedule,) = deployments["index"].schedules
                assert index_schedule.schedule.cron == sched.index_cron
                assert index_schedule.schedule.timezone == sched.timezone
                assert index_schedule.active is sched.active is False, "the demo's index schedule ships inactive"
                assert not deployments["select"].schedules and not deployments["evaluate"].schedules
                # The select form offers the workspace index's datasets and only the request.
                form = deployments["select"].parameter_openapi_schema
                assert set(form["properties"]) == {"request"}
                datasets = form["definitions"]["SelectRequest"]["properties"]["datasets"]["anyOf"][0]
                assert datasets["items"]["enum"] == prefect_ui.index_datasets(ws)
                # A bad form is refused before a run exists.
                with pytest.raises(PrefectHTTPStatusError) as info:
                    client.create_flow_run_from_deployment(deployments["select"].id, parameters={
                        "request": {"scores_path": str(scores), "budget": 25, "datasets": ["Fashion"]}})
                assert info.value.response.status_code == 409 and "'Fashion' is not one of" in info.value.response.text
                assert client.read_flow_runs() == []
                # The current index's summary and montage are there before any index run.
                published = client.read_artifacts(artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["index-summary", "cluster-montage"])))
                assert {a.key for a in published} == {"index-summary", "cluster-montage"}
                assert all(index_summary["index_version"] in a.data for a in published)
                assert "data:image/png;base64," in next(a for a in published if a.key == "cluster-montage").data

            good = run_deployment("select/select", timeout=0, parameters={  # just schedule; the worker runs it
                "request": {"scores_path": str(scores), "budget": 25, "seed": 2},
                "out_dir": str(tmp_path / "manifest")})
            refused = run_deployment("select/select", timeout=0, parameters={
                "request": {"scores_path": str(stale), "budget": 25}})
            env = prefect_server.server_env(home, state["api_url"], REPO, workspace=ws.root)
            worker = prefect_server.start_worker(env=env, cwd=REPO, log_path=home / "worker.log", run_once=True)
            try:
                worker.wait(timeout=300)
            except subprocess.TimeoutExpired:
                worker.kill()
                pytest.fail(f"worker did not finish: {(home / 'worker.log').read_text()[-2000:]}")
            with get_client(sync_client=True) as client:
                good, refused = client.read_flow_run(good.id), client.read_flow_run(refused.id)
                logs = [m.message for m in client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[refused.id])))]
                (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["selection-summary"])))
        assert good.state.type == StateType.COMPLETED, (home / "worker.log").read_text()[-3000:]
        assert (good.name, refused.name) == ("select-acme-25", "select-old-25")
        assert refused.state.type == StateType.FAILED
        assert refused.state.message == (
            f"scores are for index 0123456789abcdef but the server holds {index_summary['index_version']}: "
            "fetch the current expert bundle (`nds client fetch-experts`) and score again")
        assert not any("Traceback" in m for m in logs), logs
    finally:
        assert nds_main(["server", "down", "--home", str(home)]) == 0
    assert not (home / prefect_server.STATE_NAME).exists()
    assert not prefect_server._alive(state["pids"]["server"])
    print(f"server up + deploy + 2 runs + down: {time.monotonic() - t0:.1f}s")

    summary = json.loads((tmp_path / "manifest" / "summary.json").read_text())
    assert summary["rows"] == 25
    assert artifact.flow_run_id == good.id
    assert summary["manifest_sha256"] in artifact.data and "data:image/png;base64," in artifact.data
    assert (tmp_path / "manifest" / "manifest.csv").as_uri() in artifact.data
    with warehouse.connect(ws.warehouse_path) as con:
        rows = con.execute("SELECT n_selected, manifest_sha256, origin, flow_run_id FROM selections "
                           "WHERE selection_id = ?", [summary["selection_id"]]).fetchall()
    assert rows == [(25, summary["manifest_sha256"], "deployment", str(good.id))]


def test_selection_artifact_links_an_s3_manifest_presigned(tiny_index, s3_env, tmp_path, monkeypatch):
    """With the manifests in S3 the artifact's links are presigned GET URLs that download them."""
    from nds.report import manifest_links, selection_summary_markdown
    from nds.select.request import SelectRequest
    from nds.select.service import run_selection

    ws, _ = tiny_index
    monkeypatch.setenv("NDS_STORAGE_URL", f"s3://{BUCKET}/{tmp_path.name}")
    summary = run_selection(ws, SelectRequest(scores_path=str(_scores(ws, tmp_path / "scores.json")), budget=20),
                            out_dir=tmp_path / "sel")
    assert summary["manifest_location"] == f"s3://{BUCKET}/{tmp_path.name}/manifests/{summary['selection_id']}/"
    links = manifest_links(summary, expires_s=600)
    assert all(url.startswith(s3_env) and "X-Amz-Signature=" in url for url in links.values())
    with urllib.request.urlopen(links["manifest.csv"], timeout=30) as resp:
        assert hashlib.sha256(resp.read()).hexdigest() == summary["manifest_sha256"]
    md = selection_summary_markdown(summary, links=links)
    assert f"[manifest.csv]({links['manifest.csv']})" in md and "links valid until" in md
