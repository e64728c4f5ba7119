"""A team Prefect set-up on one machine: API server, `process` work pool, deployments, a worker.

`nds server up` starts `prefect server start` (analytics and promotional content off, the
UI pointed at this server's own API), waits for /api/health, creates the `nds-process` work
pool, runs `prefect deploy` from the repository root (prefect.yaml), sets up what operators
see (prefect_ui: the select form's dataset choices, the current index's summary) and starts
a worker; the process ids go into a state file so that `nds server down` stops exactly those
processes and nothing else. Flows run from the repository checkout on a workspace (the
repository itself unless another is given), the one whose index the form offers.

Everything goes through the `prefect` command line (the stable interface); this module
does not import Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from nds._io import write_text
from nds.errors import NDSError

log = logging.getLogger(__name__)

WORK_POOL = "nds-process"
WORK_POOL_TYPE = "process"
STATE_NAME = "nds-server.json"
#: A cold first start (database migrations) took ~16 s here; leave room on a busy machine.
STARTUP_TIMEOUT_S = 120
#: `prefect deploy` / `work-pool create` talk to the local API only.
COMMAND_TIMEOUT_S = 180
#: How long each stop signal gets before the next, stronger one.
STOP_GRACE_S = 10


def default_home() -> Path:
    return Path(os.environ.get("NDS_PREFECT_HOME") or Path.home() / ".nds" / "prefect")


def api_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


#: Hosts that mean "every interface": not an address a browser can use.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def ui_api_url(host: str, port: int) -> str:
    """The API URL the UI's pages call from the browser: this server's own (Prefect's default is port 4200)."""
    return api_url(socket.gethostname() if host in WILDCARD_HOSTS else host, port)


def _prefect_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def server_env(home: Path, api: str | None, nds_root: Path, *, workspace: Path | None = None,
               ui_api: str | None = None) -> dict:
    """The environment of the server (`ui_api`: what its UI calls), `prefect deploy` and the worker.

    NDS_ROOT is the checkout for `prefect deploy` (prefect.yaml's pull step runs flows from it)
    and `workspace` (default: the checkout) for the worker, whose flow runs read it.
    """
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        DVC_NO_ANALYTICS="1",
        NDS_ROOT=str(workspace or nds_root),
    )
    env.update(schedule_env(nds_root))
    for name in ("PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL"):
        env.pop(name, None)
    if api:
        env["PREFECT_API_URL"] = api
    if ui_api:
        env["PREFECT_UI_API_URL"] = ui_api
    # Scripts of this interpreter (prefect, dvc, nds) win on PATH for the flow-run processes.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def schedule_env(root: Path) -> dict[str, str]:
    """The `index` deployment's schedule (prefect.yaml templates it) from `<root>/params.yaml`."""
    from nds.params import load_params

    sched = load_params(Path(root) / "params.yaml").schedule
    return {"NDS_INDEX_CRON": sched.index_cron, "NDS_INDEX_TIMEZONE": sched.timezone,
            "NDS_INDEX_SCHEDULE_ACTIVE": "true" if sched.active else "false"}


def wait_healthy(api: str, *, timeout_s: float, proc: subprocess.Popen | None = None, log_path: Path | None = None) -> float:
    """Poll `<api>/health` until it answers 200; fails if `proc` exits first or time runs out."""
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        if proc is not None and proc.poll() is not None:
            raise NDSError(f"prefect server exited with code {proc.returncode}: {_tail(log_path)}")
        if time.monotonic() - t0 > timeout_s:
            raise NDSError(f"prefect server at {api} not healthy after {timeout_s:.0f}s: {_tail(log_path)}")
        time.sleep(0.5)


