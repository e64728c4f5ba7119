"""Materialise a manifest's images as an ImageFolder tree (``<dataset>/<label>/<sample>.<ext>``).

`download_manifest` fetches each image on its own (a thread pool of `workers`), with retries
and backoff on transient failures (`nds.corpus.objects`), verifies it against the manifest's
``sha256`` and writes it atomically (a temporary file, then a rename): outside objects keep
their original bytes and extension, packaged rows become PNGs. A link that fails is counted,
not fatal:

- ``dead``: 404/403 or unreachable after the retries;
- ``changed``: the bytes decode but their sha256 is not the catalog's (the object was replaced);
- ``corrupt``: the bytes are not a usable image (truncated, not an image, a decompression bomb).

Manifests with reserve rows (summary ``budget`` B and ``reserve`` R; rows of rank >= B) make
up for failed rows: reserve rows are fetched in rank order until the folder holds B images or
the reserve runs out (``fill``). Progress is journalled in ``.nds-download.jsonl`` inside the
folder, so an interrupted download continues with ``resume=True``: files already present and
verified are not fetched again. ``download-report.json`` (counts and every failure, without
any link's signature) is written at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nds._io import atomic_dir, atomic_file, file_sha256, write_json
from nds.client import links
from nds.client.links import check_not_expired, load_url_column  # noqa: F401  (re-exported)
from nds.config import Workspace
from nds.corpus import objects
from nds.errors import InvalidInputError, NotFoundError
from nds.formats.manifest import SUMMARY_NAME, load_manifest

log = logging.getLogger(__name__)

JOURNAL_NAME = ".nds-download.jsonl"
REPORT_NAME = "download-report.json"
FAILURES = ("dead", "changed", "corrupt")
#: Eight concurrent fetches keep a loopback or LAN store busy without tripping per-client rate
#: limits of public hosts; `--workers` raises it for a fast store.
WORKERS = 8

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A file-name-safe form of a label or sample id (no separators, no '..')."""
    return _UNSAFE.sub("_", text).strip("._") or "_"


@dataclass(frozen=True)
class Row:
    sample_id: str
    rank: int
    uri: str
    url: str | None
    sha256: str | None
    stem: Path  # <dataset>/<label>/<sample>, relative to the output folder; the extension comes later
    reserve: bool


