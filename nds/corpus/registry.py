"""Registered sources: outside image collections indexed where they live (`nds source add|list|remove|check`).

A source NAME is ``data/sources/NAME/`` (inside ``data/``, so ``data.dvc`` versions it with the
packaged corpus):

- ``catalog.parquet``: one row per image, columns ``CATALOG_SCHEMA``, sorted by ``sample_id``
  (``NAME/<key>``, keys in ``nds.corpus.locations``). ``uri`` names the original object (never
  a copy), ``sha256`` is of its bytes, ``version`` what identifies the object's version (S3/HTTP
  ETag, ``size-mtime_ns`` for files, the shard's for a WebDataset member);
- ``source.json``: name, location, kind, label_from, counts (registered and skipped per reason),
  a few skipped uris per reason, the catalog's sha256 and when it was registered.

Registration lists the location, then fetches, hashes and decodes every object (a thread pool,
bounded in flight), drops exact duplicates (within the source: the first by key stays; against
other registered sources: the new copy goes), writes the folder in a temporary sibling and swaps
it in (``nds._io.atomic_dir``): a failed or interrupted add leaves ``data/`` as it was. In a DVC
workspace ``data`` is then re-tracked, so git + ``dvc push`` version the catalog; the objects
themselves are never copied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nds._io import atomic_dir, file_sha256, write_json
from nds.config import Workspace
from nds.corpus.decode import MAX_PIXELS, UnusableImageError, decode_image
from nds.corpus.locations import Entry, Listing, normalize, resolve
from nds.corpus.read import CATALOG_FILE, SPLITS, resolve_uri
from nds.corpus.read import REGISTERED_DIR as SOURCES_DIR
from nds.errors import InvalidInputError, NDSError, NotFoundError

log = logging.getLogger(__name__)

INFO_FILE = "source.json"
SPLIT = "source"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
#: Why an object is not registered. missing: 404 / no such key (the link is gone); denied: 403 / a
#: permission error (fix the credentials); unreachable: no answer after the retries, or an empty url.
SKIP_REASONS = ("corrupt", "not_image", "too_large", "missing", "denied", "unreachable", "duplicate_within",
                "duplicate_of_other_source")
#: Skipped uris kept per reason in source.json (the counts hold the rest).
EXAMPLES = 5
#: Objects in flight: network reads wait on the far end, so more threads than cores pay off;
#: local files are decoded as fast as they are read, so a few threads are enough.
REMOTE_WORKERS = 16
LOCAL_WORKERS = 4
#: Objects submitted ahead of the slowest one, per worker (bounds memory on a long listing).
IN_FLIGHT_PER_WORKER = 4

CATALOG_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("dataset", pa.string()), ("uri", pa.string()), ("label", pa.string()),
    ("split", pa.string()), ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("version", pa.string()), ("bytes", pa.int64()), ("caption", pa.string()),
])


def sources_root(data_dir: Path) -> Path:
    return Path(data_dir) / SOURCES_DIR


def _source_dirs(data_dir: Path) -> list[Path]:
    root = sources_root(data_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / INFO_FILE).exists())


def _read_info(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def load_registered(data_dir: Path) -> pa.Table | None:
    """Every registered catalog, concatenated and sorted by (dataset, sample_id); None if none."""
    tables = [pq.read_table(d / CATALOG_FILE).select(CATALOG_SCHEMA.names).cast(CATALOG_SCHEMA)
              for d in _source_dirs(data_dir)]
    if not tables:
        return None
    return pa.concat_tables(tables).sort_by([("dataset", "ascending"), ("sample_id", "ascending")])


def list_sources(data_dir: Path) -> list[dict]:
    """The source.json of every registered source, by name."""
    return [_read_info(d / INFO_FILE) for d in _source_dirs(data_dir)]


def check_name(ws: Workspace, name: str, *, replace: bool = False) -> str:
    """`name` if it can be registered: the pattern, not a packaged dataset, not taken (unless replace)."""
    from nds._registry import SOURCES

    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidInputError(f"source name {name!r} must match {NAME_PATTERN.pattern} (lower-case letters, "
                                "digits, '-' and '_'; no path characters), e.g. 'my-photos'")
    if name in SOURCES:
        raise InvalidInputError(f"source name {name!r} is a packaged dataset ({', '.join(SOURCES.names())}); "
                                "pick another name")
    info = sources_root(ws.data_dir) / name / INFO_FILE
    if info.exists() and not replace:
        raise InvalidInputError(f"a source named {name!r} is already registered (from "
                                f"{_read_info(info).get('location')}); pick another name, or add --replace")
    return name


def add_source(ws: Workspace, name: str, location: str, *, label_from: str | None = None, replace: bool = False,
               progress: bool = True, workers: int | None = None, max_pixels: int = MAX_PIXELS,
               track: bool = True) -> dict:
    """Register the images at `location` as source `name`; return its source.json (+ `seconds`, `dvc_md5`).

    label_from: dirs | column | none (None: wherever the kind of location has labels).
    Every object is fetched, hashed and decoded; the unusable ones are counted per reason in
    ``counts``. No usable image at all is an error, and nothing is written.
    """
    check_name(ws, name, replace=replace)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidInputError(f"workers must be a positive integer, got {workers!r}")
    started = time.perf_counter()
    location = normalize(location)
    listing = resolve(location, label_from)
    info = register_listing(ws.data_dir, name, location, listing, workers=workers, max_pixels=max_pixels,
                            progress=progress)
    return {**info, "seconds": round(time.perf_counter() - started, 2), "dvc_md5": _track(ws, track, f"add {name}")}


def register_listing(data_dir: Path, name: str, location: str, listing: Listing, *, workers: int | None = None,
                     max_pixels: int = MAX_PIXELS, progress: bool = True,
                     relative_to: tuple[Path, str] | None = None, stamp: bool = True) -> dict:
    """Inspect every entry of `listing`, drop duplicates, write ``data_dir/sources/NAME`` atomically.

    The one registration path: `add_source` (any location) and the corpus build (the packaged demo
    datasets, written as WebDataset shards first) both end here.

    relative_to: (folder, name): uris and the location under that folder are stored relative to the
    workspace, the folder called ``name`` (the packaged shards are built in a temporary sibling of
    ``data/`` and must give the same catalog bytes on every machine);
    stamp: record ``registered_at`` (off for the packaged build, whose bytes depend on content only).
    """
    started = time.perf_counter()
    rows, skipped = _inspect_all(name, listing, workers, max_pixels, progress)
    rows = _drop_duplicates(rows, skipped, _other_hashes(data_dir, name))
    if relative_to is not None:
        prefix, stored = str(Path(relative_to[0]).absolute()), relative_to[1]
        for row in rows:
            if row["uri"].startswith(prefix + "/"):
                row["uri"] = stored + row["uri"][len(prefix):]
        location = location.replace(prefix, stored, 1)
    counts = {"registered": len(rows), **{r: len(skipped[r]) for r in SKIP_REASONS}}
    if not rows:
        shown = "; ".join(f"{uris[0]}: {r}" for r, uris in skipped.items() if uris)
        raise InvalidInputError(f"no usable image at {location}: {sum(counts.values())} objects, all skipped "
                                f"({_counts_text(counts) or 'none listed'}; e.g. {shown or '-'}); nothing registered")
    table = pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA)
    info = {"name": name, "location": location, "kind": listing.kind, "label_from": listing.label_from,
            "counts": counts, "labels": len({r["label"] for r in rows if r["label"] is not None}),
            "bytes": sum(r["bytes"] for r in rows),
            "splits": {s: n for s in SPLITS if (n := sum(r["split"] == s for r in rows))},
            "skipped_examples": {r: uris[:EXAMPLES] for r, uris in skipped.items() if uris}}
    if stamp:
        info["registered_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with atomic_dir(sources_root(data_dir) / name) as tmp:
        pq.write_table(table, tmp / CATALOG_FILE)
        info["catalog_sha256"] = file_sha256(tmp / CATALOG_FILE)
        write_json(tmp / INFO_FILE, info)
    log.info("source %s (%s): %d images registered, %s, in %.1fs", name, listing.kind, len(rows),
             _counts_text(counts) or "none skipped", time.perf_counter() - started)
    return info


def remove_source(ws: Workspace, name: str, *, track: bool = True) -> dict:
    """Unregister `name` (its folder under data/sources); return the source.json it had."""
    folder = _existing(ws, name)
    info = _read_info(folder / INFO_FILE)
    aside = folder.with_name(f".{name}.removed")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)  # one rename: readers see the source or nothing
    shutil.rmtree(aside, ignore_errors=True)
    return {**info, "dvc_md5": _track(ws, track, f"remove {name}")}


def check_source(ws: Workspace, name: str, *, progress: bool = False, workers: int | None = None) -> dict:
    """Objects of `name` whose version changed (or that vanished) since registration.

    Folders and S3 prefixes are listed again (new objects are counted too); WebDataset rows are
    compared with their shard's version; link-table rows are asked one by one (HEAD / stat).
    `re_register` is the command that takes the changes in.
    """
    folder = _existing(ws, name)
    info = _read_info(folder / INFO_FILE)
    catalog = pq.read_table(folder / CATALOG_FILE, columns=["uri", "version"]).to_pylist()
    current = _current_versions(ws.data_dir, info, catalog, workers, progress)
    changed = [r["uri"] for r in catalog if current.get(r["uri"], None) not in (None, r["version"])]
    missing = [r["uri"] for r in catalog if current.get(r["uri"]) is None]
    known = {r["uri"] for r in catalog}
    unlisted = [u for u in current if u not in known] if info["kind"] in ("folder", "imagefolder", "s3") else []
    return {"name": name, "location": info["location"], "kind": info["kind"], "checked": len(catalog),
            "unchanged": len(catalog) - len(changed) - len(missing), "changed": len(changed),
            "missing": len(missing), "not_in_catalog": len(unlisted),
            "examples": {"changed": changed[:EXAMPLES], "missing": missing[:EXAMPLES],
                         "not_in_catalog": unlisted[:EXAMPLES]},
            "re_register": _re_register(ws, name, info)}


def _re_register(ws: Workspace, name: str, info: dict) -> str:
    """The command that takes a source's changes in: a packaged dataset is rebuilt with its profile."""
    from nds._registry import SOURCES
    from nds.corpus.read import SUMMARY_FILE

    if name in SOURCES:
        summary = ws.data_dir / SUMMARY_FILE
        profile = json.loads(summary.read_text()).get("profile", "small") if summary.exists() else "small"
        return f"nds corpus build --profile {profile}"
    return (f"nds source add {name} --from {shlex.quote(info['location'])} --label-from {info['label_from']} "
            "--replace")


