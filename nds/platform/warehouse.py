"""The DuckDB warehouse: DDL from `warehouse/*.sql`, loads bound with `?`, read-only queries.

The repository keeps the one copy of the DDL in `warehouse/`; a built wheel carries it as
`nds/platform/sql/` (copied by setup.py's build step) and an editable install reads `warehouse/`.

DuckDB allows one writer process per file, so every write opens, commits and closes its own
connection inside one transaction: a reader never sees half an index version.

Every connection opened here runs in UTC (`created_at` columns are TIMESTAMPTZ) and resolves
relative file paths against the warehouse's own folder (`file_search_path`): the `selections`
view reads `selections/*.parquet` next to the DuckDB file, so a copied warehouse folder reads
its own copy. A warehouse written by an older release is upgraded in place by the first
connection that may write (read-only connections try once, and go on read-only if it is locked).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from nds._io import atomic_file
from nds.errors import InvalidInputError, NDSError, NotFoundError, StorageError

log = logging.getLogger(__name__)

#: The DDL inside an installed wheel (a package folder) ...
PACKAGED_SQL = "sql"
#: ... and in a source checkout / editable install: the repository's `warehouse/` folder.
REPO_SQL_DIR = Path(__file__).resolve().parents[2] / "warehouse"
#: Tables holding one index version's rows, deleted and reloaded together.
VERSIONED_TABLES = ("samples", "clusters", "sample_weights")


def sql_dir() -> Traversable:
    """The packaged `nds/platform/sql/` when the wheel ships it, else the repository's `warehouse/`."""
    packaged = resources.files("nds.platform") / PACKAGED_SQL
    return packaged if packaged.is_dir() else REPO_SQL_DIR


def sql_files() -> list[Traversable]:
    """The DDL files in the order they run (by name: 001_tables.sql, 002_views.sql, ...)."""
    where = sql_dir()
    files = [f for f in where.iterdir() if f.name.endswith(".sql")] if where.is_dir() else []
    files.sort(key=lambda f: f.name)
    if not files:
        raise NDSError(f"no DDL found in {where}; reinstall the project (`pip install .` or `pip install -e .`)")
    return files


