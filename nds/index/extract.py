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
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nds._io import atomic_file, write_json
from nds.config import IMAGE_SIZE, Workspace
from nds.corpus.objects import split_member, uri_kind
from nds.corpus.read import (
    decode_object,
    image_sha256,
    iter_image_batches,
    load_catalog,
    load_images,
    resolve_uri,
)
from nds.errors import InvalidInputError
from nds.index._artifacts import stage_output
from nds.models.extractors import Extractor, compute_features, load_extractor
from nds.models.device import device_name, is_cpu, pick_device, resolve_precision
from nds.params import RUNTIME_FIELDS, Params

log = logging.getLogger(__name__)

#: Rows of one extraction shard, in batches: shard boundaries fall on batch boundaries, so
#: every batch the extractor sees is the one a single pass would see (bit-identical features).
SHARD_BATCHES = 64
#: Extracted shards, keyed by their samples and settings: an interrupted run resumes from them and a
#: run after ``nds source add`` reuses every unchanged dataset's shards (pruned to the current index).
EXTRACT_CACHE = ".cache/extract"
#: The corpus-format pixels of registered sources' rows (the experts' training images).
PIXELS_FILE = "pixels.npy"
#: Objects one reader process fetches at once (remote sources are latency-bound).
FETCH_THREADS = 8


def plan_extract(ws: Workspace, params: Params, *, shard_batches: int = SHARD_BATCHES) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the source catalog, one per extraction shard.

    Shards never straddle two datasets and fall on batch boundaries counted from their
    dataset's first row, so a dataset's shards (and their cache keys) do not move when another
    source is added or removed: ``nds index`` after ``nds source add`` extracts only the new rows.
    """
    if shard_batches < 1:
        raise InvalidInputError(f"shard_batches must be >= 1, got {shard_batches}")
    catalog = load_catalog(ws.data_dir, split="source")
    if catalog.num_rows == 0:
        raise InvalidInputError(f"the corpus in {ws.data_dir} has no source samples; build it (`nds corpus build`) "
                                "or add a source (`nds source add NAME --from LOCATION`)")
    size = params.extract.batch_size * shard_batches
    bounds = _dataset_bounds(catalog)
    return [(start, min(start + size, stop)) for first, stop in zip(bounds, bounds[1:])
            for start in range(first, stop, size)]


def _shard_key(params: Params, catalog, compute: str | None = None) -> str:
    """What determines a shard's features: the extract params, the device path (``compute``, None
    on the CPU), and the shard's samples by id and content hash -- not its position."""
    what = {"extract": params.extract.model_dump(exclude=RUNTIME_FIELDS), "layout": "per-dataset-v2"}
    if compute:
        what["compute"] = compute
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    for sid, sha in zip(catalog.column("sample_id").to_pylist(), catalog.column("sha256").to_pylist()):
        h.update(f"{sid}\0{sha}\0".encode())
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


class _ObjectBatches:
    """Map-style dataset over a registered source's objects: item i is batch i as a pair
    (images at the extractor's size, images in the corpus format for the experts), both uint8.

    Reader processes fetch, verify (sha256) and decode the originals; nothing but the current
    batches is held in memory. A batch with objects behind a network round trip is fetched
    ``FETCH_THREADS`` objects at a time; local files and tar members (a remote shard is
    downloaded once, then read locally) are decoded in the reader's own thread: there threads
    only contend for the GIL, which doubled a reader's CPU time per image.
    """

    def __init__(self, uris: list[str], sha256s: list[str], image_size: int, batch_size: int):
        self.uris, self.sha256s, self.image_size, self.batch_size = uris, sha256s, image_size, batch_size

    def __len__(self) -> int:
        return -(-len(self.uris) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        sizes = (self.image_size, IMAGE_SIZE)
        work = list(zip(self.uris[s], self.sha256s[s]))
        if any(_latency_bound(uri) for uri, _ in work):
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
                pairs = list(pool.map(lambda us: decode_object(us[0], sizes, sha256=us[1]), work))
        else:
            pairs = [decode_object(uri, sizes, sha256=sha) for uri, sha in work]
        return np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])


def _latency_bound(uri: str) -> bool:
    """True for an object fetched by its own network request (S3, HTTP), not a file or tar member."""
    return split_member(uri) is None and uri_kind(uri) != "file"


