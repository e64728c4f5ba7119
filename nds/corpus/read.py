"""Readers of a built corpus (``data/``): the catalog, images by (array, row) or by uri, the
S3 object cache, and the image content hash corpus and client share.

Layout of ``data/`` (other stages rely on it):

- ``sources/<name>/catalog.parquet`` (+ ``source.json``): a registered source
  (``nds source add``, or a packaged demo dataset registered by ``nds corpus build``;
  nds.corpus.registry): one row per original object, ``uri`` its link (path, ``s3://``,
  ``http(s)://``, ``<shard>#<member>``), ``sha256`` of its bytes, ``split`` source or holdout.
  No pixels are stored: readers fetch and decode the original (``load_images_at``); the index
  keeps corpus-format pixels as an extract-stage artifact.
- ``packaged/<dataset>/<dataset>-NNNNN.tar``: the packaged datasets' images as WebDataset
  shards (written by ``nds corpus build``); their catalog uris are relative to the workspace
  root (``data/packaged/...``, `resolve_uri`) so the corpus bytes are the same on every machine.
  After ``nds corpus publish s3://bucket/prefix`` the shards live in S3 and the uris name them.
- ``corpus.json``: profile, counts per dataset and split, duplicates dropped and the
  packages the images came from.
- Corpora built before packaged datasets were sources: ``images/<dataset>.npy``
  (``(n, IMAGE_SIZE, IMAGE_SIZE, 3) uint8``) and ``catalog.parquet`` with ``uri``
  ``data/images/<dataset>.npy#<row>`` (or its published ``s3://`` array) and ``array``/``row``;
  still read (``load_images``; S3 arrays cached once under ``<workspace>/.cache/corpus`` or
  ``$NDS_CORPUS_CACHE``).

``load_catalog`` returns the array catalog (if any) and every registered source's rows as one
table (sorted by dataset, sample_id); registered rows have no ``array`` (null) and ``row`` -1.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nds.config import IMAGE_SIZE
from nds.corpus.sources import HOLDOUT, SOURCE
from nds.errors import InvalidInputError, NotFoundError

log = logging.getLogger(__name__)

SPLITS = (SOURCE, HOLDOUT)

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
#: The packaged demo datasets' WebDataset shards (written by `nds corpus build`).
PACKAGED_DIR = "packaged"
#: Registered outside sources, one folder each (written by nds.corpus.registry).
REGISTERED_DIR = "sources"

CACHE_ENV = "NDS_CORPUS_CACHE"


def image_sha256(image: np.ndarray) -> str:
    """Content hash of one image as stored (uint8 bytes, C order): the catalog's ``sha256``."""
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def load_catalog(data_dir: Path, *, split: str | None = SOURCE) -> pa.Table:
    """The catalog, filtered to ``split`` ("source", "holdout"; None = every row).

    Read, checked and filtered once per catalog file and split (cached, keyed like
    ``_open_array``): stages call this per shard, and a 1e8-row catalog must not be re-read
    and re-checked each time.
    """
    if split not in (*SPLITS, None):
        raise InvalidInputError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)} (or None for all)")
    files = _catalog_files(Path(data_dir))
    if not files:
        raise NotFoundError(f"no corpus catalog at {Path(data_dir) / CATALOG_FILE}; run `nds corpus build "
                            "--profile small` or register a source (`nds source add NAME --from LOCATION`)")
    return _read_catalog(files, split)


def _catalog_files(data_dir: Path) -> tuple[tuple[str, int, int, int, bool], ...]:
    """(path, inode, mtime, size, registered) of the packaged catalog and each registered source's catalog."""
    # Hidden folders are a registration or removal under way (nds._io.atomic_dir): never read.
    registered = [p for p in sorted((data_dir / REGISTERED_DIR).glob(f"*/{CATALOG_FILE}"))
                  if not p.parent.name.startswith(".")]
    paths = [data_dir / CATALOG_FILE, *registered]
    found = []
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        found.append((str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size, path.parent != data_dir))
    return tuple(found)


def _registered_rows(path: str) -> pa.Table:
    """A registered source's catalog in the packaged catalog's columns (no array; row -1)."""
    table = pq.read_table(path)
    n = table.num_rows
    columns = {name: table.column(name).cast(CATALOG_SCHEMA.field(name).type)
               for name in CATALOG_COLUMNS if name not in ("array", "row")}
    columns["array"] = pa.nulls(n, pa.string())
    columns["row"] = pa.array(np.full(n, -1, dtype=np.int64))
    return pa.table({name: columns[name] for name in CATALOG_COLUMNS}, schema=CATALOG_SCHEMA)


@functools.lru_cache(maxsize=4)
def _read_catalog(files: tuple[tuple[str, int, int, int, bool], ...], split: str | None) -> pa.Table:
    # The key holds every file's inode/mtime/size, so a rebuilt corpus or a new source is re-read.
    if split is not None:
        table = _read_catalog(files, None)
        return table.filter(pc.equal(table.column("split"), split))
    parts = [_registered_rows(p) if registered else pq.read_table(p) for p, *_, registered in files]
    table = parts[0] if len(parts) == 1 else pa.concat_tables(parts).sort_by([("dataset", "ascending"),
                                                                              ("sample_id", "ascending")])
    ids = table.column("sample_id")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        # Selections, manifests and the warehouse's primary keys name samples by id alone:
        # refuse here, before hours of indexing end in a constraint error or a doubled sample.
        counts = pc.value_counts(ids)
        dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        where = [p for (p, *_), part in zip(files, parts) if pc.any(pc.is_in(part.column("sample_id"),
                                                                             value_set=dup)).as_py()]
        raise InvalidInputError(
            f"{' and '.join(where)} hold {len(dup)} duplicate sample_id(s) (e.g. {dup[0].as_py()!r}); sample ids "
            "must be unique: rebuild the corpus (`nds corpus build`), or register the source again "
            "(`nds source add NAME --from LOCATION --replace`)"
        )
    return table


