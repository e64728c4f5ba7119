"""The selection manifest: which catalog samples a client gets, in rank order.

A manifest folder holds `manifest.parquet` (typed), `manifest.csv` (for people and
spreadsheets) and `summary.json` (parameters, counts, checksums). It is written into
a temporary sibling folder and renamed into place, so a reader sees either nothing
or a complete manifest, and a previous selection is never overwritten silently.
A server may defer the Parquet form to its first reader (write_manifest(parquet=False),
write_parquet_form): the same bytes, made only when someone asks for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from nds._io import atomic_dir, atomic_file, file_sha256
from nds.errors import InvalidInputError, NotFoundError

log = logging.getLogger(__name__)

#: `sha256` (last) is the catalog's content hash of the sample's bytes: a client verifies each
#: download against it (`nds client download`).
MANIFEST_COLUMNS = ("sample_id", "dataset", "uri", "label", "probability", "expert", "rank", "sha256")
#: The catalog columns a manifest copies (probability, expert and rank come from the draw).
CATALOG_COLUMNS = ("sample_id", "dataset", "uri", "label", "sha256")

PARQUET_NAME = "manifest.parquet"
CSV_NAME = "manifest.csv"
#: The sidecar of a presigned selection (`nds select --presign`): sample_id, rank, url in rank
#: order. The URLs live beside the manifest, not in it, because they expire and carry
#: signatures: the manifest (and its sha256) stays the same for the same inputs.
URLS_NAME = "urls.csv"
SUMMARY_NAME = "summary.json"
#: The table of a manifest whose Parquet form is deferred (write_manifest(parquet=False)): Arrow
#: IPC, hidden; manifest.parquet and the JSON rows are made from it when first asked for.
DEFERRED_NAME = ".manifest.arrow"

# The manifest checksum is sha256 over the bytes of manifest.csv as written: CSV is a
# canonical rendering of the rows (header + rows in rank order, no writer metadata),
# whereas Parquet bytes carry writer version and encoding choices. Verification hashes
# the stored files themselves, so a later pyarrow version cannot raise a false alarm.
CHECKSUM_METHOD = "sha256 of manifest.csv bytes (pyarrow CSV writer, header, rows in rank order)"

# Keys write_manifest owns in summary.json; summary_extra may not shadow them.
_RESERVED_SUMMARY_KEYS = frozenset(
    {"manifest_sha256", "parquet_sha256", "checksum_method", "rows", "columns",
     "counts_per_dataset", "counts_per_expert", "created_at"}
)


def build_manifest(catalog: pa.Table, indices, probabilities, assignments) -> pa.Table:
    """Catalog rows at `indices`, in rank order, with probability, expert and rank.

    catalog: (N rows) with at least CATALOG_COLUMNS (sample_id, dataset, uri, label, sha256).
    indices: (B,) int64 row numbers in rank order (from select_samples).
    probabilities: (N,) float64 p(x); assignments: (N,) int cluster (expert) ids.
    Returns a (B rows) table with MANIFEST_COLUMNS.
    """
    missing = [c for c in CATALOG_COLUMNS if c not in catalog.column_names]
    if missing:
        raise InvalidInputError(f"catalog lacks columns {missing}: rebuild it with the corpus stage")
    n = catalog.num_rows
    idx = np.asarray(indices)
    p = np.asarray(probabilities, dtype=np.float64)
    a = np.asarray(assignments)
    if p.shape != (n,) or a.shape != (n,):
        raise InvalidInputError(
            f"catalog has {n} rows but probabilities has shape {p.shape} and assignments {a.shape}: "
            "they must describe the same samples (same index version)"
        )
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise InvalidInputError(f"indices must be a (B,) integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise InvalidInputError(f"indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    if np.unique(idx).size != idx.size:
        raise InvalidInputError("indices contain duplicates: a selection names each sample once")
    idx = idx.astype(np.int64, copy=False)
    return manifest_from_rows(catalog.select(list(CATALOG_COLUMNS)).take(pa.array(idx)), p[idx], a[idx])


def manifest_from_rows(rows: pa.Table, probabilities, experts) -> pa.Table:
    """The manifest of catalog `rows` already taken in rank order (a sampler's draw: distinct).

    rows: (B rows) with CATALOG_COLUMNS; probabilities: (B,) float64 p(x) of those rows;
    experts: (B,) int their cluster (expert) ids. The same table build_manifest gives, without
    reading the catalog again: a server that holds the index takes the B rows once.
    Dictionary-encoded columns (a server's snapshot of the catalog) are decoded: the manifest
    is the same table either way.
    """
    b = rows.num_rows
    for i, field in enumerate(rows.schema):
        if pa.types.is_dictionary(field.type):
            rows = rows.set_column(i, field.name, pc.cast(rows.column(i), field.type.value_type))
    p = np.asarray(probabilities, dtype=np.float64)
    a = np.asarray(experts)
    if p.shape != (b,) or a.shape != (b,):
        raise InvalidInputError(f"{b} manifest rows need ({b},) probabilities and experts, got {p.shape} and {a.shape}")
    return pa.table({
        **{name: rows.column(name) for name in ("sample_id", "dataset", "uri", "label")},
        "probability": pa.array(p, type=pa.float64()),
        "expert": pa.array(a.astype(np.int64, copy=False), type=pa.int64()),
        "rank": pa.array(np.arange(b, dtype=np.int64)),
        "sha256": rows.column("sha256"),
    })


def write_manifest(
    manifest: pa.Table,
    out_dir: Path,
    *,
    summary_extra: dict,
    overwrite: bool = False,
    root: Path | None = None,
    parquet: bool = True,
) -> dict:
    """Write manifest.parquet, manifest.csv and summary.json into `out_dir` atomically.

    manifest: (B rows) table with MANIFEST_COLUMNS (from build_manifest).
    summary_extra: JSON-serialisable facts to record (index version, parameters, ...).
    overwrite: replace an existing non-empty out_dir instead of refusing.
    root: if given, out_dir (relative paths are taken relative to root) must resolve
        inside root and may not contain '..'; use it when the name comes from a request.
    parquet: False defers manifest.parquet (the costliest form: ~4x the CSV) to its first
        reader (write_parquet_form): the folder then holds the table as Arrow IPC, hidden,
        and summary.json gains `parquet_sha256` when manifest.parquet is written. The bytes
        are the same either way. `nds serve` defers; `nds select` writes every form at once.
    Returns the summary dict written to summary.json.
    """
    if tuple(manifest.column_names) != MANIFEST_COLUMNS:
        raise InvalidInputError(f"manifest columns are {manifest.column_names}, expected {list(MANIFEST_COLUMNS)}")
    target = checked_out_dir(Path(out_dir), root)
    clash = _RESERVED_SUMMARY_KEYS & set(summary_extra)
    if clash:
        raise InvalidInputError(f"summary_extra may not set {sorted(clash)}: those are computed by write_manifest")
    if target.exists():
        if not target.is_dir():
            raise InvalidInputError(f"{target} exists and is not a folder: choose another output folder")
        if any(target.iterdir()) and not overwrite:
            raise InvalidInputError(
                f"{target} already holds a selection: choose a new output folder or pass overwrite=True"
            )
    with atomic_dir(target) as staging:
        checksums = {"manifest_sha256": _write_csv(manifest, staging / CSV_NAME)}
        if parquet:
            checksums["parquet_sha256"] = _write_parquet(manifest, staging / PARQUET_NAME)
        else:
            _write_ipc(manifest, staging / DEFERRED_NAME)
        summary = {
            **summary_extra,
            "rows": manifest.num_rows,
            "columns": {f.name: str(f.type) for f in manifest.schema},
            "counts_per_dataset": _value_counts(manifest.column("dataset")),
            "counts_per_expert": _value_counts(manifest.column("expert")),
            "checksum_method": CHECKSUM_METHOD,
            **checksums,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / SUMMARY_NAME).write_bytes(summary_bytes(summary))
    log.info("wrote manifest %s: %d rows, sha256 %s", target, summary["rows"], summary["manifest_sha256"])
    return summary


def summary_bytes(summary: dict) -> bytes:
    """summary.json as written: indented, keys sorted, one trailing newline (orjson: ~20x json's indent)."""
    try:
        return orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise InvalidInputError(f"summary_extra is not JSON-serialisable: {exc}") from exc


def read_table(folder: Path) -> pa.Table:
    """The manifest table of a folder written by write_manifest: manifest.parquet, else its deferred copy.

    No checksum check (load_manifest checks): for a server reading the manifests it wrote.
    """
    folder = Path(folder)
    if (folder / PARQUET_NAME).is_file():
        return pq.read_table(folder / PARQUET_NAME)
    if (folder / DEFERRED_NAME).is_file():
        with pa.OSFile(str(folder / DEFERRED_NAME)) as fh:
            return ipc.open_file(fh).read_all()
    raise NotFoundError(f"no manifest in {folder}: expected {PARQUET_NAME}")


def json_rows(table: pa.Table) -> list[dict]:
    """The rows as dicts in column order (table.to_pylist(), ~4x faster: one Python list per column)."""
    names = table.column_names
    return [dict(zip(names, values)) for values in zip(*(table.column(n).to_pylist() for n in names))]


def write_parquet_form(folder: Path) -> Path:
    """Write the deferred manifest.parquet of `folder` (write_manifest(parquet=False)); returns its path.

    Idempotent and safe to race: every writer writes the same bytes, by rename, and records
    the same `parquet_sha256` in summary.json (rewritten by rename).
    """
    folder = Path(folder)
    final = folder / PARQUET_NAME
    if final.is_file():
        return final
    table = read_table(folder)
    sha = _write_parquet(table, final)
    summary = _read_summary(folder / SUMMARY_NAME)
    if summary is not None and summary.get("parquet_sha256") != sha:
        with atomic_file(folder / SUMMARY_NAME) as tmp:
            tmp.write_bytes(summary_bytes({**summary, "parquet_sha256": sha}))
    return final


def load_manifest(path: Path) -> pa.Table:
    """Read a manifest folder, or its manifest.parquet / manifest.csv file.

    Verifies the file against the checksums in summary.json when that file exists.
    Returns a (B rows) table with MANIFEST_COLUMNS (`sha256` null for a manifest written
    before that column existed).
    """
    path = Path(path)
    if path.is_dir():  # the Parquet form, or the CSV of a manifest whose Parquet is deferred
        folder = path
        file = path / CSV_NAME if not (path / PARQUET_NAME).exists() and (path / CSV_NAME).is_file() else path / PARQUET_NAME
    else:
        folder, file = path.parent, path
    if not file.is_file():
        raise NotFoundError(f"no manifest at {path}: expected a folder with {PARQUET_NAME} or a manifest file")
    if file.suffix not in (".parquet", ".csv"):
        raise InvalidInputError(f"{file} is not a manifest: expected a .parquet or .csv file")
    summary = _read_summary(folder / SUMMARY_NAME)
    if summary is not None:
        checks = {PARQUET_NAME: "parquet_sha256", CSV_NAME: "manifest_sha256"}
        to_check = [PARQUET_NAME, CSV_NAME] if path.is_dir() else [file.name]
        for name in to_check:
            key = checks.get(name)
            if key and key in summary and (folder / name).exists() and file_sha256(folder / name) != summary[key]:
                raise InvalidInputError(
                    f"manifest {folder / name} was modified after it was written "
                    f"(its sha256 no longer matches {SUMMARY_NAME}): regenerate the selection"
                )
    try:
        if file.suffix == ".parquet":
            table = pq.read_table(file)
        else:
            types = _column_types(summary)
            table = pacsv.read_csv(file, convert_options=pacsv.ConvertOptions(column_types=types))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInputError(f"cannot read manifest {file}: {exc}") from exc
    if "sha256" not in table.column_names and "rank" in table.column_names:
        # Written before manifests carried the content hash: readable, but downloads go unverified.
        table = table.append_column("sha256", pa.nulls(table.num_rows, pa.string()))
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if missing:
        raise InvalidInputError(f"{file} lacks manifest columns {missing}")
    return table.select(list(MANIFEST_COLUMNS))


# --------------------------------------------------------------------------- helpers


def _write_csv(table: pa.Table, path: Path) -> str:
    """Write manifest.csv; returns the sha256 of its bytes (hashed in memory, not read back)."""
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    data = sink.getvalue()
    with open(path, "wb") as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


def _write_parquet(table: pa.Table, path: Path) -> str:
    """Write manifest.parquet atomically (pyarrow's default options); returns the sha256 of its bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue()
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


def _write_ipc(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def checked_out_dir(out_dir: Path, root: Path | None) -> Path:
    if root is None:
        return out_dir
    if ".." in out_dir.parts:
        raise InvalidInputError(f"output folder {out_dir} contains '..': name a folder inside {root}")
    root_resolved = Path(root).resolve()
    target = (out_dir if out_dir.is_absolute() else root_resolved / out_dir).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise InvalidInputError(f"output folder {out_dir} resolves outside {root}: name a folder inside it")
    if target == root_resolved:
        raise InvalidInputError(f"output folder {out_dir} is the root {root} itself: name a sub-folder")
    return target


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    if pa.types.is_integer(column.type) and column.null_count == 0:  # expert ids: numpy counts them faster
        values, counts = np.unique(column.to_numpy(), return_counts=True)
        pairs = zip(values.tolist(), counts.tolist())
    else:
        counted = pc.value_counts(column)
        pairs = zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())
    return {str(v): int(n) for v, n in sorted(pairs, key=lambda vn: str(vn[0]))}


def _read_summary(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path} is not valid JSON ({exc}): the manifest folder is damaged") from exc


def _column_types(summary: dict | None) -> dict[str, pa.DataType]:
    """Types recorded in summary.json, so a CSV reads back as the Parquet did."""
    types = {"sample_id": pa.string(), "dataset": pa.string(), "uri": pa.string(),
             "probability": pa.float64(), "expert": pa.int64(), "rank": pa.int64(), "sha256": pa.string()}
    for name, alias in ((summary or {}).get("columns") or {}).items():
        try:
            types[name] = pa.type_for_alias(alias)
        except ValueError:
            pass  # a type CSV cannot carry (e.g. nested); let the reader infer it
    return types
