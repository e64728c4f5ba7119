"""Stage 1: features of every source sample."""

from __future__ import annotations

from prefect import flow, task

from flows._common import workspace_and_params
from nds import pipeline


@task(name="extract-features")
def extract_features(root: str | None, progress: bool) -> dict:
    ws, params = workspace_and_params(root)
    return pipeline.run_extract(ws, params, progress=progress)


@flow(name="extract", log_prints=False)
def extract(root: str | None = None, progress: bool = False) -> dict:
    return extract_features(root, progress)


if __name__ == "__main__":
    extract(progress=True)
