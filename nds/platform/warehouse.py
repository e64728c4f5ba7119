"""The DuckDB warehouse: DDL from `warehouse/*.sql`, loads bound with `?`, read-only queries.

The repository keeps the one copy of the DDL in `warehouse/`; a built wheel carries it as
`nds/platform/sql/` (copied by setup.py's build step) and an editable install reads `warehouse/`.

DuckDB allows one writer process per file, so every write opens, commits and closes its own
connection inside one transaction: a reader never sees half an index version.
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
    """Open the warehouse; writers get the schema applied first."""
    path = Path(path)
    if read_only and not path.exists():
        raise NotFoundError(f"warehouse {path} does not exist yet; run `nds index` first")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
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
    try:
        if not read_only:
            for f in sql_files():
                con.execute(_render(f.read_text(), path))
        yield con
    finally:
        con.close()


#: One audit row per selection run, stored as its own Parquet file (see nds/select/service.py).
SELECTIONS_SCHEMA = pa.schema(
    [
        ("selection_id", pa.string()), ("created_at", pa.timestamp("us")), ("index_version", pa.string()),
        ("bundle_sha256", pa.string()), ("mode", pa.string()), ("parameters", pa.string()),
        ("scores", pa.list_(pa.float64())), ("expert_weights", pa.list_(pa.float64())),
        ("manifest_location", pa.string()), ("manifest_sha256", pa.string()), ("n_selected", pa.int64()),
        ("n_eligible", pa.int64()), ("counts_per_dataset", pa.string()), ("seconds", pa.float64()),
    ]
)
#: A zero-row file with the schema keeps the `selections` view valid before the first run.
SELECTIONS_SCHEMA_FILE = "_schema.parquet"


def selections_folder(path: Path) -> Path:
    """Where selection runs append their audit rows (one Parquet file each)."""
    return Path(path).resolve().parent / "selections"


def _render(sql: str, path: Path) -> str:
    """Fill the one template slot of the DDL: the selections glob (from configuration, not users)."""
    if "{selections_glob}" not in sql:
        return sql
    folder = selections_folder(path)
    folder.mkdir(parents=True, exist_ok=True)
    schema_file = folder / SELECTIONS_SCHEMA_FILE
    if not schema_file.exists():
        with atomic_file(schema_file) as tmp:
            pq.write_table(SELECTIONS_SCHEMA.empty_table(), tmp)
    # DDL takes no bound parameters: quote the configured path as a SQL string literal.
    return sql.replace("{selections_glob}", str(folder / "*.parquet").replace("'", "''"))


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
                    version_row.get("created_at") or datetime.now(timezone.utc).replace(tzinfo=None),
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
