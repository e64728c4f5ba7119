"""Stage 3: one rotation expert per cluster, trained as independent tasks."""

from __future__ import annotations

from prefect import flow, task

from flows._common import task_runner, workspace_and_params
from nds.index import experts as experts_stage


@task(name="plan-experts")
def plan_experts(root: str | None) -> list[int]:
    ws, params = workspace_and_params(root)
    return experts_stage.plan_experts(ws, params)


@task(name="train-expert", retries=0)
def train_expert(root: str | None, k: int) -> dict:
    ws, params = workspace_and_params(root)
    return experts_stage.train_one_expert(ws, params, k)


@task(name="write-bundle")
def write_bundle(root: str | None, entries: list[dict]) -> dict:
    ws, params = workspace_and_params(root)
    return experts_stage.finish_experts(ws, params, entries)


def _workers(root: str | None) -> int:
    return workspace_and_params(root)[1].train_experts.workers


@flow(name="train_experts")
def train_experts(root: str | None = None) -> dict:
    ks = plan_experts(root)
    futures = train_expert.map(root, ks)
    return write_bundle(root, [f.result() for f in futures])


def train_experts_with_workers(root: str | None = None) -> dict:
    """Run the flow with as many concurrent expert tasks as train_experts.workers says (or on Dask)."""
    return train_experts.with_options(task_runner=task_runner(_workers(root)))(root)


if __name__ == "__main__":
    train_experts_with_workers()