@functools.lru_cache(maxsize=32)
def _open_array(path: str, inode: int, mtime_ns: int) -> np.ndarray:
    # inode and mtime are part of the key so a rebuilt corpus is never read from a
    # memory map of the replaced file.
    return np.load(path, mmap_mode="r")


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
        raise InvalidInputError(f"unsupported sample uri {uri!r}: expected data/images/<dataset>.npy#<row> "
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
        raise InvalidInputError(f"corpus object {uri!r} has an unsafe key: fix the catalog (`nds corpus publish`)")
    if not path.exists():
        log.info("fetching corpus object %s -> %s", uri, path)
        storage.fetch_object(uri, path)
    return path


def _array(data_dir: Path, array: str) -> np.ndarray:
    path = _cached_object(data_dir, array) if array.startswith("s3://") else Path(data_dir) / array
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise NotFoundError(f"corpus array {path} is missing; run `nds corpus build --profile small`") from None
    return _open_array(str(path), stat.st_ino, stat.st_mtime_ns)


def load_images(data_dir: Path, arrays: Sequence[str], rows: np.ndarray) -> np.ndarray:
    """Images at (``arrays[i]``, ``rows[i]``), in the given order.

    ``arrays``: paths relative to ``data_dir`` (the catalog's ``array`` column);
    ``rows: (n,) int``. Returns ``(n, IMAGE_SIZE, IMAGE_SIZE, 3) uint8``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    names = np.asarray(arrays, dtype=object)
    if names.shape != rows.shape or rows.ndim != 1:
        raise InvalidInputError(f"arrays and rows must be 1-d and of equal length, got {names.shape} and {rows.shape}")
    out = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for name in dict.fromkeys(names.tolist()):
        where = np.flatnonzero(names == name)
        store = _array(data_dir, name)
        wanted = rows[where]
        if wanted.size and (wanted.min() < 0 or wanted.max() >= len(store)):
            raise InvalidInputError(f"row out of range for {name} ({len(store)} rows)")
        # Sorted reads walk the memory map forwards; then put them back in request order.
        order = np.argsort(wanted, kind="stable")
        out[where[order]] = store[wanted[order]]
    return out


def resolve_uri(data_dir: Path, uri: str) -> str:
    """A catalog ``uri`` as a reader can open it: a relative path (the packaged shards'
    ``data/packaged/...``) is taken from the workspace root (the parent of ``data_dir``)."""
    if "://" in uri or uri.startswith("/"):
        return uri
    return str(Path(data_dir).absolute().parent / uri)


def is_packaged_uri(uri: str) -> bool:
    """True for a packaged corpus image (``data/images/<d>.npy#<row>`` or its published S3 array)."""
    path, sep, row = uri.rpartition("#")
    return bool(sep) and row.isdigit() and path.endswith(".npy") and (path.startswith("data/") or path.startswith("s3://"))


def load_images_at(data_dir: Path, uris: Sequence[str], *, workers: int = 8) -> np.ndarray:
    """Images at catalog ``uris``, in the given order, in the corpus format (IMAGE_SIZE px RGB uint8).

    Packaged images are read from their arrays; a registered source's objects are fetched and
    decoded (``workers`` at a time) -- the index keeps those pixels as an extract artifact, so
    its stages use ``nds.index._artifacts.load_index_images`` instead.
    """
    out = np.empty((len(uris), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    packaged = [i for i, u in enumerate(uris) if is_packaged_uri(u)]
    if packaged:
        parsed = [split_uri(uris[i]) for i in packaged]
        out[packaged] = load_images(data_dir, [a for a, _ in parsed], np.asarray([r for _, r in parsed], dtype=np.int64))
    others = [i for i, u in enumerate(uris) if not is_packaged_uri(u)]
    if others:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, image in zip(others, pool.map(lambda i: decode_object(resolve_uri(data_dir, uris[i]),
                                                                         (IMAGE_SIZE,))[0], others)):
                out[i] = image
    return out


def decode_object(uri: str, sizes: Sequence[int], *, sha256: str | None = None) -> list[np.ndarray]:
    """A registered source's object as ``(s, s, 3) uint8`` arrays, one per size in ``sizes``.

    ``sha256``: the catalog's hash of the bytes; a different object now is a StorageError
    (the source changed since registration: ``nds source check``, then re-register).
    """
    from nds.corpus.decode import decode_image, to_array
    from nds.corpus.objects import fetch_bytes
    from nds.errors import StorageError

    data = fetch_bytes(uri)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StorageError(f"{uri} changed since it was registered (sha256 differs); run `nds source check` "
                           "and re-register the source with `nds source add NAME --from LOCATION --replace`")
    image = decode_image(data)
    return [to_array(image, size) for size in sizes]


def iter_image_batches(data_dir: Path, catalog: pa.Table, batch_size: int) -> Iterator[np.ndarray]:
    """``(<= batch_size, IMAGE_SIZE, IMAGE_SIZE, 3) uint8`` batches in catalog row order."""
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, catalog.num_rows, batch_size):
        part = catalog.slice(start, batch_size)
        yield load_images(data_dir, part.column("array").to_pylist(), np.asarray(part.column("row").to_pylist()))
