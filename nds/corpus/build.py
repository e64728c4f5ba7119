"""The source corpus: packaged images -> ``data/`` (image arrays + catalog), and readers for it.

Layout of ``data/`` (other stages rely on it):

- ``images/<dataset>.npy``: ``(n, IMAGE_SIZE, IMAGE_SIZE, 3) uint8``, rows in catalog order.
- ``catalog.parquet``: one row per image, sorted by (dataset, sample_id), columns
  ``CATALOG_COLUMNS``; ``uri`` is ``data/images/<dataset>.npy#<row>`` (relative to the
  workspace root), ``array``/``row`` the same place relative to ``data/``. After
  ``publish_corpus`` (``nds corpus publish s3://bucket/prefix``) ``uri`` is
  ``s3://bucket/prefix/images/<dataset>.npy#<row>`` and ``array`` the object's ``s3://`` URI:
  the images then live in S3 and readers fetch each object once into a local cache
  (``<workspace>/.cache/corpus``, or ``$NDS_CORPUS_CACHE``).
- ``corpus.json``: profile, counts per dataset and split, build seconds, duplicates
  dropped and the packages the images came from.

Profiles pick a subset per dataset and split by ranking samples on a hash of their
``sample_id`` and taking the first *n* usable ones, so the choice is the same on every
machine and ``tiny`` is a subset of ``small`` is a subset of ``full``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nds.config import IMAGE_SIZE, Workspace
from nds.errors import NDSError
from nds.corpus.sources import HOLDOUT, SOURCE, SOURCES, Candidate, rank_key

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("mnist", "fashion", "animals", "glyphs", "clipart", "sprites", "emoji")
SPLITS = (SOURCE, HOLDOUT)

#: dataset -> (max source images, max hold-out images); None takes everything.
PROFILES: dict[str, dict[str, tuple[int | None, int | None]]] = {
    # Enough of every domain for tests; builds in a few seconds.
    "tiny": {name: (250, 50) for name in DATASETS},
    # The demo: >= 20k source images over 7 domains, built in well under a minute on 2 cores.
    "small": {
        "mnist": (4000, 1000),
        "fashion": (4000, 1000),
        "animals": (3000, 500),
        "glyphs": (4000, 1000),
        "clipart": (3000, 500),
        "sprites": (3000, 500),
        "emoji": (1500, 300),
    },
    "full": {name: (None, None) for name in DATASETS},
}

CATALOG_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("uri", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("sha256", pa.string()),
        ("array", pa.string()),
        ("row", pa.int64()),
    ]
)
CATALOG_COLUMNS = tuple(CATALOG_SCHEMA.names)
CATALOG_FILE = "catalog.parquet"
SUMMARY_FILE = "corpus.json"
IMAGES_DIR = "images"

#: Extra candidates decoded beyond what is still missing, so one pass usually fills a
#: profile even when a few candidates turn out unusable.
OVERDRAW = 1.05
#: Candidates decoded per progress-bar step.
LOAD_CHUNK = 500


def _caps(profile: str) -> dict[str, tuple[int | None, int | None]]:
    if profile not in PROFILES:
        raise NDSError(f"unknown corpus profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    return PROFILES[profile]


def rank_candidates(dataset: str, sources_dir: Path) -> dict[str, list[Candidate]]:
    """Every candidate of ``dataset`` per split, in the hash order profiles draw from."""
    if dataset not in SOURCES:
        raise NDSError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    ranked: dict[str, list[Candidate]] = {split: [] for split in SPLITS}
    for candidate in SOURCES[dataset].list_candidates(sources_dir):
        ranked[candidate.split].append(candidate)
    for split in SPLITS:
        ranked[split].sort(key=lambda c: (rank_key(c.sample_id), c.sample_id))
    return ranked


def select_keys(dataset: str, profile: str, *, sources_dir: Path) -> dict[str, list[str]]:
    """Sample ids a profile decodes first, per split, without decoding anything.

    The build keeps these unless one proves unusable at decode time (then it takes the
    next in rank order) or is an exact duplicate.
    """
    caps = dict(zip(SPLITS, _caps(profile)[dataset]))
    ranked = rank_candidates(dataset, sources_dir)
    return {split: [c.sample_id for c in ranked[split][: caps[split]]] for split in SPLITS}


def _take_usable(
    dataset: str, ranked: list[Candidate], cap: int | None, sources_dir: Path, bar
) -> tuple[list[Candidate], list[np.ndarray]]:
    """First ``cap`` candidates in rank order whose image loads; decodes in chunks."""
    want = len(ranked) if cap is None else min(cap, len(ranked))
    kept: list[Candidate] = []
    images: list[np.ndarray] = []
    pos = 0
    while len(kept) < want and pos < len(ranked):
        missing = want - len(kept)
        batch = ranked[pos : pos + min(LOAD_CHUNK, int(missing * OVERDRAW) + 1)]
        pos += len(batch)
        for candidate, image in zip(batch, SOURCES[dataset].load(batch, sources_dir)):
            if image is not None and len(kept) < want:
                kept.append(candidate)
                images.append(image)
        bar.update(min(len(batch), missing))
    if len(kept) < want:
        # Expected when taking everything (cap None); a capped profile falling short is news.
        level = logging.INFO if cap is None else logging.WARNING
        log.log(level, "%s: %d usable of %d candidates decoded", dataset, len(kept), pos)
    return kept, images


def _sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def _load_dataset(dataset: str, caps: tuple[int | None, int | None], sources_dir: Path, progress: bool) -> list[dict]:
    """Chosen samples of one dataset as records with their image and hash."""
    from tqdm.auto import tqdm

    ranked = rank_candidates(dataset, sources_dir)
    total = sum(len(ranked[s]) if cap is None else min(cap, len(ranked[s])) for s, cap in zip(SPLITS, caps))
    records = []
    with tqdm(total=total, desc=f"corpus {dataset}", unit="img", disable=not progress, leave=False) as bar:
        for split, cap in zip(SPLITS, caps):
            kept, images = _take_usable(dataset, ranked[split], cap, sources_dir, bar)
            for candidate, image in zip(kept, images):
                if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or image.dtype != np.uint8:
                    raise NDSError(f"{dataset} reader produced {image.shape} {image.dtype} for {candidate.sample_id}")
                records.append(
                    {"sample_id": candidate.sample_id, "dataset": dataset, "label": candidate.label,
                     "split": split, "sha256": _sha256(image), "image": image}
                )
    return records


def _drop_duplicates(records: list[dict]) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Exact duplicates (same stored bytes), counted per dataset of the dropped copy.

    The source keeps the first copy by (dataset, sample_id). A hold-out image is dropped
    if it also occurs in the source (a target task must never be in the index) or earlier
    in the hold-out.
    """
    records = sorted(records, key=lambda r: (r["dataset"], r["sample_id"]))
    dropped = {d: {"source_duplicates": 0, "holdout_in_source": 0, "holdout_duplicates": 0} for d in DATASETS}
    drop: set[int] = set()
    source_hashes: set[str] = set()
    for i, record in enumerate(records):
        if record["split"] == SOURCE and record["sha256"] in source_hashes:
            dropped[record["dataset"]]["source_duplicates"] += 1
            drop.add(i)
        elif record["split"] == SOURCE:
            source_hashes.add(record["sha256"])
    holdout_hashes: set[str] = set()
    for i, record in enumerate(records):
        if record["split"] != HOLDOUT:
            continue
        if record["sha256"] in source_hashes:
            dropped[record["dataset"]]["holdout_in_source"] += 1
            drop.add(i)
        elif record["sha256"] in holdout_hashes:
            dropped[record["dataset"]]["holdout_duplicates"] += 1
            drop.add(i)
        else:
            holdout_hashes.add(record["sha256"])
    return [r for i, r in enumerate(records) if i not in drop], dropped


