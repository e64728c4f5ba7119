"""The selection manifest: which catalog samples a client gets, in rank order.

A manifest folder holds `manifest.parquet` (typed), `manifest.csv` (for people and
spreadsheets) and `summary.json` (parameters, counts, checksums). It is written into
a temporary sibling folder and renamed into place, so a reader sees either nothing
or a complete manifest, and a previous selection is never overwritten silently.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from nds._io import atomic_dir, file_sha256
from nds.errors import InvalidInputError, NotFoundError

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("sample_id", "dataset", "uri", "label", "probability", "expert", "rank")
CATALOG_COLUMNS = ("sample_id", "dataset", "uri", "label")

PARQUET_NAME = "manifest.parquet"
CSV_NAME = "manifest.csv"
#: The sidecar of a presigned selection (`nds select --presign`): sample_id, rank, url in rank
#: order. The URLs live beside the manifest, not in it, because they expire and carry
#: signatures: the manifest (and its sha256) stays the same for the same inputs.
URLS_NAME = "urls.csv"
SUMMARY_NAME = "summary.json"

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

    catalog: (N rows) with at least sample_id, dataset, uri, label.
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
    rows = catalog.select(list(CATALOG_COLUMNS)).take(pa.array(idx))
    return rows.append_column("probability", pa.array(p[idx], type=pa.float64())) \
        .append_column("expert", pa.array(a[idx].astype(np.int64), type=pa.int64())) \
        .append_column("rank", pa.array(np.arange(idx.size, dtype=np.int64)))


def write_manifest(
    manifest: pa.Table,
    out_dir: Path,
    *,
    summary_extra: dict,
    overwrite: bool = False,
    root: Path | None = None,
) -> dict:
    """Write manifest.parquet, manifest.csv and summary.json into `out_dir` atomically.

    manifest: (B rows) table with MANIFEST_COLUMNS (from build_manifest).
    summary_extra: JSON-serialisable facts to record (index version, parameters, ...).
    overwrite: replace an existing non-empty out_dir instead of refusing.
    root: if given, out_dir (relative paths are taken relative to root) must resolve
        inside root and may not contain '..'; use it when the name comes from a request.
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
        pq.write_table(manifest, staging / PARQUET_NAME)
        _write_csv(manifest, staging / CSV_NAME)
        summary = {
            **summary_extra,
            "rows": manifest.num_rows,
            "columns": {f.name: str(f.type) for f in manifest.schema},
            "counts_per_dataset": _value_counts(manifest.column("dataset")),
            "counts_per_expert": _value_counts(manifest.column("expert")),
            "checksum_method": CHECKSUM_METHOD,
            "manifest_sha256": file_sha256(staging / CSV_NAME),
            "parquet_sha256": file_sha256(staging / PARQUET_NAME),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            text = json.dumps(summary, indent=2, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"summary_extra is not JSON-serialisable: {exc}") from exc
        (staging / SUMMARY_NAME).write_text(text + "\n")
    log.info("wrote manifest %s: %d rows, sha256 %s", target, summary["rows"], summary["manifest_sha256"])
    return summary


def load_manifest(path: Path) -> pa.Table:
    """Read a manifest folder, or its manifest.parquet / manifest.csv file.

    Verifies the file against the checksums in summary.json when that file exists.
    Returns a (B rows) table with MANIFEST_COLUMNS.
    """
    path = Path(path)
    folder, file = (path, path / PARQUET_NAME) if path.is_dir() else (path.parent, path)
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
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if missing:
        raise InvalidInputError(f"{file} lacks manifest columns {missing}")
    return table.select(list(MANIFEST_COLUMNS))


# --------------------------------------------------------------------------- helpers


def _write_csv(table: pa.Table, path: Path) -> None:
    pacsv.write_csv(table, path)


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
    counts = pc.value_counts(column)
    pairs = zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())
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
             "probability": pa.float64(), "expert": pa.int64(), "rank": pa.int64()}
    for name, alias in ((summary or {}).get("columns") or {}).items():
        try:
            types[name] = pa.type_for_alias(alias)
        except ValueError:
            pass  # a type CSV cannot carry (e.g. nested); let the reader infer it
    return types
