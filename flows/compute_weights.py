"""Stage 4: sample weights w_k(x) = 1/|S_k| into Parquet and the DuckDB warehouse."""

from __future__ import annotations

from prefect import flow, task

from flows._common import workspace_and_params
from nds.index.weights import run_compute_weights


@task(name="compute-weights")
def compute_weights_task(root: str | None, stage_seconds: dict | None) -> dict:
    ws, params = workspace_and_params(root)
    return run_compute_weights(ws, params, stage_seconds=stage_seconds)


@flow(name="compute_weights")
def compute_weights(root: str | None = None, stage_seconds: dict | None = None) -> dict:
    return compute_weights_task(root, stage_seconds)


if __name__ == "__main__":
    compute_weights()
