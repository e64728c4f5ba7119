"""Stage 2: split the source into K clusters."""

from __future__ import annotations

from prefect import flow, task

from flows._common import workspace_and_params
from nds.index.cluster import run_cluster


@task(name="assign-clusters")
def assign_clusters(root: str | None) -> dict:
    ws, params = workspace_and_params(root)
    return run_cluster(ws, params)


@flow(name="cluster")
def cluster(root: str | None = None) -> dict:
    return assign_clusters(root)


if __name__ == "__main__":
    cluster()
