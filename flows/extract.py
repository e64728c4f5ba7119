"""Stage 1: features of every source sample, in shards (one task each; on Dask when configured)."""

from __future__ import annotations

import os

from prefect import flow, task, unmapped

from flows._common import task_runner, workspace_and_params
from nds.index import extract as extract_stage
from nds.models.device import DEVICE_ENV


@task(name="plan-extract")
def plan_extract(root: str | None, shard_batches: int) -> list[tuple[int, int]]:
    ws, params = workspace_and_params(root)
    return extract_stage.plan_extract(ws, params, shard_batches=shard_batches)


@task(name="extract-shard", retries=0)
def extract_shard(root: str | None, start: int, stop: int, progress: bool, device: str | None = None) -> dict:
    ws, params = workspace_and_params(root)
    return extract_stage.extract_shard(ws, params, start, stop, progress=progress, device=device)


@task(name="finish-extract")
def finish_extract(root: str | None, shards: list[dict]) -> dict:
    ws, params = workspace_and_params(root)
    return extract_stage.finish_extract(ws, params, shards)


@flow(name="extract", log_prints=False)
def extract(root: str | None = None, progress: bool = False, shard_batches: int = extract_stage.SHARD_BATCHES,
            device: str | None = None) -> dict:
    """device: auto | cpu | cuda | cuda:N for every shard (None: this process's $NDS_DEVICE, else
    params.yaml). It travels with each task, so Dask workers get it; `auto` resolves on the worker."""
    device = device or os.environ.get(DEVICE_ENV) or None
    plan = plan_extract(root, shard_batches)
    futures = extract_shard.map(root, [a for a, _ in plan], [b for _, b in plan], progress, unmapped(device))
    return finish_extract(root, [f.result() for f in futures])


def extract_with_runner(root: str | None = None, progress: bool = False,
                        shard_batches: int = extract_stage.SHARD_BATCHES, device: str | None = None) -> dict:
    """The flow with one shard at a time in this process (torch uses every core, or the GPU), or on Dask."""
    return extract.with_options(task_runner=task_runner(1))(root, progress, shard_batches, device)


if __name__ == "__main__":
    extract_with_runner(progress=True)