def loader_workers(requested: int) -> int:
    """DataLoader processes to use: at most one per CPU this process may run on (more only contend
    with the model for the same cores), none inside a daemonic process (a Dask nanny's worker),
    which may not start processes."""
    if requested and multiprocessing.current_process().daemon:
        log.info("extract: daemonic process (a Dask worker with a nanny?): reading batches in-process; "
                 "start workers with --no-nanny for DataLoader processes")
        return 0
    return min(requested, available_cpus())


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: What every reader process imports: the fork server imports it once, readers start with it.
_READER_PRELOAD = ("numpy", "PIL.Image", "torch", "nds.index.extract")


def _reader_context():
    """Reader processes are forked from a fork server, never from this process.

    A fork copies every lock as it is at that instant. This process runs other threads -- a second
    extraction shard on a Dask or Prefect worker thread starting torch's thread pool, Prefect's log
    and event workers -- and a reader forked while one of them held a lock (glibc's atexit list,
    an import lock) waited on it forever: the Dask extraction test hung CI that way. The fork
    server is a single-threaded process started once, which has imported the readers' modules
    (``_READER_PRELOAD``), so a reader still starts in milliseconds. Where there is no fork server
    (not POSIX), readers are spawned.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(_READER_PRELOAD))  # read when the server starts (once)
        return ctx
    return multiprocessing.get_context("spawn")


class _ReaderInit:
    """A reader's ``worker_init_fn``: the environment of the process that made the loader.

    A reader started by the fork server (or spawned) would otherwise see the environment the
    server started with, not the current one (an S3 endpoint, credentials or cache folder set
    since then).
    """

    def __init__(self):
        self.environ = dict(os.environ)

    def __call__(self, worker_id: int) -> None:
        os.environ.clear()
        os.environ.update(self.environ)


def _loader_options(workers: int, prefetch: int) -> dict:
    """DataLoader keywords for ``workers`` reader processes (none: read in this process)."""
    if not workers:
        return {"num_workers": 0}
    return {"num_workers": workers, "prefetch_factor": prefetch, "multiprocessing_context": _reader_context(),
            "worker_init_fn": _ReaderInit()}


def device_batches(ws: Workspace, catalog, batch_size: int, *, workers: int, pin: bool):
    """The catalog slice's batches through a DataLoader: ``workers`` reader processes, pinned memory."""
    from torch.utils.data import DataLoader

    arrays = catalog.column("array").to_pylist()
    rows = np.asarray(catalog.column("row").to_pylist(), dtype=np.int64)
    _, first = np.unique(np.asarray(arrays, dtype=object), return_index=True)
    load_images(ws.data_dir, [arrays[i] for i in first], rows[first])  # S3 objects: fetched once, here
    workers = loader_workers(workers)
    return DataLoader(_CatalogBatches(ws.data_dir, arrays, rows, batch_size), batch_size=None, shuffle=False,
                      pin_memory=pin, **_loader_options(workers, 4))


def object_batches(catalog, image_size: int, batch_size: int, *, workers: int, pin: bool = False):
    """A registered source's rows through a DataLoader: ``workers`` processes fetch and decode."""
    from torch.utils.data import DataLoader

    workers = loader_workers(workers)
    data = _ObjectBatches(catalog.column("uri").to_pylist(), catalog.column("sha256").to_pylist(), image_size,
                          batch_size)
    return DataLoader(data, batch_size=None, shuffle=False, pin_memory=pin, **_loader_options(workers, 2))


def _keep_pixels(batches, pixels: np.ndarray):
    """Yield the extractor's half of each (extract, corpus-format) pair; store the other in ``pixels``."""
    start = 0
    for images, small in batches:
        images, small = np.asarray(images), np.asarray(small)
        pixels[start:start + len(small)] = small
        start += len(small)
        yield images


def _shard_entry(start: int, stop: int, path: Path, pixels: Path | None, **stats) -> dict:
    return {"start": start, "stop": stop, "file": str(path), "pixels": str(pixels) if pixels else None, **stats}


