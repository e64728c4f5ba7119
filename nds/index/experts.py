"""Stage `train_experts`: one rotation expert per cluster, then the expert bundle in `artifacts/experts`.

Finished experts are kept in a resume cache keyed by what determines them, so an interrupted
run trains only the missing experts. The index version ties samples, clusters and experts.

Where experts train is ``train_experts.device`` (``NDS_DEVICE``, ``--device``). On the CPU the
``workers`` experts trained at once split the cores; on a GPU they share it, each on its own CUDA
stream (nds.models.expert_gpu). GPU-trained experts carry their device in the bundle and the
index version; CPU bundles are byte-identical to those made before devices existed.

Experts train at ``train_experts.image_size``. At the corpus size (32, the default) they train on
the pixels the extract stage decoded (``artifacts/extract/pixels.npy``). At any other size the
originals are decoded again at that size, by DataLoader reader processes, into a per-cluster
pixels cache (``artifacts/.cache/pixels``, keyed by the members and the size): a stage cache,
rebuilt from the originals when missing, never the source of truth. Only clusters without one
are decoded, so after ``nds source add`` only the new clusters' originals are read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from nds._io import atomic_file, file_sha256, write_json
from nds.config import IMAGE_SIZE, Workspace
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
#: A cluster's training pixels at a ``train_experts.image_size`` other than the corpus's:
#: ``<key>.npy`` (members, s, s, 3) uint8 in member order, keyed by the members and the size.
PIXELS_CACHE = ".cache/pixels"
#: Originals per reader batch when decoding training pixels.
PIXELS_BATCH = 256
#: Experts trained side by side in threads decode a missing cluster's pixels one at a time.
_PIXELS_LOCK = threading.Lock()


def plan_experts(ws: Workspace, params: Params) -> list[int]:
    """Expert ids to train (one per non-empty cluster).

    At a ``train_experts.image_size`` other than the corpus's, first decodes the originals of
    every cluster without cached training pixels (`prepare_pixels`): once, here, before the
    experts train side by side.
    """
    summary = read_json(require(ws.stage_dir("cluster") / "clusters.json", "cluster"))
    empty = [i for i, s in enumerate(summary["sizes"]) if s == 0]
    if empty:
        raise InvalidInputError(f"clusters {empty} are empty; lower cluster.k in params.yaml")
    prepare_pixels(ws, params)
    return list(range(summary["k"]))


def _recipe_exclude(params: Params) -> frozenset[str]:
    """train_experts fields left out of the expert keys and bundle.json: where they run, and
    ``image_size`` at the size every expert had before it existed (so those keep their keys
    and bundles their bytes)."""
    if params.train_experts.image_size == EXPERT_INPUT_SIZE:
        return RUNTIME_FIELDS | {"image_size"}
    return RUNTIME_FIELDS


def _expert_key(member_ids: list[str], member_sha256: list[str], params: Params, device=None) -> str:
    """What determines an expert: its members (by id and content), the recipe, the device kind.

    Not its cluster number: numbers shift when a source is added, the expert must not (an
    unchanged cluster's expert is reused byte-identical).
    """
    h = hashlib.sha256(b"nds-expert-v2")
    h.update(params.train_experts.model_dump_json(exclude=_recipe_exclude(params)).encode())
    if not is_cpu(device):
        h.update(f"device={device.type}".encode())
    for sid, sha in zip(member_ids, member_sha256):
        h.update(f"{sid}\0{sha}\0".encode())
    return h.hexdigest()[:24]


def _pixels_key(member_ids: list[str], member_sha256: list[str], size: int) -> str:
    """What determines a cluster's training pixels: its members (by id and content) and the size."""
    h = hashlib.sha256(f"nds-pixels-v1\0size={size}\0".encode())
    for sid, sha in zip(member_ids, member_sha256):
        h.update(f"{sid}\0{sha}\0".encode())
    return h.hexdigest()[:24]


def _pixels_path(ws: Workspace, member_ids: list[str], member_sha256: list[str], size: int) -> Path:
    return ws.artifacts_dir / PIXELS_CACHE / f"{_pixels_key(member_ids, member_sha256, size)}.npy"


def _cluster_pixels(ws: Workspace, params: Params, index, assignments: np.ndarray,
                    clusters: list[int] | None = None) -> dict[int, tuple[Path, np.ndarray]]:
    """cluster -> (its pixels cache file, its member positions in index order), for every
    cluster or for ``clusters``."""
    size = params.train_experts.image_size
    ids, shas = index.column("sample_id"), index.column("sha256")
    out = {}
    for k in (np.unique(assignments).tolist() if clusters is None else clusters):
        members = np.flatnonzero(assignments == k)
        out[k] = (_pixels_path(ws, ids.take(members).to_pylist(), shas.take(members).to_pylist(), size), members)
    return out


def _pixels_ready(path: Path, n: int, size: int) -> bool:
    """True if ``path`` holds the (n, size, size, 3) uint8 pixels (files appear whole: atomic writes)."""
    if not path.exists():
        return False
    arr = np.load(path, mmap_mode="r")
    return arr.dtype == np.uint8 and arr.shape == (n, size, size, 3)


def prepare_pixels(ws: Workspace, params: Params, clusters: list[int] | None = None) -> dict:
    """Decode the originals of every cluster (or of ``clusters``) lacking training pixels at
    ``train_experts.image_size`` into the pixels cache; nothing at the corpus size.

    One pass of ``train_experts.loader_workers`` DataLoader reader processes fetches, checks
    (sha256 against the catalog) and decodes the originals, resizing them in the readers with
    the corpus's rules (`nds.corpus.decode.to_array`); each batch goes straight into its
    clusters' memory-mapped files, so memory holds the batches in flight, not the images.
    Returns what it did: {"image_size", "clusters_decoded", "images_decoded", "seconds"}.
    """
    size = params.train_experts.image_size
    nothing = {"image_size": size, "clusters_decoded": 0, "images_decoded": 0, "seconds": 0.0}
    if size == IMAGE_SIZE:
        return nothing
    index, assignments = load_index_order(ws), load_assignments(ws)
    files = _cluster_pixels(ws, params, index, assignments, clusters)
    with _PIXELS_LOCK:
        todo = {k: (path, members) for k, (path, members) in files.items()
                if not _pixels_ready(path, len(members), size)}
        return _decode_pixels(ws, params, index, todo) if todo else nothing


def _decode_pixels(ws: Workspace, params: Params, index, todo: dict[int, tuple[Path, np.ndarray]]) -> dict:
    """The originals of ``todo``'s clusters (cluster -> (file, member positions)) at the training size."""
    from nds.corpus.read import is_packaged_uri
    from nds.index.extract import object_batches, with_readable_uris

    p = params.train_experts
    size = p.image_size
    positions = np.sort(np.concatenate([members for _, members in todo.values()]))
    rows = index.select(["uri", "sha256"]).take(positions)
    arrays = [u for u in rows.column("uri").to_pylist() if is_packaged_uri(u)]
    if arrays:
        raise InvalidInputError(
            f"train_experts.image_size {size} decodes the originals, but {len(arrays)} index rows (e.g. {arrays[0]}) "
            f"are {IMAGE_SIZE} px corpus arrays (a corpus built before the packaged datasets were sources): rebuild "
            f"it (`nds corpus build`) and index again, or set train_experts.image_size: {IMAGE_SIZE}")
    cluster_of = np.full(len(index), -1, dtype=np.int64)
    slot = np.zeros(len(index), dtype=np.int64)  # a row's place in its cluster's file
    for k, (_, members) in todo.items():
        cluster_of[members], slot[members] = k, np.arange(len(members))
    loader = object_batches(with_readable_uris(ws.data_dir, rows), size, PIXELS_BATCH, workers=p.loader_workers)
    log.info("experts: decoding %d originals of %d clusters at %d px (%d reader processes)", len(positions),
             len(todo), size, loader.num_workers)
    t0, done, next_report = time.perf_counter(), 0, len(positions) // 10
    with ExitStack() as stack:
        out = {}
        for k, (path, members) in todo.items():
            tmp = stack.enter_context(atomic_file(path))
            out[k] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(members), size, size, 3))
        for images, _ in loader:  # (images at the training size, corpus-format images): the first
            images = np.asarray(images)
            batch = positions[done:done + len(images)]
            for k in np.unique(cluster_of[batch]).tolist():
                mine = cluster_of[batch] == k
                out[k][slot[batch[mine]]] = images[mine]
            done += len(images)
            if next_report <= done < len(positions):
                log.info("experts: decoded %d / %d originals at %d px", done, len(positions), size)
                next_report = done + max(1, len(positions) // 10)
        if done != len(positions):
            raise InvalidInputError(f"the readers gave {done} images for {len(positions)} index rows; "
                                    "rerun train_experts")
        for k in out:
            out[k].flush()
        out.clear()  # the memory maps close before the files are renamed into place
    seconds = time.perf_counter() - t0
    log.info("experts: %d originals of %d clusters decoded at %d px in %.1fs (%.0f img/s) into %s", len(positions),
             len(todo), size, seconds, len(positions) / seconds if seconds else 0, ws.artifacts_dir / PIXELS_CACHE)
    return {"image_size": size, "clusters_decoded": len(todo), "images_decoded": int(len(positions)),
            "seconds": round(seconds, 3)}


def _training_images(ws: Workspace, params: Params, k: int, members: np.ndarray, index,
                     member_sha256: list[str]) -> np.ndarray:
    """Cluster ``k``'s images at ``train_experts.image_size``: (n, s, s, 3) uint8 in member order."""
    size = params.train_experts.image_size
    if size == IMAGE_SIZE:
        return load_index_images(ws, members, index)
    path = _pixels_path(ws, index.column("sample_id").take(members).to_pylist(), member_sha256, size)
    if not _pixels_ready(path, len(members), size):  # train_one_expert called without plan_experts
        prepare_pixels(ws, params, [k])
    return np.load(path)


def _prune_pixels(ws: Workspace, params: Params) -> None:
    """Delete training pixels this index does not use (removed clusters', another size's), while
    the stage uses the cache; at the corpus size it is left alone (switching back reuses it)."""
    if params.train_experts.image_size == IMAGE_SIZE:
        return
    keep = {path.name for path, _ in _cluster_pixels(ws, params, load_index_order(ws), load_assignments(ws)).values()}
    for path in (ws.artifacts_dir / PIXELS_CACHE).glob("*.npy"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


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
    member_sha256 = index.column("sha256").take(members).to_pylist()
    key = _expert_key(member_ids, member_sha256, params, dev)
    cache = ws.artifacts_dir / EXPERT_CACHE / f"{key}.pt"
    meta_path = cache.with_suffix(".json")
    if cache.exists() and meta_path.exists():
        entry = json.loads(meta_path.read_text())
        if file_sha256(cache) == entry["sha256"]:
            log.info("expert %d: reused from %s", k, cache)
            return {**entry, "expert": k, "file": f"expert_{k:03d}.pt", "cache_file": str(cache), "reused": True}
    images = _training_images(ws, params, k, members, index, member_sha256)
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
    meta = {"arch": p.arch, "input_size": p.image_size, "members": len(members), "key": key}
    sha = save_expert(model, cache, meta=meta)
    entry = {"expert": k, "file": f"expert_{k:03d}.pt", "sha256": sha, **metrics}
    if not is_cpu(dev):  # recorded in bundle.json and the index version; CPU entries stay as they were
        entry.update(device=dev.type, gpu=device_name(dev))
    write_json(meta_path, entry)
    entry = {**entry, "cache_file": str(cache), "reused": False}
    log.info("expert %d: %d images at %d px, rotation acc %.3f, %.1fs", k, len(images), p.image_size,
             metrics["rotation_accuracy"], metrics["train_seconds"])
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
                 "train_params": params.train_experts.model_dump(exclude=_recipe_exclude(params))}
        # What the `features` / `combined` scorers compare a client's images with (public extractor space).
        extra["cluster_stats"] = bundle_cluster_stats(ws)
        gpus = sorted({f"{e['device']} ({e.get('gpu')})" for e in entries if e.get("device", "cpu") != "cpu"})
        if gpus:
            extra["train_device"] = ", ".join(gpus)
        bundle = write_bundle(
            out,
            index_version=version,
            network=bundle_fields(params.train_experts.arch, params.train_experts.image_size),
            experts=clean,
            extra=extra,
        )
    _prune_pixels(ws, params)
    accs = [e["rotation_accuracy"] for e in entries]
    log.info("experts: %d trained at %d px, rotation accuracy %.3f..%.3f, index %s", len(entries),
             params.train_experts.image_size, min(accs), max(accs), version)
    return bundle


def run_train_experts(ws: Workspace, params: Params, *, device: str | None = None) -> dict:
    """The `dvc repro` path: experts side by side in threads, as the Prefect flow's tasks run."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=params.train_experts.workers) as pool:
        entries = list(pool.map(lambda k: train_one_expert(ws, params, k, device=device), plan_experts(ws, params)))
    return finish_experts(ws, params, entries)
