"""The current index, kept loaded for a long-running server and swapped atomically on a new version.

The weights stage writes `artifacts/weights/` last, in one rename, so its `weights.json` names
a complete index version. On load the holder takes a snapshot of that version into the state
folder (`index-cache/<version>-<hash>/`): the catalog as one Arrow IPC file (memory-mapped:
a selection reads only its B rows), the assignments and the cluster layout as .npy files
(memory-mapped) and the expert bundle (hard links where the file system allows). A rebuild
that swaps the stage folders later cannot change what a loaded version reads, and a restart
opens the snapshot in milliseconds. Worker processes share the snapshot's pages.

A watcher thread polls `weights.json`; a new version is loaded beside the current one and
then published by one reference assignment, so every request, which takes `current()` once,
answers from exactly one version. While an index is being rebuilt (bundle and weights of
different versions) the previous version stays in service.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from nds._io import atomic_dir, write_json
from nds.config import Workspace
from nds.errors import NDSError, NotFoundError
from nds.formats.bundle import BUNDLE_FILE, expert_files, load_bundle
from nds.index.layout import LAYOUT_FILES, load_cluster_layout
from nds.select.service import Index, load_current_index
from nds.serve.state import file_lock

log = logging.getLogger(__name__)

CACHE_DIR = "index-cache"
#: In the key of every snapshot: bumped when a snapshot's files change shape, so a new release
#: takes a fresh snapshot (2: DICTIONARY_COLUMNS dictionary-encoded; 3: pixel_sha256.arrow).
SNAPSHOT_FORMAT = 3
#: The catalog rows' pixel hashes (the contamination guard's second key), beside catalog.arrow.
PIXEL_HASHES_FILE = "pixel_sha256.arrow"
#: Catalog columns with few distinct values, stored dictionary-encoded: a request's `take` of B
#: rows reads B small integers there instead of B offsets and strings (~30 % of the take at N = 1e7).
DICTIONARY_COLUMNS = ("dataset", "label")
#: Snapshots kept besides the one in service (a request may still hold the previous one).
KEEP_SNAPSHOTS = 2


class IndexInTransition(NDSError):
    """The stage folders hold parts of two index versions (a rebuild is under way)."""


@dataclass(frozen=True)
class LoadedIndex:
    """One index version as the service answers from it."""

    index: Index
    bundle: dict
    bundle_dir: Path  # this version's bundle.json and expert files (the snapshot)
    datasets: list[str]
    key: str
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.index.version


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class IndexHolder:
    """`current()` is the index in service; `refresh()` checks the workspace for a new version."""

    def __init__(self, ws: Workspace, state_dir: Path, *, poll_s: float = 2.0):
        self.ws = ws
        self.cache_root = Path(state_dir) / CACHE_DIR
        self.poll_s = float(poll_s)
        self._current: LoadedIndex | None = None
        self._seen: bytes | None = None  # weights.json bytes of the last version tried
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def weights_json(self) -> Path:
        return self.ws.stage_dir("weights") / "weights.json"

    def current(self) -> LoadedIndex:
        if self._current is None:
            self.refresh()
        if self._current is None:
            raise NotFoundError(f"no index in {self.ws.root}: build one first (`nds index`)")
        return self._current

    @property
    def loading(self) -> bool:
        """A version is being loaded (or checked) right now."""
        return self._load_lock.locked()

    def refresh(self, *, wait: bool = True) -> LoadedIndex | None:
        """Load the workspace's index if it is a new version; keep the current one on failure.

        wait=False: if another thread is loading, return the current index at once."""
        if not self._load_lock.acquire(blocking=wait):
            return self._current
        try:
            try:
                raw = self.weights_json.read_bytes()
            except FileNotFoundError:
                if self._current is None:
                    raise NotFoundError(f"{self.weights_json} is missing: build the index first (`nds index`)") from None
                return self._current
            if raw == self._seen:
                return self._current
            try:
                loaded = self._load(raw)
            except IndexInTransition as exc:
                log.info("index not swapped yet: %s", exc)  # retried on the next poll
                if self._current is None:
                    raise
                return self._current
            except NDSError as exc:
                self._seen = raw  # not retried until weights.json changes again
                if self._current is None:
                    raise
                log.error("new index in %s not loaded, still serving %s: %s", self.ws.root, self._current.version, exc)
                return self._current
            previous, self._current, self._seen = self._current, loaded, raw
            if previous is None or previous.key != loaded.key:
                log.info("serving index %s (K=%d, N=%d)%s", loaded.version, loaded.index.k,
                         loaded.index.catalog.num_rows, f", was {previous.version}" if previous else "")
                self._prune(keep={loaded.key} | ({previous.key} if previous else set()))
            return loaded
        finally:
            self._load_lock.release()

    def _load(self, raw: bytes) -> LoadedIndex:
        summary = json.loads(raw)
        version = summary["index_version"]
        key = f"{version}-{hashlib.sha256(raw + f'snapshot format {SNAPSHOT_FORMAT}'.encode()).hexdigest()[:12]}"
        folder = self.cache_root / key
        with file_lock(self.cache_root / f".{key}.lock"):
            if not (folder / "ready.json").is_file():
                self._snapshot(folder, raw, summary)
        return self._open(folder, key)

    def _snapshot(self, folder: Path, raw: bytes, summary: dict) -> None:
        bundle_src = self.ws.stage_dir("experts")
        bundle = load_bundle(bundle_src, verify=False)
        if (bundle["index_version"], bundle["bundle_sha256"]) != (summary["index_version"], summary["bundle_sha256"]):
            raise IndexInTransition(
                f"the index in {self.ws.root} is being rebuilt (expert bundle of {bundle['index_version']}, weights of "
                f"{summary['index_version']}): start the server when `nds index` has finished")
        t0 = time.perf_counter()
        index = load_current_index(self.ws)  # the workspace checks: catalog/weights order, layout size
        if index.version != summary["index_version"] or self.weights_json.read_bytes() != raw:
            raise IndexInTransition("the weights changed while loading")
        if index.layout is None:
            raise NotFoundError(f"{self.ws.stage_dir('weights')}/layout is missing (an index built before it existed): "
                                "rerun `nds stage compute_weights`")
        with atomic_dir(folder) as tmp:
            catalog = index.catalog.combine_chunks()  # one chunk: `take` of B rows reads B rows
            for name in DICTIONARY_COLUMNS:
                column = catalog.column(name).combine_chunks()
                if not pa.types.is_dictionary(column.type):
                    catalog = catalog.set_column(catalog.schema.get_field_index(name), name, column.dictionary_encode())
            with ipc.new_file(tmp / "catalog.arrow", catalog.schema) as writer:
                writer.write_table(catalog, max_chunksize=max(1, catalog.num_rows))
            del catalog
            np.save(tmp / "assignments.npy", np.ascontiguousarray(index.assignments, dtype=np.int32))
            if index.pixel_hashes is not None:  # read only by a request with exclusions
                hashes = pa.table({"pixel_sha256": index.pixel_hashes().combine_chunks()})
                with ipc.new_file(tmp / PIXEL_HASHES_FILE, hashes.schema) as writer:
                    writer.write_table(hashes, max_chunksize=max(1, hashes.num_rows))
                del hashes
            (tmp / "layout").mkdir()
            for name in LAYOUT_FILES:
                _link_or_copy(self.ws.stage_dir("weights") / "layout" / name, tmp / "layout" / name)
            (tmp / "bundle").mkdir()
            for name in [BUNDLE_FILE, *expert_files(bundle, str(bundle_src / BUNDLE_FILE))]:
                _link_or_copy(bundle_src / name, tmp / "bundle" / name)
            try:
                load_bundle(tmp / "bundle", verify=True)
            except NDSError as exc:
                raise IndexInTransition(f"expert files changed while copying ({exc})") from exc
            if self.weights_json.read_bytes() != raw:
                raise IndexInTransition("the weights changed while copying")
            datasets = sorted(set(index.catalog.column("dataset").unique().to_pylist()))
            write_json(tmp / "ready.json", {**summary, "datasets": datasets,
                                             "snapshot_seconds": round(time.perf_counter() - t0, 2)})
        log.info("index %s snapshot in %s (%.1fs)", summary["index_version"], folder, time.perf_counter() - t0)

    def _open(self, folder: Path, key: str) -> LoadedIndex:
        ready = json.loads((folder / "ready.json").read_text())
        catalog = ipc.open_file(pa.memory_map(str(folder / "catalog.arrow"))).read_all()
        bundle = load_bundle(folder / "bundle", verify=False)
        hashes = folder / PIXEL_HASHES_FILE
        index = Index(version=ready["index_version"], bundle_sha256=ready["bundle_sha256"], k=int(bundle["k"]),
                      catalog=catalog, assignments=np.load(folder / "assignments.npy", mmap_mode="r"),
                      layout=load_cluster_layout(folder / "layout"),
                      pixel_hashes=functools.lru_cache(maxsize=1)(
                          lambda: ipc.open_file(pa.memory_map(str(hashes))).read_all().column("pixel_sha256"))
                      if hashes.exists() else None)
        return LoadedIndex(index=index, bundle=bundle, bundle_dir=folder / "bundle", datasets=ready["datasets"], key=key)

    def _prune(self, keep: set[str]) -> None:
        """Delete older snapshots (open memory maps of a deleted one stay valid until released)."""
        if not self.cache_root.is_dir():
            return
        snapshots = sorted((p for p in self.cache_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                           key=lambda p: p.stat().st_mtime, reverse=True)
        for old in snapshots[KEEP_SNAPSHOTS:]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
                (self.cache_root / f".{old.name}.lock").unlink(missing_ok=True)

    # ----------------------------------------------------------------- watcher

    def start(self) -> LoadedIndex:
        """Load the current index now (errors are raised) and watch for new versions."""
        loaded = self.current()
        if self.poll_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="nds-index-watch", daemon=True)
            self._thread.start()
        return loaded

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad build
                log.exception("index watcher: checking %s failed", self.weights_json)