# --------------------------------------------------------------------------- the work


def _existing(ws: Workspace, name: str) -> Path:
    folder = sources_root(ws.data_dir) / str(name)
    if not NAME_PATTERN.match(str(name)) or not (folder / INFO_FILE).exists():
        names = [d.name for d in _source_dirs(ws.data_dir)]
        raise NotFoundError(f"no registered source {name!r} (registered: {', '.join(names) or 'none'}); "
                            "see `nds source list`")
    return folder


def _inspect(name: str, entry: Entry, max_pixels: int) -> dict | str:
    """One listed object -> its catalog row, or the reason it is skipped."""
    from nds.corpus.objects import (
        ObjectAccessError,
        ObjectNotFoundError,
        ObjectTooLargeError,
        fetch_bytes,
        object_version,
    )

    if entry.skip:
        return entry.skip
    try:
        data = entry.data if entry.data is not None else fetch_bytes(entry.uri)
        version = entry.version if entry.version is not None else object_version(entry.uri)
    except ObjectTooLargeError:
        return "too_large"
    except NDSError as exc:
        reason = ("missing" if isinstance(exc, ObjectNotFoundError) else
                  "denied" if isinstance(exc, ObjectAccessError) else "unreachable")
        log.debug("%s %s: %s", reason, entry.uri, exc)
        return reason
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except UnusableImageError as exc:
        log.debug("skipped %s: %s", entry.uri, exc)
        return exc.reason
    return {"sample_id": f"{name}/{entry.key}", "dataset": name, "uri": entry.uri, "label": entry.label,
            "split": entry.split or SPLIT, "sha256": hashlib.sha256(data).hexdigest(), "width": image.width,
            "height": image.height, "version": version, "bytes": len(data), "caption": entry.caption}


