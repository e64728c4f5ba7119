"""The Prefect server restarts while a worker waits for work: the next run still completes.

A real server on loopback (`nds server up`: server, work pool, the `select` deployment, a
process worker). The server process is killed and started again on the same port and state;
the worker, which kept polling through the outage, then runs a selection triggered by the API.
In the default run (about 2 minutes on 2 cores: two server starts, a deploy, a flow-run subprocess).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from flows.cli import main as nds_main
from nds.platform import prefect_server

from relhelpers import TESTS, free_port, write_valid_scores

REPO = TESTS.parent


def test_worker_survives_a_server_restart(tiny_index, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ws, _ = tiny_index
    scores = write_valid_scores(ws, tmp_path / "scores.json")
    home, port = tmp_path / "prefect-home", free_port()
    assert nds_main(["server", "up", "--repo", str(REPO), "--home", str(home), "--port", str(port),
                     "--deployment", "select"]) == 0
    state = prefect_server.read_state(home)
    restarted = None
    try:
        os.killpg(state["pids"]["server"], signal.SIGKILL)  # the server dies; the worker keeps polling
        deadline = time.monotonic() + 30
        while prefect_server._alive(state["pids"]["server"]) and time.monotonic() < deadline:
            prefect_server._reap(state["pids"]["server"])
            time.sleep(0.2)
        with open(home / "server-restarted.log", "ab") as log:
            restarted = subprocess.Popen(
                prefect_server._prefect_cmd("server", "start", "--host", "127.0.0.1", "--port", str(port)),
                cwd=home, env=prefect_server.server_env(home, None, REPO), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        prefect_server.wait_healthy(state["api_url"], timeout_s=180, proc=restarted, log_path=home / "server-restarted.log")
        with temporary_settings({PREFECT_API_URL: state["api_url"]}):
            run = run_deployment("select/select", timeout=300, parameters={
                "request": {"scores_path": str(scores), "budget": 15, "seed": 5},
                "root": str(ws.root), "out_dir": str(tmp_path / "manifest")})
            with get_client(sync_client=True) as client:
                final = client.read_flow_run(run.id)
        assert final.state.type == StateType.COMPLETED, (home / "worker.log").read_text()[-3000:]
    finally:
        if restarted is not None:
            os.killpg(restarted.pid, signal.SIGTERM)
            restarted.wait(timeout=60)
        prefect_server.server_down(home)
    assert json.loads((tmp_path / "manifest" / "summary.json").read_text())["rows"] == 15
