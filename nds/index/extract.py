"""Stage `extract`: features of every source sample, in shards, into `artifacts/extract`.

Shards are batch-aligned row ranges of the source catalog; each lands in a resume cache, so
an interrupted run computes only the missing shards, and the joined features are the ones a
single pass would give (bit-identical).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from nds._io import write_json
from nds.config import Workspace
from nds.corpus.read import iter_image_batches, load_catalog
from nds.errors import InvalidInputError
from nds.index._artifacts import stage_output
from nds.models.extractors import Extractor, compute_features, load_extractor
from nds.params import Params

log = logging.getLogger(__name__)

#: Rows of one extraction shard, in batches: shard boundaries fall on batch boundaries, so
#: every batch the extractor sees is the one a single pass would see (bit-identical features).
SHARD_BATCHES = 64
#: Finished shards of an interrupted extraction (deleted once the stage output is written).
EXTRACT_CACHE = ".cache/extract"


def plan_extract(ws: Workspace, params: Params, *, shard_batches: int = SHARD_BATCHES) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the source catalog, one per extraction shard."""
    if shard_batches < 1:
        raise InvalidInputError(f"shard_batches must be >= 1, got {shard_batches}")
    n = load_catalog(ws.data_dir, split="source").num_rows
    if n == 0:
        raise InvalidInputError(f"{ws.catalog_path} has no source samples; rebuild the corpus")
    size = params.extract.batch_size * shard_batches
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _shard_key(params: Params, sample_ids: list[str], start: int) -> str:
    h = hashlib.sha256(json.dumps({"extract": params.extract.model_dump(), "start": start}, sort_keys=True).encode())
    for sid in sample_ids:
        h.update(sid.encode() + b"\0")
    return h.hexdigest()[:24]


def extract_shard(ws: Workspace, params: Params, start: int, stop: int, *, progress: bool = False,
                  extractor: Extractor | None = None) -> dict:
    """Features of source rows [start, stop) into the shard cache (reused if already there)."""
    catalog = load_catalog(ws.data_dir, split="source").slice(start, stop - start)
    if catalog.num_rows != stop - start or start % params.extract.batch_size:
        raise InvalidInputError(f"shard [{start}, {stop}) does not fit the catalog: plan the shards again (plan_extract)")
    path = ws.artifacts_dir / EXTRACT_CACHE / f"{_shard_key(params, catalog.column('sample_id').to_pylist(), start)}.npy"
    if path.exists():
        shape = np.load(path, mmap_mode="r").shape
        if shape[0] == catalog.num_rows:
            log.info("extract shard [%d, %d): reused %s", start, stop, path)
            return {"start": start, "stop": stop, "file": str(path), "reused": True, "n_samples": shape[0],
                    "dim": shape[1], "seconds": 0.0, "model_seconds": 0.0}
    extractor = extractor or load_extractor(params.extract)
    batches = iter_image_batches(ws.data_dir, catalog, params.extract.batch_size)
    stats = compute_features(batches, catalog.num_rows, path, extractor=extractor, progress=progress)
    return {"start": start, "stop": stop, "file": str(path), "reused": False, **stats,
            "extractor": extractor.name, "image_size": extractor.image_size}


def finish_extract(ws: Workspace, params: Params, shards: list[dict]) -> dict:
    """Join the shards into `features.npy (n, dim) float16` + `index.parquet`; clear the shard cache."""
    catalog = load_catalog(ws.data_dir, split="source")
    shards = sorted(shards, key=lambda e: e["start"])
    covered = [(e["start"], e["stop"]) for e in shards]
    if not shards or covered[0][0] != 0 or covered[-1][1] != catalog.num_rows or \
            any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise InvalidInputError(f"extraction shards {covered[:3]}... do not cover the {catalog.num_rows} source rows: "
                                "rerun extract")
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
    extractor = load_extractor(params.extract)
    shards = [extract_shard(ws, params, a, b, progress=progress, extractor=extractor) for a, b in plan]
    return finish_extract(ws, params, shards)