def _tail(path: Path | None, lines: int = 5) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def run_prefect(args: list[str], *, env: dict, cwd: Path, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    try:
        r = subprocess.run(_prefect_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise NDSError(f"`prefect {' '.join(args)}` took longer than {timeout_s:.0f}s") from exc
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-3:]
        raise NDSError(f"`prefect {' '.join(args)}` failed: {' | '.join(tail)}")
    return r.stdout


def start_worker(*, env: dict, cwd: Path, log_path: Path, run_once: bool = False) -> subprocess.Popen:
    # The type is given, not looked up: a worker that starts while the API is briefly unreachable
    # (a server restart) would otherwise exit instead of polling until it is back.
    args = ["worker", "start", "--pool", WORK_POOL, "--type", WORK_POOL_TYPE] + (["--run-once"] if run_once else [])
    with open(log_path, "ab") as out:
        return subprocess.Popen(_prefect_cmd(*args), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def server_up(
    *,
    repo_root: Path,
    home: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 4200,
    deployments: list[str] | None = None,
    worker: bool = True,
    workspace: Path | None = None,
    ui_api: str | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> dict:
    """Start server, work pool, deployments (all, or the named ones) and a worker; returns the state.

    workspace: where flow runs find the corpus, the index and the warehouse (default: the
    checkout). ui_api: the API URL the UI's pages call (default: this server's, see ui_api_url).
    The state (pids, API URL, log files) is written to `<home>/nds-server.json`. On any
    failure the processes started so far are stopped again.
    """
    from nds.config import Workspace
    from nds.platform import prefect_ui

    home = Path(home or default_home()).resolve()
    repo_root = Path(repo_root).resolve()
    ws = Workspace(Path(workspace or repo_root).resolve())
    if not (repo_root / "prefect.yaml").exists():
        raise NDSError(f"{repo_root} has no prefect.yaml: run from the repository root or pass --repo")
    if not ws.root.is_dir():
        raise NDSError(f"workspace {ws.root} does not exist: pass --root a workspace folder (with params.yaml)")
    state_path = home / STATE_NAME
    if state_path.exists() and any(_alive(p) for p in read_state(home).get("pids", {}).values()):
        raise NDSError(f"a server from {state_path} is still running: `nds server down` first")
    home.mkdir(parents=True, exist_ok=True)
    api = api_url(host, port)
    ui_api = ui_api or ui_api_url(host, port)
    env = server_env(home, api, repo_root)
    logs = {"server": home / "server.log", "worker": home / "worker.log"}
    state = {"api_url": api, "ui_url": f"http://{host}:{port}", "ui_api_url": ui_api, "home": str(home),
             "repo_root": str(repo_root), "workspace": str(ws.root),
             "pids": {}, "logs": {k: str(v) for k, v in logs.items()}, "started_at": time.time()}
    t0 = time.monotonic()
    with open(logs["server"], "ab") as out:
        server = subprocess.Popen(
            _prefect_cmd("server", "start", "--host", host, "--port", str(port)),
            cwd=home, env=server_env(home, None, repo_root, ui_api=ui_api), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    state["pids"]["server"] = server.pid
    _write_state(state_path, state)
    try:
        state["startup_seconds"] = round(wait_healthy(api, timeout_s=startup_timeout_s, proc=server,
                                                      log_path=logs["server"]), 1)
        run_prefect(["work-pool", "create", WORK_POOL, "--type", WORK_POOL_TYPE, "--overwrite"], env=env, cwd=repo_root)
        names = ["--all"] if deployments is None else [a for n in deployments for a in ("--name", n)]
        run_prefect(["--no-prompt", "deploy", *names], env=env, cwd=repo_root)
        state["deployments"] = deployments or "all"
        state["operator_view"] = prefect_ui.publish_operator_view(api, ws)
        if worker:
            worker_env = server_env(home, api, repo_root, workspace=ws.root)
            state["pids"]["worker"] = start_worker(env=worker_env, cwd=repo_root, log_path=logs["worker"]).pid
    except BaseException:
        server_down(home)
        raise
    state["seconds"] = round(time.monotonic() - t0, 1)
    _write_state(state_path, state)
    log.info("prefect server at %s (pids %s), state in %s", state["ui_url"], state["pids"], state_path)
    return state


def read_state(home: Path | None = None) -> dict:
    path = Path(home or default_home()) / STATE_NAME
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NDSError(f"{path} is damaged ({exc}): stop the processes by hand and delete it") from exc


def _write_state(path: Path, state: dict) -> None:
    # Insertion order and a final newline, as before (write_json would sort the keys).
    write_text(path, json.dumps(state, indent=2) + "\n")


def _alive(pid: int) -> bool:
    """Whether `pid` runs and is still a prefect process (a recycled pid is left alone)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"prefect" in cmdline and not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def _stop(pid: int, signals: list[tuple[int, float]]) -> str:
    """Send each (signal, grace seconds) in turn until the process is gone."""
    for sig, grace_s in signals:
        if not _alive(pid):
            return "stopped"
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return "stopped"
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            _reap(pid)
            if not _alive(pid):
                return "stopped"
            time.sleep(0.2)
    return "still running"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our own child (tests, or up/down in one process)
    except ChildProcessError:
        pass


def server_down(home: Path | None = None, *, grace_s: float = STOP_GRACE_S) -> dict:
    """Stop the processes recorded in the state file: worker first, then the server."""
    home = Path(home or default_home())
    state = read_state(home)
    pids = state.get("pids", {})
    result = {}
    # A process worker ignores SIGTERM and the first SIGINT; the second SIGINT stops it.
    if "worker" in pids:
        result["worker"] = _stop(pids["worker"], [(signal.SIGINT, 2), (signal.SIGINT, grace_s), (signal.SIGKILL, 5)])
    if "server" in pids:
        result["server"] = _stop(pids["server"], [(signal.SIGTERM, grace_s), (signal.SIGKILL, 5)])
    if all(v == "stopped" for v in result.values()):
        (home / STATE_NAME).unlink(missing_ok=True)
    else:
        raise NDSError(f"could not stop {result}; see {home / STATE_NAME}")
    return result
