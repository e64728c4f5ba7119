"""Stage `train_experts`: one rotation expert per cluster, then the expert bundle in `artifacts/experts`.

Finished experts are kept in a resume cache keyed by what determines them, so an interrupted
run trains only the missing experts. The index version ties samples, clusters and experts.

Where experts train is ``train_experts.device`` (``NDS_DEVICE``, ``--device``). On the CPU the
``workers`` experts trained at once split the cores; on a GPU they share it, each on its own CUDA
stream (nds.models.expert_gpu). GPU-trained experts carry their device in the bundle and the
index version; CPU bundles are byte-identical to those made before devices existed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np

from nds._io import file_sha256, write_json
from nds.config import Workspace
from nds.errors import InvalidInputError
from nds.formats.bundle import write_bundle
from nds.index.cluster_stats import bundle_cluster_stats
from nds.index._artifacts import load_assignments, load_index_images, load_index_order, read_json, require, stage_output
from nds.models.device import device_name, is_cpu, pick_device
from nds.models.experts import EXPERT_INPUT_SIZE, bundle_fields, save_expert, train_expert
from nds.params import RUNTIME_FIELDS, Params

log = logging.getLogger(__name__)

#: Finished experts are kept here, keyed by what determines them, so an interrupted
#: train_experts run resumes with only the missing experts (DVC deletes stage outputs
#: before rerunning a stage, but not this cache).
EXPERT_CACHE = ".cache/experts"


def plan_experts(ws: Workspace, params: Params) -> list[int]:
    """Expert ids to train (one per non-empty cluster)."""
    summary = read_json(require(ws.stage_dir("cluster") / "clusters.json", "cluster"))
    empty = [i for i, s in enumerate(summary["sizes"]) if s == 0]
    if empty:
        raise InvalidInputError(f"clusters {empty} are empty; lower cluster.k in params.yaml")
    return list(range(summary["k"]))


def _expert_key(member_ids: list[str], member_sha256: list[str], params: Params, device=None) -> str:
    """What determines an expert: its members (by id and content), the recipe, the device kind.

    Not its cluster number: numbers shift when a source is added, the expert must not (an
    unchanged cluster's expert is reused byte-identical).
    """
    h = hashlib.sha256(b"nds-expert-v2")
    h.update(params.train_experts.model_dump_json(exclude=RUNTIME_FIELDS).encode())
    if not is_cpu(device):
        h.update(f"device={device.type}".encode())
    for sid, sha in zip(member_ids, member_sha256):
        h.update(f"{sid}\0{sha}\0".encode())
    return h.hexdigest()[:24]


def _expert_seed(params: Params, key: str) -> int:
    """The expert's training seed: from ``train_experts.seed`` and its members, not its number."""
    return (params.train_experts.seed * 100_003 + int(key[:8], 16)) % (2**31 - 1)


def train_one_expert(ws: Workspace, params: Params, k: int, *, device: str | None = None) -> dict:
    """Train (or reuse from the resume cache) the expert of cluster `k`; returns its entry.

    device: overrides params.yaml ``train_experts.device`` (like $NDS_DEVICE).
    """
    import torch

    p = params.train_experts
    dev = pick_device(device, p.device, where="params.yaml train_experts.device")
    assignments = load_assignments(ws)
    index = load_index_order(ws)
    members = np.flatnonzero(assignments == k)
    member_ids = index.column("sample_id").take(members).to_pylist()
    key = _expert_key(member_ids, index.column("sha256").take(members).to_pylist(), params, dev)
    cache = ws.artifacts_dir / EXPERT_CACHE / f"{key}.pt"
    meta_path = cache.with_suffix(".json")
    if cache.exists() and meta_path.exists():
        entry = json.loads(meta_path.read_text())
        if file_sha256(cache) == entry["sha256"]:
            log.info("expert %d: reused from %s", k, cache)
            return {**entry, "expert": k, "file": f"expert_{k:03d}.pt", "cache_file": str(cache), "reused": True}
    images = load_index_images(ws, members, index)
    # Expert tasks run side by side; split the cores between them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // p.workers))
    model, metrics = train_expert(
        images,
        arch=p.arch,
        epochs=p.epochs,
        max_steps=p.max_steps,
        batch_size=p.batch_size,
        lr=p.lr,
        val_fraction=p.val_fraction,
        seed=_expert_seed(params, key),
        **({} if is_cpu(dev) else {"device": dev}),
    )
    meta = {"arch": p.arch, "input_size": EXPERT_INPUT_SIZE, "members": len(members), "key": key}
    sha = save_expert(model, cache, meta=meta)
    entry = {"expert": k, "file": f"expert_{k:03d}.pt", "sha256": sha, **metrics}
    if not is_cpu(dev):  # recorded in bundle.json and the index version; CPU entries stay as they were
        entry.update(device=dev.type, gpu=device_name(dev))
    write_json(meta_path, entry)
    entry = {**entry, "cache_file": str(cache), "reused": False}
    log.info("expert %d: %d images, rotation acc %.3f, %.1fs", k, len(images), metrics["rotation_accuracy"], metrics["train_seconds"])
    return entry


def compute_index_version(ws: Workspace, entries: list[dict]) -> str:
    """Content id tying the indexed samples, their clusters and the experts together."""
    h = hashlib.sha256(b"nds-index-v1")
    for sid in load_index_order(ws).column("sample_id").to_pylist():
        h.update(sid.encode() + b"\0")
    h.update(np.ascontiguousarray(load_assignments(ws)).tobytes())
    for e in sorted(entries, key=lambda e: e["expert"]):
        h.update(e["sha256"].encode())
        if e.get("device", "cpu") != "cpu":  # GPU-trained experts: the version records it
            h.update(f"device={e['device']}".encode())
    return h.hexdigest()[:16]


def finish_experts(ws: Workspace, params: Params, entries: list[dict]) -> dict:
    """Copy the trained experts into `artifacts/experts` and write the bundle."""
    entries = sorted(entries, key=lambda e: e["expert"])
    version = compute_index_version(ws, entries)
    clean = []
    with stage_output(ws, "experts") as out:
        for e in entries:
            shutil.copyfile(e["cache_file"], out / e["file"])
            clean.append({k: v for k, v in e.items() if k not in ("reused", "cache_file")})
        extract_info = read_json(ws.stage_dir("extract") / "extract.json")
        extra = {"extractor": extract_info.get("extractor"),
                 "train_params": params.train_experts.model_dump(exclude=RUNTIME_FIELDS)}
        # What the `features` / `combined` scorers compare a client's images with (public extractor space).
        extra["cluster_stats"] = bundle_cluster_stats(ws)
        gpus = sorted({f"{e['device']} ({e.get('gpu')})" for e in entries if e.get("device", "cpu") != "cpu"})
        if gpus:
            extra["train_device"] = ", ".join(gpus)
        bundle = write_bundle(
            out,
            index_version=version,
            network=bundle_fields(params.train_experts.arch),
            experts=clean,
            extra=extra,
        )
    accs = [e["rotation_accuracy"] for e in entries]
    log.info("experts: %d trained, rotation accuracy %.3f..%.3f, index %s", len(entries), min(accs), max(accs), version)
    return bundle


def run_train_experts(ws: Workspace, params: Params, *, device: str | None = None) -> dict:
    """The `dvc repro` path: experts side by side in threads, as the Prefect flow's tasks run."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=params.train_experts.workers) as pool:
        entries = list(pool.map(lambda k: train_one_expert(ws, params, k, device=device), plan_experts(ws, params)))
    return finish_experts(ws, params, entries)
