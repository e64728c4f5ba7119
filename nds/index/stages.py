"""The four index stages by name: what `nds stage NAME` (and so dvc.yaml) runs.

Each stage is one module of nds.index named after it; the Prefect flows (flows/*.py) call the
same functions with the same `params.yaml`, so both paths produce the same artifacts.
"""

from __future__ import annotations

from nds.config import Workspace
from nds.errors import InvalidInputError
from nds.params import load_params

STAGES = ("extract", "cluster", "train_experts", "compute_weights")


def run_stage(name: str, ws: Workspace | None = None, *, progress: bool = True) -> dict:
    """Entry point of `nds stage NAME` (what dvc.yaml runs)."""
    if name not in STAGES:
        raise InvalidInputError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    ws = ws or Workspace.from_env()
    params = load_params(ws.params_path)
    if name == "extract":
        from nds.index.extract import run_extract

        return run_extract(ws, params, progress=progress)
    if name == "cluster":
        from nds.index.cluster import run_cluster

        return run_cluster(ws, params)
    if name == "train_experts":
        from nds.index.experts import run_train_experts

        return run_train_experts(ws, params)
    from nds.index.weights import run_compute_weights

    return run_compute_weights(ws, params)
