"""The whole index pipeline (NDS "server, offline"): extract -> cluster -> train_experts -> compute_weights."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows._common import task_runner, workspace_and_params
from flows.cluster import cluster
from flows.compute_weights import compute_weights
from flows.extract import extract
from flows.train_experts import train_experts
from nds._io import write_json
from nds.errors import NDSError
from nds.platform import dvc, storage
from nds.report import cluster_montage_markdown, index_summary_markdown, render_cluster_montage


@task(name="dvc-commit")
def dvc_commit(root: str | None) -> bool:
    ws, _ = workspace_and_params(root)
    return dvc.commit_outputs(ws)


# Pushing moves data over the network: retry transient failures, never the compute.
@task(name="dvc-push", retries=2, retry_delay_seconds=10)
def dvc_push(root: str | None) -> str | None:
    """`dvc push` the corpus and every stage output to the default remote, if one is set."""
    ws, _ = workspace_and_params(root)
    remote = storage.default_dvc_remote(ws.root)
    if remote is None:
        return None
    dvc.push(ws, remote=remote[0])
    return remote[1]


@task(name="publish-bundle", retries=2, retry_delay_seconds=10)
def publish_bundle(root: str | None, index_version: str) -> str | None:
    """Copy the expert bundle to `experts/<index version>/` in $NDS_STORAGE_URL, if set."""
    if not storage.configured_storage_url():
        return None
    ws, _ = workspace_and_params(root)
    return storage.publish_folder(storage.open_storage(), ws.stage_dir("experts"), f"experts/{index_version}",
                                  last="bundle.json")


@task(name="cluster-montage")
def cluster_montage(root: str | None) -> str:
    ws, _ = workspace_and_params(root)
    return render_cluster_montage(ws, ws.artifacts_dir / "reports" / "cluster_montage.png")["path"]


@task(name="refresh-select-form")
def refresh_select_form(root: str | None) -> dict | None:
    """After a build run as a deployment: the select form offers the new index's datasets."""
    from prefect.runtime import deployment
    from prefect.settings import PREFECT_API_URL

    from nds.platform import prefect_ui

    api = PREFECT_API_URL.value()
    if not deployment.id or root is not None or not api:  # not the deployed workspace, or no server
        return None
    ws, _ = workspace_and_params(root)
    try:
        return prefect_ui.refresh_select_form(api, ws)
    except NDSError as exc:  # the index is built; a stale form is refused at run time, clearly
        get_run_logger().warning("select form not refreshed: %s", exc)
        return None


@task(name="write-summary")
def write_summary(root: str | None, summary: dict) -> None:
    ws, _ = workspace_and_params(root)
    write_json(ws.artifacts_dir / "index_summary.json", summary)


@flow(name="index")
def index(root: str | None = None, progress: bool = False, push: bool = True) -> dict:
    ws, params = workspace_and_params(root)
    seconds: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - t0, 2)
        return out

    ext = timed("extract", extract.with_options(task_runner=task_runner(1)), root, progress)
    cl = timed("cluster", cluster, root)
    runner = task_runner(params.train_experts.workers)
    bundle = timed("train_experts", train_experts.with_options(task_runner=runner), root)
    wts = timed("compute_weights", compute_weights, root, dict(seconds))
    versioned = dvc_commit(root)
    pushed_to = dvc_push(root) if versioned and push else None
    bundle_uri = publish_bundle(root, bundle["index_version"]) if push else None
    summary = {
        "index_version": bundle["index_version"],
        "n_samples": ext["n_samples"],
        "n_datasets": wts["n_datasets"],
        "k": cl["k"],
        "nmi_dataset": cl["nmi_dataset"],
        "rotation_accuracy": [e["rotation_accuracy"] for e in bundle["experts"]],
        "stage_seconds": seconds,
        "extract_images_per_second": ext["images_per_second"],
        "warehouse": str(ws.warehouse_path),
        "artifacts": str(ws.artifacts_dir),
        "bundle": str(ws.stage_dir("experts")),
        "dvc_versioned": versioned,
        "dvc_remote": pushed_to,
        "bundle_uri": bundle_uri,
    }
    summary["cluster_montage"] = cluster_montage(root)
    write_summary(root, summary)
    create_markdown_artifact(
        key="index-summary", markdown=index_summary_markdown(summary, cl),
        description=f"NDS index {summary['index_version']}"
    )
    create_markdown_artifact(
        key="cluster-montage",
        markdown=cluster_montage_markdown(Path(summary["cluster_montage"]).read_bytes(), summary["index_version"]),
        description=f"NDS index {summary['index_version']}: what each expert covers",
    )
    refresh_select_form(root)
    return summary


if __name__ == "__main__":
    index(progress=True)
