"""What every stage flow shares: resolving the workspace and its params."""

from __future__ import annotations

import os

from nds.config import Workspace
from nds.errors import NDSError
from nds.params import Params, load_params


def workspace_and_params(root: str | None) -> tuple[Workspace, Params]:
    ws = Workspace.from_env(root)
    return ws, load_params(ws.params_path)


#: A Dask scheduler (`tcp://host:8786`) to run extraction shards and experts on; unset: this process.
DASK_ADDRESS_ENV = "NDS_DASK_ADDRESS"


def task_runner(workers: int):
    """DaskTaskRunner on $NDS_DASK_ADDRESS if set, else `workers` threads in this process."""
    from prefect.task_runners import ThreadPoolTaskRunner

    address = os.environ.get(DASK_ADDRESS_ENV)
    if not address:
        return ThreadPoolTaskRunner(max_workers=workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise NDSError(f"{DASK_ADDRESS_ENV} is set but prefect-dask is missing: pip install prefect-dask") from exc
    return DaskTaskRunner(address=address)