def _write(records: list[dict], out_dir: Path) -> pa.Table:
    """Arrays per dataset and the catalog, both in (dataset, sample_id) order."""
    (out_dir / IMAGES_DIR).mkdir(parents=True)
    columns: dict[str, list] = {name: [] for name in CATALOG_COLUMNS}
    for dataset in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == dataset]
        array = f"{IMAGES_DIR}/{dataset}.npy"
        np.save(out_dir / array, np.stack([r["image"] for r in rows]))
        for i, r in enumerate(rows):
            for name in ("sample_id", "dataset", "label", "split", "sha256"):
                columns[name].append(r[name])
            columns["uri"].append(f"data/{array}#{i}")
            columns["array"].append(array)
            columns["row"].append(i)
    table = pa.table(columns, schema=CATALOG_SCHEMA)
    pq.write_table(table, out_dir / CATALOG_FILE)
    return table


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target`` by renames, then delete the old corpus."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def build_corpus(workspace: Workspace, profile: str = "small", *, progress: bool = True) -> dict:
    """Build ``workspace.data_dir`` from the packaged sources for ``profile``; return corpus.json.

    The corpus is built in a sibling temporary folder and swapped in at the end, so a
    failure leaves the previous corpus (if any) as it was.
    """
    caps = _caps(profile)
    sources_dir = workspace.sources_dir
    for dataset in DATASETS:  # fail before any work if a package is missing
        SOURCES[dataset].check(sources_dir)

    started = time.perf_counter()
    data_dir = workspace.data_dir
    tmp = data_dir.with_name(f"{data_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        records, seconds = [], {}
        for dataset in DATASETS:
            t0 = time.perf_counter()
            records.extend(_load_dataset(dataset, caps[dataset], sources_dir, progress))
            seconds[dataset] = round(time.perf_counter() - t0, 2)
            log.info("corpus %s: %d images in %.1fs", dataset, sum(r["dataset"] == dataset for r in records), seconds[dataset])
        records, dropped = _drop_duplicates(records)
        table = _write(records, tmp)
        summary = _summary(profile, table, seconds, dropped, sources_dir, time.perf_counter() - started)
        (tmp / SUMMARY_FILE).write_text(json.dumps(_content_facts(summary), indent=2) + "\n")
        _replace_dir(tmp, data_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("corpus %s: %d images (%s) in %.1fs -> %s", profile, summary["total"],
             ", ".join(f"{k} {v}" for k, v in summary["totals_by_split"].items()), summary["build_seconds"]["total"], data_dir)
    return summary


def _summary(profile: str, table: pa.Table, seconds: dict, dropped: dict, sources_dir: Path, total_s: float) -> dict:
    datasets = table.column("dataset").to_pylist()
    splits = table.column("split").to_pylist()
    counts = {d: {s: 0 for s in SPLITS} for d in DATASETS}
    for d, s in zip(datasets, splits):
        counts[d][s] += 1
    return {
        "profile": profile,
        "image_size": IMAGE_SIZE,
        "counts": counts,
        "totals_by_split": {s: splits.count(s) for s in SPLITS},
        "total": table.num_rows,
        "caps": {d: dict(zip(SPLITS, PROFILES[profile][d])) for d in DATASETS},
        "duplicates_dropped": dropped,
        "build_seconds": {**seconds, "total": round(total_s, 2)},
        "sources": {d: SOURCES[d].describe(sources_dir) for d in DATASETS},
    }


def _content_facts(summary: dict) -> dict:
    """What corpus.json keeps: facts about the content only, so the same packages give the
    same bytes (and the same DVC hash) on any machine. Timings and local paths stay in logs."""
    facts = {k: v for k, v in summary.items() if k != "build_seconds"}
    facts["sources"] = {d: {k: v for k, v in info.items() if k != "path"} for d, info in summary["sources"].items()}
    return facts


# --- readers --------------------------------------------------------------------------------


def load_catalog(data_dir: Path, *, split: str | None = SOURCE) -> pa.Table:
    """The catalog, filtered to ``split`` ("source", "holdout"; None = every row).

    Read, checked and filtered once per catalog file and split (cached, keyed like
    ``_open_array``): stages call this per shard, and a 1e8-row catalog must not be re-read
    and re-checked each time.
    """
    if split not in (*SPLITS, None):
        raise NDSError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)} (or None for all)")
    path = Path(data_dir) / CATALOG_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise NDSError(f"no corpus catalog at {path}; run `nds corpus build --profile small`") from None
    return _read_catalog(str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size, split)


