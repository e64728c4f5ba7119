"""Stage 3: one rotation expert per cluster, trained as independent tasks."""

from __future__ import annotations

import os

from prefect import flow, task, unmapped

from flows._common import task_runner, workspace_and_params
from nds.index import experts as experts_stage
from nds.models.device import DEVICE_ENV


@task(name="plan-experts")
def plan_experts(root: str | None) -> list[int]:
    ws, params = workspace_and_params(root)
    return experts_stage.plan_experts(ws, params)


@task(name="train-expert", retries=0)
def train_expert(root: str | None, k: int, device: str | None = None) -> dict:
    ws, params = workspace_and_params(root)
    return experts_stage.train_one_expert(ws, params, k, device=device)


@task(name="write-bundle")
def write_bundle(root: str | None, entries: list[dict]) -> dict:
    ws, params = workspace_and_params(root)
    return experts_stage.finish_experts(ws, params, entries)


def _workers(root: str | None) -> int:
    return workspace_and_params(root)[1].train_experts.workers


@flow(name="train_experts")
def train_experts(root: str | None = None, device: str | None = None) -> dict:
    """device: auto | cpu | cuda | cuda:N for every expert (None: this process's $NDS_DEVICE, else
    params.yaml). On a GPU, train_experts.workers experts share it, each on its own CUDA stream."""
    device = device or os.environ.get(DEVICE_ENV) or None
    ks = plan_experts(root)
    futures = train_expert.map(root, ks, unmapped(device))
    return write_bundle(root, [f.result() for f in futures])


def train_experts_with_workers(root: str | None = None, device: str | None = None) -> dict:
    """Run the flow with as many concurrent expert tasks as train_experts.workers says (or on Dask)."""
    return train_experts.with_options(task_runner=task_runner(_workers(root)))(root, device)


if __name__ == "__main__":
    train_experts_with_workers()