def _inspect_all(name: str, listing: Listing, workers: int | None, max_pixels: int,
                 progress: bool) -> tuple[list[dict], dict[str, list[str]]]:
    from tqdm.auto import tqdm

    workers = workers or (REMOTE_WORKERS if listing.remote else LOCAL_WORKERS)
    rows, skipped = [], {r: [] for r in SKIP_REASONS}
    with tqdm(total=listing.total, desc=f"source {name}", unit="obj", disable=not progress, leave=False) as bar:
        for entry, result in _bounded_map(lambda e: _inspect(name, e, max_pixels), listing.entries, workers):
            if isinstance(result, str):
                skipped[result].append(entry.uri)
            else:
                rows.append(result)
            bar.update(1)
    return rows, {r: sorted(uris) for r, uris in skipped.items()}


def _bounded_map(fn: Callable, items: Iterable, workers: int) -> Iterator[tuple]:
    """(item, fn(item)) in completion order, at most workers * IN_FLIGHT_PER_WORKER submitted at once."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nds-source")
    pending: dict = {}
    try:
        for item in items:
            pending[pool.submit(fn, item)] = item
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _other_hashes(data_dir: Path, name: str) -> dict[str, str]:
    """sha256 -> sample_id over every other registered source."""
    table = load_registered(data_dir)
    if table is None:
        return {}
    out: dict[str, str] = {}
    for sid, dataset, sha in zip(*(table.column(c).to_pylist() for c in ("sample_id", "dataset", "sha256"))):
        if dataset != name:
            out.setdefault(sha, sid)
    return out


def _drop_duplicates(rows: list[dict], skipped: dict[str, list[str]], others: dict[str, str]) -> list[dict]:
    """Rows sorted by sample_id without repeated ids or bytes; the dropped ones go to `skipped`."""
    kept, seen_ids, seen_hashes = [], set(), set()
    for row in sorted(rows, key=lambda r: r["sample_id"]):
        if row["sample_id"] in seen_ids or row["sha256"] in seen_hashes:
            skipped["duplicate_within"].append(row["uri"])
        elif row["sha256"] in others:
            skipped["duplicate_of_other_source"].append(f"{row['uri']} (= {others[row['sha256']]})")
        else:
            kept.append(row)
            seen_ids.add(row["sample_id"])
            seen_hashes.add(row["sha256"])
    return kept


def _current_versions(data_dir: Path, info: dict, catalog: list[dict], workers: int | None,
                      progress: bool) -> dict[str, str | None]:
    """uri -> its version now (None: gone or unreachable), by the cheapest means the kind allows."""
    from nds.corpus.objects import object_version

    kind, uris = info["kind"], [r["uri"] for r in catalog]
    if kind in ("folder", "imagefolder", "s3"):
        try:
            listing = resolve(info["location"], info["label_from"])
        except (NotFoundError, InvalidInputError):  # the folder is gone or holds no image any more
            return {}
        return {e.uri: e.version for e in listing.entries if e.skip is None}
    if kind == "webdataset":
        try:  # a packaged dataset's location and uris are relative to the workspace
            shards = dict(resolve(resolve_uri(data_dir, info["location"]), info["label_from"]).shards)
        except (NotFoundError, InvalidInputError):
            return {}
        now: dict[str, str | None] = {}
        for row in catalog:
            shard = row["uri"].partition("#")[0]
            if shard not in now:
                path = resolve_uri(data_dir, shard)
                found = shards.get(path)
                if found is not None and row["version"].startswith("sha256:") and "://" not in path:
                    found = f"sha256:{file_sha256(Path(path))}"  # the packaged shards' version is their content
                now[shard] = found
        return {u: now[u.partition("#")[0]] for u in uris}

    def version(uri: str) -> str | None:
        try:
            return object_version(uri)
        except NDSError:
            return None

    return {u: v for u, v in _bounded_map(version, uris, workers or REMOTE_WORKERS)}


def _track(ws: Workspace, track: bool, what: str) -> str | None:
    """`dvc add data` in a DVC workspace; the md5 of data.dvc (None when not tracked)."""
    from nds.platform import dvc

    if not track or not dvc.is_dvc_repo(ws):
        return None
    try:
        return dvc.track_corpus(ws)
    except NDSError as exc:
        raise NDSError(f"source {what} done in data/, but {exc}; run `dvc add data` in {ws.root}") from exc


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{counts[r]} {r}" for r in SKIP_REASONS if counts.get(r))
