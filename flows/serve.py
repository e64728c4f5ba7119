"""`nds serve`: the HTTP service (nds.serve.app) on uvicorn, with every selection reported to Prefect.

The composition root of the service: nds/ never imports Prefect, so the Prefect event emitter
is wired in here through the app's `on_selection` callback. Operators see one event
`nds.selection.created` per selection in the Prefect UI (Events), with the requester, the index
version, the counts and the manifest checksum; the scores and parameters stay out of Prefect.
Emitting is best-effort and asynchronous (Prefect's events worker): it never fails or slows a
request, and without PREFECT_API_URL nothing is emitted (no temporary Prefect server is started).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from typing import Callable

from nds.config import Workspace
from nds.serve.app import ServeConfig, create_app

log = logging.getLogger(__name__)

#: How `nds serve --workers N` hands its options to the worker processes uvicorn starts.
OPTIONS_ENV = "NDS_SERVE_OPTIONS"
EVENT = "nds.selection.created"
#: Idle seconds a client connection stays open (nginx's default; uvicorn's own is 5).
KEEP_ALIVE_S = 75


def prefect_emitter() -> Callable[[dict], None] | None:
    """A callback sending one Prefect event per selection, or None when no Prefect API is configured."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        log.info("PREFECT_API_URL is not set: selections are not reported to Prefect (the warehouse has them)")
        return None
    from prefect.events import emit_event

    def emit(info: dict) -> None:
        sid = info["selection_id"]
        emit_event(
            event=EVENT,
            resource={"prefect.resource.id": f"nds.selection.{sid}", "prefect.resource.name": sid,
                      "nds.requester": str(info["requester"])},
            related=[{"prefect.resource.id": f"nds.index.{info['index_version']}", "prefect.resource.role": "index",
                      "prefect.resource.name": str(info["index_version"])}],
            payload={k: info.get(k) for k in ("requester", "index_version", "rows", "budget", "mode",
                                              "counts_per_dataset", "manifest_sha256", "manifest_location", "seconds")},
        )

    return emit


def build_app(root: str | None, config: ServeConfig):
    app = create_app(Workspace.from_env(root), config)  # loads the index: its errors come first
    app.state.service.on_selection = prefect_emitter()
    return app


def app_from_env():
    """uvicorn's app factory in each worker process (`--workers N`)."""
    options = json.loads(os.environ[OPTIONS_ENV])
    return build_app(options["root"], ServeConfig(**options["config"]))


def serve(root: str | None, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8600, workers: int = 1,
          ssl_keyfile: str | None = None, ssl_certfile: str | None = None, ssl_keyfile_password: str | None = None,
          access_log: bool = True, banner: str | None = None) -> None:
    """Run the service until interrupted. TLS when both ssl files are given (uvicorn's own options).
    `banner` is printed once the index is loaded, before the port opens."""
    import uvicorn

    kwargs = dict(host=host, port=port, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile,
                  ssl_keyfile_password=ssl_keyfile_password, access_log=access_log, log_level="info",
                  timeout_graceful_shutdown=10, server_header=False,
                  # a client's POST and its GETs reuse one connection; uvicorn's 5 s would close it
                  # under a queue of selections, racing the client's next request (a reset)
                  timeout_keep_alive=KEEP_ALIVE_S)
    if workers <= 1:
        app = build_app(root, config)
        if banner:
            print(banner, flush=True)
        uvicorn.run(app, **kwargs)
        return
    from nds.serve.holder import IndexHolder
    from nds.serve.state import default_state_dir

    ws = Workspace.from_env(root)
    IndexHolder(ws, default_state_dir(ws, config.state_dir), poll_s=0).current()  # one-line error here, snapshot once
    config_doc = {k: (str(v) if k == "state_dir" and v is not None else v) for k, v in asdict(config).items()}
    os.environ[OPTIONS_ENV] = json.dumps({"root": str(ws.root), "config": config_doc})
    if banner:
        print(banner, flush=True)
    uvicorn.run("flows.serve:app_from_env", factory=True, workers=workers, **kwargs)