def extract_shard(ws: Workspace, params: Params, start: int, stop: int, *, progress: bool = False,
                  extractor: Extractor | None = None, device: str | None = None) -> dict:
    """Features of source rows [start, stop) into the shard cache (reused if already there).

    Rows of a registered source are fetched and decoded from their originals at
    ``extract.image_size``; their corpus-format pixels (for the experts) are cached beside the
    features. device: overrides params.yaml ``extract.device`` (like $NDS_DEVICE); ignored when
    ``extractor`` is given.
    """
    source = load_catalog(ws.data_dir, split="source")
    _check_shard(source, start, stop, params.extract.batch_size)
    catalog = source.slice(start, stop - start)
    if extractor is not None:
        dev, precision = (extractor.device, extractor.precision) if extractor.accelerated else (None, "fp32")
    else:
        dev, precision = placement(params, device)
    compute = None if is_cpu(dev) and precision == "fp32" else f"{dev.type}/{precision}"
    key = _shard_key(params, catalog, compute)
    path = ws.artifacts_dir / EXTRACT_CACHE / f"{key}.npy"
    registered = catalog.column("array").null_count == catalog.num_rows
    pixels_path = path.with_suffix(".pixels.npy") if registered else None
    if path.exists() and (pixels_path is None or pixels_path.exists()):
        shape = np.load(path, mmap_mode="r").shape
        if shape[0] == catalog.num_rows:
            log.info("extract shard [%d, %d): reused %s", start, stop, path)
            return _shard_entry(start, stop, path, pixels_path, reused=True, n_samples=shape[0], dim=shape[1],
                                seconds=0.0, model_seconds=0.0)
    extractor = extractor or load_extractor(params.extract).to(dev, precision)
    pin = extractor.accelerated and extractor.device.type == "cuda"
    if registered:
        catalog = with_readable_uris(ws.data_dir, catalog)
        loader = object_batches(catalog, extractor.image_size, params.extract.batch_size,
                                workers=params.extract.loader_workers, pin=pin)
        with atomic_file(pixels_path) as tmp:
            pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                               shape=(catalog.num_rows, IMAGE_SIZE, IMAGE_SIZE, 3))
            stats = compute_features(_keep_pixels(loader, pixels), catalog.num_rows, path, extractor=extractor,
                                     progress=progress)
            pixels.flush()
            del pixels
    else:
        if extractor.accelerated:
            batches = device_batches(ws, catalog, params.extract.batch_size, workers=params.extract.loader_workers,
                                     pin=pin)
        else:
            batches = iter_image_batches(ws.data_dir, catalog, params.extract.batch_size)
        stats = compute_features(batches, catalog.num_rows, path, extractor=extractor, progress=progress)
    return _shard_entry(start, stop, path, pixels_path, reused=False, **stats, extractor=extractor.name,
                        image_size=extractor.image_size, device=device_name(extractor.device),
                        precision=extractor.precision)


def with_readable_uris(data_dir: Path, catalog):
    """``catalog`` with its ``uri`` column as readers open it (`nds.corpus.read.resolve_uri`)."""
    uris = [resolve_uri(data_dir, u) for u in catalog.column("uri").to_pylist()]
    return catalog.set_column(catalog.schema.get_field_index("uri"), "uri", pa.array(uris, pa.string()))


def _dataset_bounds(catalog) -> list[int]:
    """Row offsets where each dataset's block of the (dataset-sorted) catalog starts, and the end."""
    datasets = catalog.column("dataset").to_numpy(zero_copy_only=False)
    return [0, *(np.flatnonzero(datasets[1:] != datasets[:-1]) + 1).tolist(), len(datasets)]


def _check_shard(catalog, start: int, stop: int, batch_size: int) -> None:
    """[start, stop) must lie in one dataset's block and start on a batch boundary of it."""
    bounds = _dataset_bounds(catalog)
    first = max((b for b in bounds[:-1] if b <= start), default=None)
    end = bounds[bounds.index(first) + 1] if first is not None else 0
    if first is None or not start < stop <= end or (start - first) % batch_size:
        raise InvalidInputError(f"shard [{start}, {stop}) does not fit the catalog: plan the shards again (plan_extract)")


