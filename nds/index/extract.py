"""Stage `extract`: features of every source sample, in shards, into `artifacts/extract`.

Shards are batch-aligned row ranges of the source catalog; each lands in a resume cache, so
an interrupted run computes only the missing shards, and the joined features are the ones a
single pass would give (bit-identical).

Where the extractor runs is ``extract.device`` (``NDS_DEVICE``, ``--device``; nds.models.device).
On the CPU the batches are read in this process, exactly as before devices existed. On a GPU (or
at an explicit reduced precision) they are read by DataLoader reader processes, into pinned
memory while the GPU works, and the model runs under autocast (``extract.precision``), on a GPU
in channels-last layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from nds._io import write_json
from nds.config import Workspace
from nds.corpus.read import iter_image_batches, load_catalog, load_images
from nds.errors import InvalidInputError
from nds.index._artifacts import stage_output
from nds.models.extractors import Extractor, compute_features, load_extractor
from nds.models.device import device_name, is_cpu, pick_device, resolve_precision
from nds.params import RUNTIME_FIELDS, Params

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


def _shard_key(params: Params, sample_ids: list[str], start: int, compute: str | None = None) -> str:
    """What determines a shard's features; ``compute`` names a non-CPU path (device/precision)."""
    what = {"extract": params.extract.model_dump(exclude=RUNTIME_FIELDS), "start": start}
    if compute:  # the CPU path keeps the keys it had before devices existed
        what["compute"] = compute
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    for sid in sample_ids:
        h.update(sid.encode() + b"\0")
    return h.hexdigest()[:24]


def placement(params: Params, device: str | None = None):
    """(torch.device, precision) extraction runs at: ``device`` or $NDS_DEVICE or ``extract.device``."""
    dev = pick_device(device, params.extract.device, where="params.yaml extract.device")
    return dev, resolve_precision(params.extract.precision, dev)


def load_placed_extractor(params: Params, device: str | None = None) -> Extractor:
    """The extractor params.yaml names, on the device the setting resolves to (CPU: as loaded)."""
    dev, precision = placement(params, device)
    return load_extractor(params.extract).to(dev, precision)


class _CatalogBatches:
    """Map-style dataset for torch's DataLoader: item i is batch i of a catalog slice, uint8 (n, H, W, 3).

    A plain class (no torch import here); DataLoader workers read the corpus arrays themselves.
    """

    def __init__(self, data_dir: Path, arrays: list[str], rows: np.ndarray, batch_size: int):
        self.data_dir, self.arrays, self.rows, self.batch_size = data_dir, arrays, rows, batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, i: int) -> np.ndarray:
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return load_images(self.data_dir, self.arrays[s], self.rows[s])


def loader_workers(requested: int) -> int:
    """DataLoader processes to use: none inside a daemonic process (a Dask nanny's worker), which may not fork."""
    if requested and multiprocessing.current_process().daemon:
        log.info("extract: daemonic process (a Dask worker with a nanny?): reading batches in-process; "
                 "start workers with --no-nanny for DataLoader processes")
        return 0
    return requested


def _reader_context():
    """Reader processes are forks of this process (fast to start, nothing to re-import); where
    fork does not exist, spawned."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _reader_init(worker_id: int) -> None:
    """In a forked reader: drop the exit hooks inherited from this process's threads.

    Prefect's log and event workers register hooks that drain their (parent-side) threads at
    interpreter exit; run in a fork, where those threads do not exist, they made readers exit
    with status 1 once a flow had run. A reader only reads the corpus: it has nothing to drain.
    """
    import threading

    hooks = getattr(threading, "_threading_atexits", None)
    if isinstance(hooks, list):
        hooks.clear()


def device_batches(ws: Workspace, catalog, batch_size: int, *, workers: int, pin: bool):
    """The catalog slice's batches through a DataLoader: ``workers`` reader processes, pinned memory."""
    from torch.utils.data import DataLoader

    arrays = catalog.column("array").to_pylist()
    rows = np.asarray(catalog.column("row").to_pylist(), dtype=np.int64)
    _, first = np.unique(np.asarray(arrays, dtype=object), return_index=True)
    load_images(ws.data_dir, [arrays[i] for i in first], rows[first])  # S3 objects: fetched once, here
    workers = loader_workers(workers)
    return DataLoader(_CatalogBatches(ws.data_dir, arrays, rows, batch_size), batch_size=None, shuffle=False,
                      num_workers=workers, pin_memory=pin, prefetch_factor=4 if workers else None,
                      multiprocessing_context=_reader_context() if workers else None,
                      worker_init_fn=_reader_init if workers else None)


