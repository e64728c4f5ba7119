"""nds.platform.warehouse: DuckDB DDL, atomic index-version loads, views, clear errors."""

import pyarrow as pa
import pytest

from nds.errors import NDSError, NotFoundError, StorageError
from nds.platform import warehouse


def _load(path, version="v1", weight=0.5):
    samples = pa.table(
        {
            "sample_id": ["a", "b", "c"],
            "dataset": ["mnist", "mnist", "fashion"],
            "uri": ["u1", "u2", "u3"],
            "label": ["1", "2", "coat"],
            "split": ["source"] * 3,
            "sha256": ["h1", "h2", "h3"],
        }
    )
    clusters = pa.Table.from_pylist(
        [
            {"expert": 0, "name": "k0", "size": 2, "top_dataset": "mnist", "top_dataset_share": 1.0,
             "rotation_accuracy": 0.9, "expert_sha256": "e0"},
            {"expert": 1, "name": "k1", "size": 1, "top_dataset": "fashion", "top_dataset_share": 1.0,
             "rotation_accuracy": 0.8, "expert_sha256": "e1"},
        ]
    )
    weights = pa.table({"sample_id": ["a", "b", "c"], "expert": [0, 0, 1], "weight": [weight, weight, 1.0]})
    warehouse.load_index_version(
        path,
        version_row={"index_version": version, "params": {"cluster": {"k": 2}}, "n_samples": 3, "n_datasets": 2,
                     "k": 2, "nmi_dataset": 1.0, "bundle_sha256": "b", "corpus_profile": "tiny"},
        samples=samples, clusters=clusters, weights=weights,
    )


def test_load_and_views(tmp_path):
    db = tmp_path / "w.duckdb"
    _load(db)
    rows = warehouse.query(db, "SELECT expert, dataset_counts FROM cluster_summary ORDER BY expert")
    assert rows[0]["dataset_counts"] == {"mnist": 2}
    mass = warehouse.query(db, "SELECT dataset, sum(weight_mass) AS m FROM weights_by_dataset GROUP BY 1 ORDER BY 1")
    assert [(r["dataset"], r["m"]) for r in mass] == [("fashion", 1.0), ("mnist", 1.0)]
    assert warehouse.read_status(db)["versions"][0]["index_version"] == "v1"


def test_reload_of_a_version_replaces_its_rows(tmp_path):
    db = tmp_path / "w.duckdb"
    _load(db)
    _load(db)
    assert warehouse.query(db, "SELECT count(*) AS n FROM sample_weights")[0]["n"] == 3
    _load(db, version="v2")
    assert warehouse.query(db, "SELECT count(*) AS n FROM index_versions")[0]["n"] == 2


def test_failed_load_leaves_previous_data_untouched(tmp_path):
    db = tmp_path / "w.duckdb"
    _load(db)
    bad = pa.table({"sample_id": ["a"], "expert": [0]})  # no weight column
    with pytest.raises(Exception):
        warehouse.load_index_version(
            db, version_row={"index_version": "v1", "params": {}, "n_samples": 1, "n_datasets": 1, "k": 1,
                             "bundle_sha256": "x"},
            samples=pa.table({"sample_id": ["a"], "dataset": ["d"], "uri": ["u"], "label": ["l"],
                              "split": ["source"], "sha256": ["h"]}),
            clusters=pa.Table.from_pylist([]), weights=bad,
        )
    assert warehouse.query(db, "SELECT count(*) AS n FROM sample_weights")[0]["n"] == 3


def test_locked_warehouse_is_a_clear_error(tmp_path):
    db = tmp_path / "w.duckdb"
    _load(db)
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb,time; c=duckdb.connect({str(db)!r}); print('ok', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(NDSError, match="locked by another process"):
            _load(db)
        with pytest.raises(StorageError):
            _load(db)
    finally:
        holder.kill()
        holder.wait()


def test_not_a_duckdb_file(tmp_path):
    db = tmp_path / "w.duckdb"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(NDSError, match="cannot open warehouse"):
        warehouse.read_status(db)


def test_missing_warehouse_for_reading(tmp_path):
    with pytest.raises(NDSError, match="run `nds index`"):
        warehouse.read_status(tmp_path / "none.duckdb")
    with pytest.raises(NotFoundError):
        warehouse.query(tmp_path / "none.duckdb", "SELECT 1")