def finish_extract(ws: Workspace, params: Params, shards: list[dict]) -> dict:
    """Join the shards into ``features.npy (n, dim) float16`` + ``index.parquet`` (+ ``pixels.npy``,
    the corpus-format pixels of registered sources' rows, at ``index.parquet``'s ``pixel_row``).

    ``index.parquet``'s ``pixel_sha256`` is `nds.corpus.read.image_sha256` of each row's
    corpus-format pixels: what a client's ``--emit-hashes`` sends for the same image, so the
    contamination guard finds it whatever the original's format or size.

    The shard cache keeps exactly the shards of this index (older ones are pruned), so the next
    run after a source is added extracts only that source.
    """
    catalog = load_catalog(ws.data_dir, split="source")
    shards = sorted(shards, key=lambda e: e["start"])
    covered = [(e["start"], e["stop"]) for e in shards]
    if not shards or covered[0][0] != 0 or covered[-1][1] != catalog.num_rows or \
            any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise InvalidInputError(f"extraction shards {covered[:3]}... do not cover the {catalog.num_rows} source rows: "
                                "rerun extract")
    t0 = time.perf_counter()
    dim = int(shards[0]["dim"])
    pixel_row = np.full(catalog.num_rows, -1, dtype=np.int64)
    n_pixels = 0
    for e in shards:
        if e.get("pixels"):
            pixel_row[e["start"]:e["stop"]] = np.arange(n_pixels, n_pixels + e["stop"] - e["start"])
            n_pixels += e["stop"] - e["start"]
    with stage_output(ws, "extract") as out:
        feats = np.lib.format.open_memmap(out / "features.npy", mode="w+", dtype=np.float16,
                                          shape=(catalog.num_rows, dim))
        for e in shards:  # one shard in memory at a time
            feats[e["start"]:e["stop"]] = np.load(e["file"], mmap_mode="r")
        feats.flush()
        del feats
        # Rows read from arrays (a corpus built before packaged datasets were sources) are hashed
        # as pixels already; the others get the hash of their corpus-format pixels here.
        pixel_sha256 = catalog.column("sha256").to_pylist()
        if n_pixels:
            pixels = np.lib.format.open_memmap(out / PIXELS_FILE, mode="w+", dtype=np.uint8,
                                               shape=(n_pixels, IMAGE_SIZE, IMAGE_SIZE, 3))
            for e in shards:
                if e.get("pixels"):
                    part = np.load(e["pixels"], mmap_mode="r")
                    pixels[pixel_row[e["start"]]:pixel_row[e["start"]] + e["stop"] - e["start"]] = part
                    pixel_sha256[e["start"]:e["stop"]] = [image_sha256(im) for im in part]
            pixels.flush()
            del pixels
        index = catalog.select(["sample_id", "dataset", "label", "uri", "split", "sha256"])
        index = index.append_column("pixel_row", pa.array(pixel_row))
        pq.write_table(index.append_column("pixel_sha256", pa.array(pixel_sha256, pa.string())), out / "index.parquet")
        computed = [e for e in shards if not e["reused"]]
        model_s = sum(e["model_seconds"] for e in shards)
        wall = sum(e["seconds"] for e in shards) + (time.perf_counter() - t0)
        stats = {
            "n_samples": catalog.num_rows,
            "dim": dim,
            "shards": len(shards),
            "shards_reused": len(shards) - len(computed),
            "samples_extracted": sum(e["n_samples"] for e in computed),
            "seconds": round(wall, 3),
            "model_seconds": round(model_s, 3),
            "images_per_second": round(sum(e["n_samples"] for e in computed) / wall, 1) if computed and wall > 0 else None,
            "extractor": params.extract.extractor,
            "image_size": params.extract.image_size,
            "device": ", ".join(sorted({e["device"] for e in computed if "device" in e})) or None,
        }
        write_json(out / "extract.json", stats)
    _prune_cache(ws, shards)
    log.info("extract: %d samples in %d shards (%d reused), %d-d features, %.1f img/s", stats["n_samples"],
             len(shards), stats["shards_reused"], dim, stats["images_per_second"] or 0)
    return stats


def _prune_cache(ws: Workspace, shards: list[dict]) -> None:
    """Delete cached shards this index does not use (a removed source's, an older setting's)."""
    keep = {Path(e[f]).name for e in shards for f in ("file", "pixels") if e.get(f)}
    for path in (ws.artifacts_dir / EXTRACT_CACHE).glob("*.npy"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


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