@contextmanager
def connect(path: Path, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse; writers get the schema applied (and an older one upgraded) first."""
    path = Path(path)
    if read_only and not path.exists():
        raise NotFoundError(f"warehouse {path} does not exist yet; run `nds index` first")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    con = _open(path, read_only)
    try:
        if read_only and _stored_schema_version(con) < SCHEMA_VERSION:
            con.close()
            _try_upgrade(path)
            con = _open(path, read_only)
        elif not read_only:
            _apply_schema(con, path)
        yield con
    finally:
        con.close()


#: Bumped whenever the DDL changes in a way an existing warehouse must be upgraded for
#: (2: TIMESTAMPTZ created_at, JSON audit columns, origin/requester/flow run id, relative view path).
SCHEMA_VERSION = 2


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:
        msg = str(exc).splitlines()[0]
        if "lock" in msg.lower():
            raise StorageError(f"warehouse {path} is locked by another process ({msg}); wait for it to finish") from exc
        raise StorageError(f"cannot open warehouse {path}: {msg}") from exc
    except duckdb.Error as exc:
        raise InvalidInputError(
            f"cannot open warehouse {path}: {str(exc).splitlines()[0]}; is it a DuckDB file?"
        ) from exc
    # Session settings: UTC, and relative paths in views resolve against the warehouse's folder
    # rather than the working directory (SET, not connect(config=...), which would clash with
    # another connection to the same file in this process).
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET file_search_path = ?", [str(path.resolve().parent)])
    return con


def _stored_schema_version(con: duckdb.DuckDBPyConnection) -> int:
    found = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() AND table_name = 'schema_version'"
    ).fetchone()[0]
    if not found:
        return 0
    return int(con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])


def _try_upgrade(path: Path) -> None:
    """A read-only caller found an older schema: upgrade in place if the file may be written now."""
    try:
        with connect(path):
            log.info("upgraded warehouse %s to schema %d", path, SCHEMA_VERSION)
    except (StorageError, InvalidInputError, duckdb.Error) as exc:
        log.warning("warehouse %s has an older schema and could not be upgraded now (%s); reading it as it is",
                    path, str(exc).splitlines()[0])


def _apply_schema(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Run the DDL files and the in-place upgrades in one transaction (idempotent)."""
    con.execute("BEGIN TRANSACTION")
    try:
        for f in sql_files():
            con.execute(_render(f.read_text(), path))
        _upgrade_columns(con)
        con.execute("INSERT OR IGNORE INTO schema_version VALUES (?, current_timestamp)", [SCHEMA_VERSION])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


#: Columns an older warehouse holds as naive TIMESTAMP (written in UTC) -> TIMESTAMPTZ.
_TZ_UPGRADES = {
    ("index_versions", "created_at"):
        "ALTER TABLE index_versions ALTER created_at SET DATA TYPE TIMESTAMPTZ USING timezone('UTC', created_at)",
    ("evaluations", "created_at"):
        "ALTER TABLE evaluations ALTER created_at SET DATA TYPE TIMESTAMPTZ USING timezone('UTC', created_at)",
}


def _upgrade_columns(con: duckdb.DuckDBPyConnection) -> None:
    for (table, column), alter in _TZ_UPGRADES.items():
        kind = con.execute(
            "SELECT data_type FROM duckdb_columns() WHERE database_name = current_database() "
            "AND table_name = ? AND column_name = ?", [table, column],
        ).fetchone()
        if kind and kind[0] == "TIMESTAMP":
            con.execute(alter)
            log.info("warehouse: %s.%s is now TIMESTAMPTZ (UTC)", table, column)


def check_origin(origin: str) -> str:
    """`origin` of a selection's audit row: one of ORIGINS."""
    if origin not in ORIGINS:
        raise InvalidInputError(f"unknown selection origin {origin!r}: use one of {', '.join(ORIGINS)}")
    return origin


#: Where a selection was started: the `nds select` command line, a Prefect deployment run (UI or
#: API), the HTTP selection service, or a transfer evaluation (not a client's request).
ORIGINS = ("cli", "deployment", "service", "evaluation")
#: JSON text columns: Parquet's JSON logical type, which DuckDB reads as JSON (pyarrow >= 19).
_JSON = pa.json_() if hasattr(pa, "json_") else pa.string()


#: One audit row per selection run, stored as its own Parquet file (see nds/select/service.py).
#: created_at is UTC (stored naive, as rows written before schema 2 are; the view makes it TIMESTAMPTZ).
SELECTIONS_SCHEMA = pa.schema(
    [
        ("selection_id", pa.string()), ("created_at", pa.timestamp("us")), ("index_version", pa.string()),
        ("bundle_sha256", pa.string()), ("mode", pa.string()), ("parameters", _JSON),
        ("scores", pa.list_(pa.float64())), ("expert_weights", pa.list_(pa.float64())),
        ("manifest_location", pa.string()), ("manifest_sha256", pa.string()), ("n_selected", pa.int64()),
        ("n_eligible", pa.int64()), ("counts_per_dataset", _JSON), ("seconds", pa.float64()),
        ("origin", pa.string()), ("flow_run_id", pa.string()), ("requester", pa.string()),
        ("datasets", pa.list_(pa.string())),
    ]
)
#: A zero-row file with the schema keeps the `selections` view valid before the first run
#: (rewritten when the schema grows, so the view sees every column).
SELECTIONS_SCHEMA_FILE = "_schema.parquet"
#: The selections folder's glob as the view names it: relative, resolved against the warehouse folder.
SELECTIONS_GLOB = "selections/*.parquet"


def selections_folder(path: Path) -> Path:
    """Where selection runs append their audit rows (one Parquet file each)."""
    return Path(path).resolve().parent / "selections"


def _render(sql: str, path: Path) -> str:
    """Fill the one template slot of the DDL: the selections glob, relative to the warehouse file."""
    if "{selections_glob}" not in sql:
        return sql
    folder = selections_folder(path)
    folder.mkdir(parents=True, exist_ok=True)
    schema_file = folder / SELECTIONS_SCHEMA_FILE
    if not schema_file.exists() or not pq.read_schema(schema_file).equals(SELECTIONS_SCHEMA):
        with atomic_file(schema_file) as tmp:
            pq.write_table(SELECTIONS_SCHEMA.empty_table(), tmp)
    return sql.replace("{selections_glob}", SELECTIONS_GLOB)


def load_index_version(
    path: Path,
    *,
    version_row: dict,
    samples: pa.Table,
    clusters: pa.Table,
    weights: pa.Table,
) -> None:
    """Replace one index version's rows atomically (one transaction; the version row last).

    `samples` columns: sample_id, dataset, uri, label, split, sha256;
    `clusters`: expert, name, size, top_dataset, top_dataset_share, rotation_accuracy, expert_sha256;
    `weights`: sample_id, expert, weight.
    """
    version = version_row["index_version"]
    with connect(path) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM index_versions WHERE index_version = ?", [version])
            for table in VERSIONED_TABLES:  # fixed names, never user input
                con.execute(f"DELETE FROM {table} WHERE index_version = ?", [version])
            con.register("_samples", samples)
            con.execute(
                "INSERT INTO samples SELECT ?, sample_id, dataset, uri, label, split, sha256 FROM _samples", [version]
            )
            con.register("_clusters", clusters)
            con.execute(
                "INSERT INTO clusters SELECT ?, expert, name, size, top_dataset, top_dataset_share, "
                "rotation_accuracy, expert_sha256 FROM _clusters",
                [version],
            )
            con.register("_weights", weights)
            con.execute("INSERT INTO sample_weights SELECT ?, sample_id, expert, weight FROM _weights", [version])
            con.execute(
                "INSERT INTO index_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    version,
                    _utc(version_row.get("created_at")),
                    json.dumps(version_row["params"], sort_keys=True),
                    version_row.get("corpus_md5"),
                    version_row.get("git_rev"),
                    version_row.get("corpus_profile"),
                    int(version_row["n_samples"]),
                    int(version_row["n_datasets"]),
                    int(version_row["k"]),
                    version_row.get("nmi_dataset"),
                    version_row["bundle_sha256"],
                    json.dumps(version_row.get("stage_seconds") or {}),
                ],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


def _utc(when: datetime | None) -> datetime:
    """An aware UTC datetime for a TIMESTAMPTZ column (naive values are taken as UTC; None: now)."""
    if when is None:
        return datetime.now(timezone.utc)
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def query(path: Path, sql: str, params: list | None = None) -> list[dict]:
    """Run a read-only query; rows as dicts."""
    with connect(path, read_only=True) as con:
        cur = con.execute(sql, params or [])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]


def read_status(path: Path) -> dict:
    """What the warehouse holds: index versions (newest first) and the current one's clusters."""
    versions = query(
        path,
        "SELECT index_version, created_at, corpus_profile, n_samples, n_datasets, k, nmi_dataset, bundle_sha256 "
        "FROM index_versions ORDER BY created_at DESC",
    )
    clusters = []
    if versions:
        clusters = query(
            path,
            "SELECT expert, size, top_dataset, top_dataset_share, rotation_accuracy FROM clusters "
            "WHERE index_version = ? ORDER BY expert",
            [versions[0]["index_version"]],
        )
    return {"versions": versions, "current_clusters": clusters}