@functools.lru_cache(maxsize=4)
def _read_catalog(path: str, inode: int, mtime_ns: int, size: int, split: str | None) -> pa.Table:
    if split is not None:
        table = _read_catalog(path, inode, mtime_ns, size, None)
        return table.filter(pc.equal(table.column("split"), split))
    table = pq.read_table(path)
    ids = table.column("sample_id")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        # Selections, manifests and the warehouse's primary keys name samples by id alone:
        # refuse here, before hours of indexing end in a constraint error or a doubled sample.
        counts = pc.value_counts(ids)
        dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        raise NDSError(
            f"{path} has {len(dup)} duplicate sample_id(s) (e.g. {dup[0].as_py()!r}); sample ids must be "
            "unique: rebuild the corpus (`nds corpus build`)"
        )
    return table


@functools.lru_cache(maxsize=32)
def _open_array(path: str, inode: int, mtime_ns: int) -> np.ndarray:
    # inode and mtime are part of the key so a rebuilt corpus is never read from a
    # memory map of the replaced file.
    return np.load(path, mmap_mode="r")


CACHE_ENV = "NDS_CORPUS_CACHE"


def corpus_cache_dir(data_dir: Path) -> Path:
    """Where corpus objects that live in S3 are cached (one download per object)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).resolve() if env else Path(data_dir).resolve().parent / ".cache" / "corpus"


def split_uri(uri: str) -> tuple[str, int]:
    """A catalog ``uri`` -> (``array``, row) for ``load_images``.

    ``data/images/mnist.npy#12`` -> ("images/mnist.npy", 12) (relative to the corpus folder);
    ``s3://bucket/prefix/images/mnist.npy#12`` -> ("s3://bucket/prefix/images/mnist.npy", 12).
    """
    path, sep, row = uri.rpartition("#")
    if not sep or not row.isdigit() or not (path.startswith("data/") or path.startswith("s3://")):
        raise NDSError(f"unsupported sample uri {uri!r}: expected data/images/<dataset>.npy#<row> "
                       "or s3://bucket/prefix/images/<dataset>.npy#<row>")
    return (path if path.startswith("s3://") else path.removeprefix("data/")), int(row)


def _cached_object(data_dir: Path, uri: str) -> Path:
    """The local copy of the corpus object ``s3://bucket/key`` (downloaded on first use)."""
    from urllib.parse import urlparse

    from nds.platform import storage
    parsed = urlparse(uri)
    key = parsed.path.lstrip("/")
    path = corpus_cache_dir(data_dir) / parsed.netloc / key
    if ".." in Path(key).parts or not key:
        raise NDSError(f"corpus object {uri!r} has an unsafe key: fix the catalog (`nds corpus publish`)")
    if not path.exists():
        log.info("fetching corpus object %s -> %s", uri, path)
        storage.fetch_object(uri, path)
    return path