def extract_shard(ws: Workspace, params: Params, start: int, stop: int, *, progress: bool = False,
                  extractor: Extractor | None = None, device: str | None = None) -> dict:
    """Features of source rows [start, stop) into the shard cache (reused if already there).

    device: overrides params.yaml ``extract.device`` (like $NDS_DEVICE); ignored when ``extractor`` is given.
    """
    catalog = load_catalog(ws.data_dir, split="source").slice(start, stop - start)
    if catalog.num_rows != stop - start or start % params.extract.batch_size:
        raise InvalidInputError(f"shard [{start}, {stop}) does not fit the catalog: plan the shards again (plan_extract)")
    if extractor is not None:
        dev, precision = (extractor.device, extractor.precision) if extractor.accelerated else (None, "fp32")
    else:
        dev, precision = placement(params, device)
    compute = None if is_cpu(dev) and precision == "fp32" else f"{dev.type}/{precision}"
    key = _shard_key(params, catalog.column("sample_id").to_pylist(), start, compute)
    path = ws.artifacts_dir / EXTRACT_CACHE / f"{key}.npy"
    if path.exists():
        shape = np.load(path, mmap_mode="r").shape
        if shape[0] == catalog.num_rows:
            log.info("extract shard [%d, %d): reused %s", start, stop, path)
            return {"start": start, "stop": stop, "file": str(path), "reused": True, "n_samples": shape[0],
                    "dim": shape[1], "seconds": 0.0, "model_seconds": 0.0}
    extractor = extractor or load_extractor(params.extract).to(dev, precision)
    if extractor.accelerated:
        batches = device_batches(ws, catalog, params.extract.batch_size, workers=params.extract.loader_workers,
                                 pin=extractor.device.type == "cuda")
    else:
        batches = iter_image_batches(ws.data_dir, catalog, params.extract.batch_size)
    stats = compute_features(batches, catalog.num_rows, path, extractor=extractor, progress=progress)
    return {"start": start, "stop": stop, "file": str(path), "reused": False, **stats,
            "extractor": extractor.name, "image_size": extractor.image_size,
            "device": device_name(extractor.device), "precision": extractor.precision}


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
            "device": ", ".join(sorted({e["device"] for e in computed if "device" in e})) or None,
        }
        write_json(out / "extract.json", stats)
    for e in shards:
        Path(e["file"]).unlink(missing_ok=True)
    log.info("extract: %d samples in %d shards, %d-d features, %.1f img/s", stats["n_samples"], len(shards),
             dim, stats["images_per_second"] or 0)
    return stats


def run_extract(ws: Workspace, params: Params, *, progress: bool = False, shard_batches: int = SHARD_BATCHES,
                device: str | None = None) -> dict:
    """Features of every source sample, shard by shard in this process (what `nds stage extract` runs).

    The Prefect `extract` flow runs the same shards as tasks (on Dask when configured); an
    interrupted run resumes from the finished shards. device: overrides ``extract.device``.
    """
    plan = plan_extract(ws, params, shard_batches=shard_batches)
    extractor = load_placed_extractor(params, device)
    shards = [extract_shard(ws, params, a, b, progress=progress, extractor=extractor) for a, b in plan]
    return finish_extract(ws, params, shards)
