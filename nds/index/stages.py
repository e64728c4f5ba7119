"""The four index stages as plain functions over a workspace.

Both `dvc repro` (through `nds stage NAME`) and the Prefect flows call these, with the same
`params.yaml`, so the two paths produce the same artifacts. Each stage writes its folder under
`artifacts/` atomically (build in a temporary sibling, then swap), reports what it made and
how long it took, and reads earlier stages only through their stored artifacts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nds.index import cluster as clustering

from nds.models import experts

from nds.models import extractors as features

from nds.select import sampling as selection

from nds.platform import warehouse

from nds.index import weights
from nds.config import Workspace
from nds.corpus.build import iter_image_batches, load_catalog, load_images_at
from nds.errors import NDSError
from nds.params import Params, load_params

log = logging.getLogger(__name__)

STAGES = ("extract", "cluster", "train_experts", "compute_weights")
#: Finished experts are kept here, keyed by what determines them, so an interrupted
#: train_experts run resumes with only the missing experts (DVC deletes stage outputs
#: before rerunning a stage, but not this cache).
EXPERT_CACHE = ".cache/experts"


# --------------------------------------------------------------------------- helpers
@contextmanager
def stage_output(ws: Workspace, name: str) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `artifacts/<name>` in one rename."""
    final = ws.stage_dir(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = final.with_name(f".{name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    if not path.exists():
        raise NDSError(f"{path} is missing: run the stage that makes it (`nds index` or `dvc repro`)")
    return json.loads(path.read_text())


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise NDSError(f"{path} is missing: run the `{stage}` stage first (`nds index` or `dvc repro {stage}`)")
    return path


def _column(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_pylist(), dtype=object)


def load_index_order(ws: Workspace) -> pa.Table:
    """The source samples in feature/assignment order (written by the extract stage)."""
    return pq.read_table(_require(ws.stage_dir("extract") / "index.parquet", "extract"))


def load_assignments(ws: Workspace) -> np.ndarray:
    return np.load(_require(ws.stage_dir("cluster") / "assignments.npy", "cluster"))


# --------------------------------------------------------------------------- stages
#: Rows of one extraction shard, in batches: shard boundaries fall on batch boundaries, so
#: every batch the extractor sees is the one a single pass would see (bit-identical features).
SHARD_BATCHES = 64
#: Finished shards of an interrupted extraction (deleted once the stage output is written).
EXTRACT_CACHE = ".cache/extract"


def plan_extract(ws: Workspace, params: Params, *, shard_batches: int = SHARD_BATCHES) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the source catalog, one per extraction shard."""
    if shard_batches < 1:
        raise NDSError(f"shard_batches must be >= 1, got {shard_batches}")
    n = load_catalog(ws.data_dir, split="source").num_rows
    if n == 0:
        raise NDSError(f"{ws.catalog_path} has no source samples; rebuild the corpus")
    size = params.extract.batch_size * shard_batches
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _shard_key(params: Params, sample_ids: list[str], start: int) -> str:
    h = hashlib.sha256(json.dumps({"extract": params.extract.model_dump(), "start": start}, sort_keys=True).encode())
    for sid in sample_ids:
        h.update(sid.encode() + b"\0")
    return h.hexdigest()[:24]


def extract_shard(ws: Workspace, params: Params, start: int, stop: int, *, progress: bool = False,
                  extractor: features.Extractor | None = None) -> dict:
    """Features of source rows [start, stop) into the shard cache (reused if already there)."""
    catalog = load_catalog(ws.data_dir, split="source").slice(start, stop - start)
    if catalog.num_rows != stop - start or start % params.extract.batch_size:
        raise NDSError(f"shard [{start}, {stop}) does not fit the catalog: plan the shards again (plan_extract)")
    path = ws.artifacts_dir / EXTRACT_CACHE / f"{_shard_key(params, catalog.column('sample_id').to_pylist(), start)}.npy"
    if path.exists():
        shape = np.load(path, mmap_mode="r").shape
        if shape[0] == catalog.num_rows:
            log.info("extract shard [%d, %d): reused %s", start, stop, path)
            return {"start": start, "stop": stop, "file": str(path), "reused": True, "n_samples": shape[0],
                    "dim": shape[1], "seconds": 0.0, "model_seconds": 0.0}
    extractor = extractor or features.load_extractor(params.extract)
    batches = iter_image_batches(ws.data_dir, catalog, params.extract.batch_size)
    stats = features.compute_features(batches, catalog.num_rows, path, extractor=extractor, progress=progress)
    return {"start": start, "stop": stop, "file": str(path), "reused": False, **stats,
            "extractor": extractor.name, "image_size": extractor.image_size}


def finish_extract(ws: Workspace, params: Params, shards: list[dict]) -> dict:
    """Join the shards into `features.npy (n, dim) float16` + `index.parquet`; clear the shard cache."""
    catalog = load_catalog(ws.data_dir, split="source")
    shards = sorted(shards, key=lambda e: e["start"])
    covered = [(e["start"], e["stop"]) for e in shards]
    if not shards or covered[0][0] != 0 or covered[-1][1] != catalog.num_rows or \
            any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise NDSError(f"extraction shards {covered[:3]}... do not cover the {catalog.num_rows} source rows: rerun extract")
    t0 = time.perf_counter()
    dim = int(shards[0]["dim"])
    with stage_output(ws, "extract") as out:
        feats = np.lib.format.open_memmap(out / "features.npy", mode="w+", dtype=np.float16,
                                          shape=(catalog.num_rows, dim))
        for e in shards:  # one shard in memory at a time
            feats[e["start"]:e["stop"]] = np.load(e["file"], mmap_mode="r")
        feats.flush()
        del feats
        pq.write_table(catalog.select(["sample_id", "dataset", "label", "uri", "split", "sha256"]), out / "index.parquet")
        computed = [e for e in shards if not e["reused"]]
        model_s = sum(e["model_seconds"] for e in shards)
        wall = sum(e["seconds"] for e in shards) + (time.perf_counter() - t0)
        stats = {
            "n_samples": catalog.num_rows,
            "dim": dim,
            "shards": len(shards),
            "shards_reused": len(shards) - len(computed),
            "seconds": round(wall, 3),
            "model_seconds": round(model_s, 3),
            "images_per_second": round(sum(e["n_samples"] for e in computed) / wall, 1) if computed and wall > 0 else None,
            "extractor": params.extract.extractor,
            "image_size": params.extract.image_size,
        }
        write_json(out / "extract.json", stats)
    for e in shards:
        Path(e["file"]).unlink(missing_ok=True)
    log.info("extract: %d samples in %d shards, %d-d features, %.1f img/s", stats["n_samples"], len(shards),
             dim, stats["images_per_second"] or 0)
    return stats


def run_extract(ws: Workspace, params: Params, *, progress: bool = False, shard_batches: int = SHARD_BATCHES) -> dict:
    """Features of every source sample, shard by shard in this process (what `nds stage extract` runs).

    The Prefect `extract` flow runs the same shards as tasks (on Dask when configured); an
    interrupted run resumes from the finished shards.
    """
    plan = plan_extract(ws, params, shard_batches=shard_batches)
    extractor = features.load_extractor(params.extract)
    shards = [extract_shard(ws, params, a, b, progress=progress, extractor=extractor) for a, b in plan]
    return finish_extract(ws, params, shards)


def run_cluster(ws: Workspace, params: Params) -> dict:
    """Assign each source sample to one of K clusters: `assignments.npy (n,) int32`."""
    p = params.cluster
    feats = np.load(_require(ws.stage_dir("extract") / "features.npy", "extract"), mmap_mode="r")
    index = load_index_order(ws)
    datasets, labels = _column(index, "dataset"), _column(index, "label")
    t0 = time.perf_counter()
    try:
        fn = clustering.CLUSTERERS[p.method]
    except KeyError:  # guarded by params validation, kept for direct callers
        raise NDSError(f"unknown cluster.method {p.method!r}; choose one of {sorted(clustering.CLUSTERERS)}") from None
    assignments, centroids, names = fn(np.asarray(feats), datasets, labels, p)
    seconds = time.perf_counter() - t0
    k = len(names)
    sizes = clustering.compute_cluster_sizes(assignments, k)
    mix = []
    for c in range(k):
        ds, counts = np.unique(datasets[assignments == c].astype(str), return_counts=True)
        mix.append({str(d): int(n) for d, n in zip(ds, counts)})
    summary = {
        "method": p.method,
        "k": k,
        "names": names,
        "sizes": sizes.tolist(),
        "dataset_mix": mix,
        "nmi_dataset": round(clustering.compute_nmi(assignments, datasets), 4),
        "seconds": round(seconds, 3),
    }
    with stage_output(ws, "cluster") as out:
        np.save(out / "assignments.npy", assignments.astype(np.int32))
        if centroids is not None:
            np.save(out / "centroids.npy", centroids)
        write_json(out / "clusters.json", summary)
    log.info("cluster: k=%d, sizes %d..%d, NMI(domain)=%.3f", k, sizes.min(), sizes.max(), summary["nmi_dataset"])
    return summary


def plan_experts(ws: Workspace, params: Params) -> list[int]:
    """Expert ids to train (one per non-empty cluster)."""
    summary = read_json(_require(ws.stage_dir("cluster") / "clusters.json", "cluster"))
    empty = [i for i, s in enumerate(summary["sizes"]) if s == 0]
    if empty:
        raise NDSError(f"clusters {empty} are empty; lower cluster.k in params.yaml")
    return list(range(summary["k"]))


def _expert_key(member_ids: list[str], params: Params, k: int) -> str:
    h = hashlib.sha256()
    h.update(params.train_experts.model_dump_json().encode())
    h.update(f"expert={k}".encode())
    for sid in member_ids:
        h.update(sid.encode() + b"\0")
    return h.hexdigest()[:24]


def train_one_expert(ws: Workspace, params: Params, k: int) -> dict:
    """Train (or reuse from the resume cache) the expert of cluster `k`; returns its entry."""
    import torch

    p = params.train_experts
    assignments = load_assignments(ws)
    index = load_index_order(ws)
    members = np.flatnonzero(assignments == k)
    member_ids = [index.column("sample_id")[int(i)].as_py() for i in members]
    key = _expert_key(member_ids, params, k)
    cache = ws.artifacts_dir / EXPERT_CACHE / f"{key}.pt"
    meta_path = cache.with_suffix(".json")
    if cache.exists() and meta_path.exists():
        entry = json.loads(meta_path.read_text())
        if experts.file_sha256(cache) == entry["sha256"]:
            log.info("expert %d: reused from %s", k, cache)
            return {**entry, "cache_file": str(cache), "reused": True}
    uri = index.column("uri").to_pylist()
    images = load_images_at(ws.data_dir, [uri[int(i)] for i in members])
    # Expert tasks run side by side; split the cores between them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // p.workers))
    model, metrics = experts.train_expert(
        images,
        arch=p.arch,
        epochs=p.epochs,
        max_steps=p.max_steps,
        batch_size=p.batch_size,
        lr=p.lr,
        val_fraction=p.val_fraction,
        seed=p.seed * 100_003 + k,
    )
    meta = {"arch": p.arch, "expert": k, "input_size": experts.EXPERT_INPUT_SIZE}
    sha = experts.save_expert(model, cache, meta=meta)
    entry = {"expert": k, "file": f"expert_{k:03d}.pt", "sha256": sha, **metrics}
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
        bundle = experts.write_bundle(
            out,
            index_version=version,
            arch=params.train_experts.arch,
            experts=clean,
            extra={"extractor": extract_info.get("extractor"), "train_params": params.train_experts.model_dump()},
        )
    accs = [e["rotation_accuracy"] for e in entries]
    log.info("experts: %d trained, rotation accuracy %.3f..%.3f, index %s", len(entries), min(accs), max(accs), version)
    return bundle


def run_train_experts(ws: Workspace, params: Params) -> dict:
    """The `dvc repro` path: experts side by side in threads, as the Prefect flow's tasks run."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=params.train_experts.workers) as pool:
        entries = list(pool.map(lambda k: train_one_expert(ws, params, k), plan_experts(ws, params)))
    return finish_experts(ws, params, entries)


def _corpus_md5(ws: Workspace) -> str | None:
    import yaml

    path = ws.root / "data.dvc"
    if not path.exists():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def _git_rev(ws: Workspace) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def run_compute_weights(ws: Workspace, params: Params, *, stage_seconds: dict | None = None) -> dict:
    """w_k(x) = 1/|S_k| per sample, written to Parquet and loaded into the warehouse."""
    index = load_index_order(ws)
    assignments = load_assignments(ws)
    cl = read_json(ws.stage_dir("cluster") / "clusters.json")
    bundle = experts.load_bundle(_require(ws.stage_dir("experts"), "train_experts"))
    k = cl["k"]
    if bundle["k"] != k:
        raise NDSError(f"the expert bundle has {bundle['k']} experts but clustering made {k}; rerun train_experts")
    w = weights.compute_weights(assignments, k, scheme=params.compute_weights.scheme)
    version = bundle["index_version"]
    weight_table = pa.table(
        {
            "sample_id": index.column("sample_id"),
            "dataset": index.column("dataset"),
            "label": index.column("label"),
            "expert": pa.array(assignments, pa.int32()),
            "weight": pa.array(w, pa.float64()),
        }
    )
    corpus = json.loads((ws.data_dir / "corpus.json").read_text()) if (ws.data_dir / "corpus.json").exists() else {}
    datasets = np.asarray(index.column("dataset").to_pylist())
    by_expert = {e["expert"]: e for e in bundle["experts"]}
    cluster_rows = []
    for c in range(k):
        mix = cl["dataset_mix"][c]
        top = max(mix, key=mix.get)
        cluster_rows.append(
            {
                "expert": c,
                "name": cl["names"][c],
                "size": cl["sizes"][c],
                "top_dataset": top,
                "top_dataset_share": mix[top] / cl["sizes"][c],
                "rotation_accuracy": by_expert[c]["rotation_accuracy"],
                "expert_sha256": by_expert[c]["sha256"],
            }
        )
    summary = {
        "index_version": version,
        "n_samples": index.num_rows,
        "n_datasets": int(len(np.unique(datasets))),
        "k": k,
        "nmi_dataset": cl["nmi_dataset"],
        "bundle_sha256": bundle["bundle_sha256"],
        "corpus_profile": corpus.get("profile"),
    }
    with stage_output(ws, "weights") as out:
        pq.write_table(weight_table, out / "weights.parquet")
        # Members grouped by cluster: lets the clustered sampler draw in O(K + B), not O(N).
        selection.save_cluster_layout(selection.build_cluster_layout(assignments, k), out / "layout")
        write_json(out / "weights.json", summary)
    warehouse.load_index_version(
        ws.warehouse_path,
        version_row={
            **summary,
            "params": params.model_dump(),
            "corpus_md5": _corpus_md5(ws),
            "git_rev": _git_rev(ws),
            "stage_seconds": stage_seconds,
        },
        samples=index.select(["sample_id", "dataset", "uri", "label", "split", "sha256"]),
        clusters=pa.Table.from_pylist(cluster_rows),
        weights=weight_table.select(["sample_id", "expert", "weight"]),
    )
    log.info("weights: %d samples, %d experts, index %s loaded into %s", index.num_rows, k, version, ws.warehouse_path)
    return summary


def run_stage(name: str, ws: Workspace | None = None, *, progress: bool = True) -> dict:
    """Entry point of `nds stage NAME` (what dvc.yaml runs)."""
    ws = ws or Workspace.from_env()
    params = load_params(ws.params_path)
    if name == "extract":
        return run_extract(ws, params, progress=progress)
    if name == "cluster":
        return run_cluster(ws, params)
    if name == "train_experts":
        return run_train_experts(ws, params)
    if name == "compute_weights":
        return run_compute_weights(ws, params)
    raise NDSError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