def _array(data_dir: Path, array: str) -> np.ndarray:
    path = _cached_object(data_dir, array) if array.startswith("s3://") else Path(data_dir) / array
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise NDSError(f"corpus array {path} is missing; run `nds corpus build --profile small`") from None
    return _open_array(str(path), stat.st_ino, stat.st_mtime_ns)


def load_images(data_dir: Path, arrays: Sequence[str], rows: np.ndarray) -> np.ndarray:
    """Images at (``arrays[i]``, ``rows[i]``), in the given order.

    ``arrays``: paths relative to ``data_dir`` (the catalog's ``array`` column);
    ``rows: (n,) int``. Returns ``(n, IMAGE_SIZE, IMAGE_SIZE, 3) uint8``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    names = np.asarray(arrays, dtype=object)
    if names.shape != rows.shape or rows.ndim != 1:
        raise NDSError(f"arrays and rows must be 1-d and of equal length, got {names.shape} and {rows.shape}")
    out = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for name in dict.fromkeys(names.tolist()):
        where = np.flatnonzero(names == name)
        store = _array(data_dir, name)
        wanted = rows[where]
        if wanted.size and (wanted.min() < 0 or wanted.max() >= len(store)):
            raise NDSError(f"row out of range for {name} ({len(store)} rows)")
        # Sorted reads walk the memory map forwards; then put them back in request order.
        order = np.argsort(wanted, kind="stable")
        out[where[order]] = store[wanted[order]]
    return out


def load_images_at(data_dir: Path, uris: Sequence[str]) -> np.ndarray:
    """Images at catalog ``uris`` (``split_uri`` forms), in the given order."""
    parsed = [split_uri(u) for u in uris]
    return load_images(data_dir, [a for a, _ in parsed], np.asarray([r for _, r in parsed], dtype=np.int64))


def iter_image_batches(data_dir: Path, catalog: pa.Table, batch_size: int) -> Iterator[np.ndarray]:
    """``(<= batch_size, IMAGE_SIZE, IMAGE_SIZE, 3) uint8`` batches in catalog row order."""
    if batch_size < 1:
        raise NDSError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, catalog.num_rows, batch_size):
        part = catalog.slice(start, batch_size)
        yield load_images(data_dir, part.column("array").to_pylist(), np.asarray(part.column("row").to_pylist()))


def publish_corpus(workspace: Workspace, url: str, *, keep_local: bool = True) -> dict:
    """Upload the corpus arrays to ``url`` (``s3://bucket/prefix``) and point the catalog at them.

    Each ``images/<dataset>.npy`` becomes ``<url>/images/<dataset>.npy``; the catalog's ``uri``
    and ``array`` columns are rewritten to those ``s3://`` objects (the new catalog replaces
    the old one by rename, after every upload succeeded). ``keep_local=False`` then deletes
    the local arrays: the images live in S3 only and readers fetch them into the cache.
    Publishing twice to the same place is a no-op.
    """
    from urllib.parse import urlparse

    from nds.platform import storage
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise NDSError(f"corpus store {url!r} must be an S3 location: s3://bucket/prefix")
    data_dir = workspace.data_dir
    catalog = load_catalog(data_dir, split=None)
    arrays = list(dict.fromkeys(catalog.column("array").to_pylist()))
    store = storage.S3Storage(parsed.netloc, parsed.path.strip("/"))
    mapping: dict[str, str] = {}
    for name in arrays:
        if name.startswith("s3://"):
            mapping[name] = name  # already published
            continue
        local = data_dir / name
        if not local.is_file():
            raise NDSError(f"corpus array {local} is missing: rebuild the corpus (`nds corpus build`) before publishing")
        mapping[name] = store.put_file(name, local)
        log.info("published %s -> %s", local, mapping[name])
    uris = [f"{mapping[a]}#{r}" for a, r in zip(catalog.column("array").to_pylist(), catalog.column("row").to_pylist())]
    table = catalog.set_column(catalog.schema.get_field_index("uri"), "uri", pa.array(uris, pa.string()))
    table = table.set_column(table.schema.get_field_index("array"), "array",
                             pa.array([mapping[a] for a in catalog.column("array").to_pylist()], pa.string()))
    tmp = data_dir / f".{CATALOG_FILE}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, data_dir / CATALOG_FILE)
    removed = 0
    if not keep_local:
        for name in arrays:
            if not name.startswith("s3://") and (data_dir / name).exists():
                (data_dir / name).unlink()
                removed += 1
        images_dir = data_dir / IMAGES_DIR
        if images_dir.is_dir() and not any(images_dir.iterdir()):
            images_dir.rmdir()
    return {"objects": sorted(set(mapping.values())), "rows": table.num_rows, "local_removed": removed,
            "store": url.rstrip("/")}
