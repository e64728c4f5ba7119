"""Expert training's device plumbing at the stage level: what a GPU-trained expert records.

CI has no GPU, so GPU entries are the entries train_one_expert writes on a GPU (the same fields
plus ``device`` and ``gpu``) on top of experts really trained on the CPU.
"""

import json
import shutil

import pytest

from nds.config import Workspace
from nds.index.experts import finish_experts, plan_experts, train_one_expert
from nds.params import load_params


def test_cpu_bundle_is_unchanged_and_gpu_experts_record_their_device(tiny_index, tmp_path):
    src, summary = tiny_index
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.root, ws.root, ignore=shutil.ignore_patterns("*.duckdb*"))
    params = load_params(ws.params_path)
    before = json.loads((ws.stage_dir("experts") / "bundle.json").read_text())
    entries = [train_one_expert(ws, params, k, device="cpu") for k in plan_experts(ws, params)]
    assert all(e["reused"] for e in entries) and not any("device" in e for e in entries)
    cpu = finish_experts(ws, params, entries)
    assert cpu["index_version"] == before["index_version"] == summary["index_version"]
    assert "train_device" not in cpu and "device" not in cpu["train_params"]

    gpu_entries = [dict(e, device="cuda", gpu="NVIDIA H200") for e in entries]
    gpu = finish_experts(ws, params, gpu_entries)
    assert gpu["index_version"] != cpu["index_version"]  # same bytes, other device: another version
    assert gpu["train_device"] == "cuda (NVIDIA H200)"
    assert all(e["device"] == "cuda" for e in gpu["experts"])


def test_cuda_in_params_yaml_fails_before_training(tiny_index, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    from nds.models.device import DeviceUnavailableError

    src, _ = tiny_index
    params = load_params(src.params_path)
    params = params.model_copy(update={"train_experts": params.train_experts.model_copy(update={"device": "cuda"})})
    with pytest.raises(DeviceUnavailableError, match="params.yaml train_experts.device asks for 'cuda'"):
        train_one_expert(Workspace(tmp_path / "nothing-here"), params, 0)
    assert not (tmp_path / "nothing-here").exists()