def download_manifest(manifest_path: Path, out_dir: Path, *, ws: Workspace | None = None, workers: int = WORKERS,
                      retries: int = objects.RETRIES, timeout_s: float = objects.TIMEOUT_S,
                      backoff_s: float = objects.BACKOFF_S, fill: bool | None = None, resume: bool = False,
                      progress: bool = True) -> dict:
    """Download every selected image into `out_dir`; returns the report (also written there).

    ws: the workspace whose corpus serves packaged rows without presigned links.
    fill: replace failed rows with reserve rows (None: when the manifest has any).
    resume: continue an interrupted download in `out_dir` (else `out_dir` must be new or empty).
    Raises InvalidInputError / NotFoundError only for bad input (a manifest that is not one,
    expired links, a folder that holds something else); failed links are counted in the report.
    """
    if workers < 1 or retries < 0 or not timeout_s > 0 or backoff_s < 0:
        raise InvalidInputError(f"--workers must be >= 1, --retries >= 0 and --timeout > 0 (got {workers}, "
                                f"{retries}, {timeout_s}; backoff {backoff_s})")
    t0 = time.perf_counter()
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    table = load_manifest(manifest_path)
    urls = load_url_column(manifest_path, table)  # refuses expired links before anything is written
    rows = _plan_rows(table, urls, _read_budget(manifest_path, table.num_rows))
    has_reserve = any(r.reserve for r in rows)
    fill = has_reserve if fill is None else fill and has_reserve
    reader = links.RowReader(ws, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
    reader.check_local_corpus([r.uri for r in rows if r.url is None])
    key = _manifest_key(rows)
    journal = _Journal.open(out_dir, key, resume=resume)
    try:
        kept = journal.verified(out_dir)
        outcomes = _download(rows, kept, reader, out_dir, journal, workers=workers, fill=fill, progress=progress)
    finally:
        journal.close()
    report = _report(manifest_path, out_dir, rows, outcomes, kept, fill, time.perf_counter() - t0)
    write_json(out_dir / REPORT_NAME, report)
    log.info("%s", summary_line(report))
    return report


def _download(rows: list[Row], kept: dict[str, dict], reader: links.RowReader, out_dir: Path, journal: "_Journal",
              *, workers: int, fill: bool, progress: bool) -> dict[str, dict]:
    """Fetch the selected rows not `kept`, then reserve rows while some are missing; sample_id -> outcome."""
    from tqdm import tqdm

    primary = [r for r in rows if not r.reserve]
    outcomes: dict[str, dict] = dict(kept)
    failed = dict.fromkeys(FAILURES, 0)  # this run's, for the progress bar
    with tqdm(total=len(primary), desc="download", unit="img", disable=not progress) as bar:
        bar.update(sum(1 for r in primary if r.sample_id in kept))

        def run(batch: list[Row]) -> None:
            for row, outcome in _fetch_all(batch, reader, out_dir, workers):
                outcomes[row.sample_id] = outcome
                journal.record(row, outcome)
                if outcome["status"] in failed:
                    failed[outcome["status"]] += 1
                    bar.set_postfix({s: n for s, n in failed.items() if n}, refresh=False)
                bar.update(1)

        run([r for r in primary if r.sample_id not in kept])
        pending = iter(r for r in rows if r.reserve and r.sample_id not in outcomes)
        while fill:  # waves of exactly the missing count, in rank order: the reserve is read only as far as needed
            ok = sum(1 for o in outcomes.values() if o.get("status") == "ok")
            wave = [r for _, r in zip(range(len(primary) - ok), pending)]
            if not wave:
                break
            bar.total += len(wave)
            run(wave)
    _drop_surplus(rows, outcomes, len(primary), out_dir, journal)
    return outcomes


def summary_line(report: dict) -> str:
    """One line for people: what the folder holds now and what failed."""
    c = report["primary"]
    extra = f", {report['filled']} filled from the reserve" if report["reserve_rows"] else ""
    skipped = f", {report['already_present']} already present" if report["already_present"] else ""
    return (f"{report['images']} images in {report['out_dir']} ({c['ok']} of {report['rows']} selected ok, "
            f"{c['dead']} dead, {c['changed']} changed, {c['corrupt']} corrupt{extra}{skipped}); "
            f"report: {Path(report['out_dir']) / REPORT_NAME}")


# --------------------------------------------------------------------------- planning


def _read_budget(manifest_path: Path, n_rows: int) -> int:
    """B: rows of rank < B are the selection, the rest reserve (all rows when the summary says nothing)."""
    folder = manifest_path if manifest_path.is_dir() else manifest_path.parent
    try:
        summary = json.loads((folder / SUMMARY_NAME).read_text())
    except FileNotFoundError:
        return n_rows
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{folder / SUMMARY_NAME} is not valid JSON ({exc}): the manifest folder is damaged") from exc
    if not summary.get("reserve"):
        return n_rows
    budget = summary.get("budget")
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= n_rows:
        raise InvalidInputError(f"{folder / SUMMARY_NAME}: budget {budget!r} must be an integer in [0, {n_rows}] "
                                "when the manifest has reserve rows: regenerate the selection")
    return budget


def _plan_rows(table, urls: list[str] | None, budget: int) -> list[Row]:
    cols = {c: table.column(c).to_pylist() for c in ("sample_id", "dataset", "label", "uri", "rank", "sha256")}
    rows, used = [], set()
    for i, sid in enumerate(cols["sample_id"]):
        label = cols["label"][i]
        stem = Path(safe_name(cols["dataset"][i]), safe_name("unlabelled" if label is None else str(label)), safe_name(sid))
        if stem.as_posix().lower() in used:  # two ids that differ only in unsafe characters or case
            stem = stem.with_name(f"{stem.name}-{hashlib.sha256(sid.encode()).hexdigest()[:10]}")
        used.add(stem.as_posix().lower())
        rows.append(Row(sid, int(cols["rank"][i]), cols["uri"][i], urls[i] if urls else None,
                        cols["sha256"][i] or None, stem, reserve=int(cols["rank"][i]) >= budget))
    return sorted(rows, key=lambda r: r.rank)


def _manifest_key(rows: list[Row]) -> str:
    digest = hashlib.sha256()
    for r in rows:
        digest.update(f"{r.sample_id}\t{r.uri}\t{r.sha256}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- fetching


def _fetch_all(rows: list[Row], reader: links.RowReader, out_dir: Path, workers: int) -> Iterator[tuple[Row, dict]]:
    """(row, outcome) as each fetch finishes; at most 2 * workers in flight (memory stays flat)."""
    if not rows:
        return
    todo = iter(rows)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nds-download") as pool:
        inflight: dict = {}
        try:
            while True:
                for row in todo:
                    inflight[pool.submit(_fetch_one, row, reader, out_dir)] = row
                    if len(inflight) >= 2 * workers:
                        break
                if not inflight:
                    return
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for future in done:
                    yield inflight.pop(future), future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # an interrupt leaves the journal consistent
            raise


def _fetch_one(row: Row, reader: links.RowReader, out_dir: Path) -> dict:
    from nds.corpus.decode import UnusableImageError, decode_image

    try:
        item = reader.read(row.uri, row.url)
    except (*objects.DEAD_LINK_ERRORS, NotFoundError) as exc:
        return {"status": "dead", "error": str(exc)}
    except (objects.ObjectTooLargeError, links.DamagedArrayError) as exc:
        return {"status": "corrupt", "error": str(exc)}
    except InvalidInputError as exc:  # a uri of no supported form: no link to follow
        return {"status": "dead", "error": str(exc)}
    verified = row.sha256 is not None and item.content_sha256 == row.sha256
    if not item.packaged and not verified:
        # Bytes the catalog hashed were decoded at registration; anything else is decoded here,
        # so a truncated file counts as corrupt rather than changed.
        try:
            decode_image(item.data)
        except UnusableImageError as exc:
            return {"status": "corrupt", "error": f"{row.uri}: {exc}"}
    if row.sha256 is not None and not verified:
        return {"status": "changed", "error": f"{row.uri}: sha256 {item.content_sha256[:12]}... is not the "
                                              f"catalog's {row.sha256[:12]}... (the object changed since registration)"}
    ext = item.extension or links.image_format_extension(item.data)
    rel = row.stem.with_name(row.stem.name + ext)
    with atomic_file(out_dir / rel) as tmp:
        tmp.write_bytes(item.data)
    return {"status": "ok", "path": rel.as_posix(), "file_sha256": hashlib.sha256(item.data).hexdigest()}


# --------------------------------------------------------------------------- state and report


class _Journal:
    """Append-only record of finished rows (one JSON line each; a torn last line is ignored)."""

    def __init__(self, path: Path, entries: dict[str, dict]):
        self.path = path
        self.entries = entries
        self._fh = open(path, "a", encoding="utf-8")

    @classmethod
    def open(cls, out_dir: Path, key: str, *, resume: bool) -> "_Journal":
        path = out_dir / JOURNAL_NAME
        if out_dir.exists() and not out_dir.is_dir():
            raise InvalidInputError(f"--out {out_dir} is a file: give a folder")
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            head = _json_or_none(lines[0]) if lines else None
            if not head or head.get("manifest_key") != key:
                raise InvalidInputError(f"{out_dir} holds a download of another manifest: choose a new folder")
            if not resume:
                raise InvalidInputError(f"{out_dir} holds an earlier download of this manifest: pass --resume to "
                                        "continue it, or choose a new folder")
            entries = {}
            for line in lines[1:]:
                entry = _json_or_none(line)
                if entry and "sample_id" in entry:
                    entries[entry["sample_id"]] = entry
            for stale in out_dir.rglob(".*.tmp-*"):  # files an interrupted run was writing
                stale.unlink(missing_ok=True)
            return cls(path, entries)
        if out_dir.exists() and any(out_dir.iterdir()):
            raise InvalidInputError(f"{out_dir} is not empty: choose a new folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        journal = cls(path, {})
        journal._write({"manifest_key": key})
        return journal

    def verified(self, out_dir: Path) -> dict[str, dict]:
        """Entries of rows whose file is present with the bytes recorded."""
        kept = {}
        for sid, e in self.entries.items():
            if e.get("status") == "ok":
                path = out_dir / e["path"]
                if path.is_file() and file_sha256(path) == e.get("file_sha256"):
                    kept[sid] = {k: e[k] for k in ("status", "path", "file_sha256")}
        return kept

    def record(self, row: Row, outcome: dict) -> None:
        self._write({"sample_id": row.sample_id, **outcome})

    def _write(self, entry: dict) -> None:
        self._fh.write(json.dumps(entry, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _json_or_none(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _drop_surplus(rows: list[Row], outcomes: dict, budget: int, out_dir: Path, journal: _Journal) -> None:
    """Remove reserve images beyond B (a resumed run whose selected rows came back), last rank first."""
    ok = [r for r in rows if outcomes.get(r.sample_id, {}).get("status") == "ok"]
    surplus = len(ok) - budget
    for row in sorted((r for r in ok if r.reserve), key=lambda r: -r.rank)[: max(surplus, 0)]:
        (out_dir / outcomes[row.sample_id]["path"]).unlink(missing_ok=True)
        outcomes[row.sample_id] = {"status": "unused"}
        journal.record(row, outcomes[row.sample_id])


def _counts(outcomes) -> dict[str, int]:
    counts = dict.fromkeys(("ok", *FAILURES), 0)
    for o in outcomes:
        if o.get("status") in counts:
            counts[o["status"]] += 1
    return counts


def _report(manifest_path: Path, out_dir: Path, rows: list[Row], outcomes: dict, kept: dict, fill: bool,
            seconds: float) -> dict:
    primary = [r for r in rows if not r.reserve]
    reserve = [r for r in rows if r.reserve]
    failures = [{"sample_id": r.sample_id, "rank": r.rank, "uri": r.uri, "reserve": r.reserve,
                 "status": outcomes[r.sample_id]["status"], "error": outcomes[r.sample_id].get("error", "")}
                for r in rows if outcomes.get(r.sample_id, {}).get("status") in FAILURES]
    return {
        "manifest": str(manifest_path), "out_dir": str(out_dir), "rows": len(primary), "reserve_rows": len(reserve),
        "fill": fill, "primary": _counts(outcomes.get(r.sample_id, {}) for r in primary),
        "reserve": _counts(outcomes.get(r.sample_id, {}) for r in reserve),
        "filled": sum(1 for r in reserve if outcomes.get(r.sample_id, {}).get("status") == "ok"),
        "images": sum(1 for o in outcomes.values() if o.get("status") == "ok"),
        "already_present": len(kept), "verified_sha256": sum(1 for r in rows if r.sha256),
        "seconds": round(seconds, 2), "failures": failures,
    }


# --------------------------------------------------------------------------- other writers


@contextmanager
def image_folder_writer(out_dir: Path) -> Iterator[Callable[[np.ndarray, tuple[str, ...], str], None]]:
    """Yield `write(image, folders, name)` saving PNGs under a temporary sibling of `out_dir`,
    which becomes `out_dir` in one rename when the block succeeds (and is removed otherwise)."""
    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidInputError(f"{out_dir} is not empty: choose a new folder")
    with atomic_dir(out_dir) as staging:

        def write(image: np.ndarray, folders: tuple[str, ...], name: str) -> None:
            folder = staging.joinpath(*(safe_name(f) for f in folders))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{safe_name(name)}.png")

        yield write
