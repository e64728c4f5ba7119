"""A real Prefect server on loopback: `nds server up` deploys every prefect.yaml deployment (the
`index` schedule from params.yaml), `select` is triggered through the API, a worker runs it."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from flows.cli import main as nds_main
from nds.formats.bundle import load_bundle
from nds.formats.scores import write_scores
from nds.params import load_params
from nds.platform import prefect_server
from nds.platform import warehouse

from conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_up_deploy_run_select_down(tiny_index, tmp_path):
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ws, _ = tiny_index
    bundle = load_bundle(ws.stage_dir("experts"), verify=False)
    k = int(bundle["k"])
    scores = tmp_path / "scores.json"
    write_scores(scores, bundle=bundle, mode="rotation", scores=[0.9] + [0.5] * (k - 1), seconds_per_expert=[0.0] * k)
    home = tmp_path / "prefect-home"
    port = _free_port()
    t0 = time.monotonic()
    assert nds_main(["server", "up", "--repo", str(REPO), "--home", str(home), "--port", str(port),
                     "--no-worker"]) == 0
    state = prefect_server.read_state(home)
    try:
        assert state["api_url"] == f"http://127.0.0.1:{port}/api"
        with temporary_settings({PREFECT_API_URL: state["api_url"]}):
            from prefect.client.orchestration import get_client

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
            run = run_deployment(
                "select/select",
                parameters={"request": {"scores_path": str(scores), "budget": 25, "seed": 2},
                            "root": str(ws.root), "out_dir": str(tmp_path / "manifest")},
                timeout=0,  # just schedule it; the worker below picks it up
            )
            env = prefect_server.server_env(home, state["api_url"], REPO)
            worker = prefect_server.start_worker(env=env, cwd=REPO, log_path=home / "worker.log", run_once=True)
            try:
                worker.wait(timeout=240)
            except subprocess.TimeoutExpired:
                worker.kill()
                pytest.fail(f"worker did not finish: {(home / 'worker.log').read_text()[-2000:]}")
            with get_client(sync_client=True) as client:
                final = client.read_flow_run(run.id)
        assert final.state.type == StateType.COMPLETED, (home / "worker.log").read_text()[-3000:]
    finally:
        assert nds_main(["server", "down", "--home", str(home)]) == 0
    assert not (home / prefect_server.STATE_NAME).exists()
    assert not prefect_server._alive(state["pids"]["server"])
    print(f"server up + deploy + run + down: {time.monotonic() - t0:.1f}s")

    summary = json.loads((tmp_path / "manifest" / "summary.json").read_text())
    assert summary["rows"] == 25
    with warehouse.connect(ws.warehouse_path) as con:
        rows = con.execute("SELECT n_selected, manifest_sha256 FROM selections WHERE selection_id = ?",
                           [summary["selection_id"]]).fetchall()
    assert rows == [(25, summary["manifest_sha256"])]
