"""The warehouse as a data engineer meets it: typed audit rows, old row files, copies, upgrades, pandas.

Real DuckDB files and Parquet row files on disk; no index needed (see test_platform_warehouse._load).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nds.config import Workspace
from nds.errors import InvalidInputError
from nds.platform import warehouse
from nds.select import service

from test_platform_warehouse import _load  # tests/platform is on sys.path (as for s3fixtures)

#: SELECTIONS_SCHEMA as releases before schema 2 wrote it: JSON as VARCHAR, no origin columns.
OLD_SELECTIONS_SCHEMA = pa.schema([
    ("selection_id", pa.string()), ("created_at", pa.timestamp("us")), ("index_version", pa.string()),
    ("bundle_sha256", pa.string()), ("mode", pa.string()), ("parameters", pa.string()),
    ("scores", pa.list_(pa.float64())), ("expert_weights", pa.list_(pa.float64())),
    ("manifest_location", pa.string()), ("manifest_sha256", pa.string()), ("n_selected", pa.int64()),
    ("n_eligible", pa.int64()), ("counts_per_dataset", pa.string()), ("seconds", pa.float64()),
])

#: The DDL of a warehouse written before schema 2 (the parts the upgrade changes).
OLD_DDL = """
CREATE TABLE index_versions (
    index_version VARCHAR PRIMARY KEY, created_at TIMESTAMP NOT NULL, params JSON NOT NULL,
    corpus_md5 VARCHAR, git_rev VARCHAR, corpus_profile VARCHAR, n_samples BIGINT NOT NULL,
    n_datasets INTEGER NOT NULL, k INTEGER NOT NULL, nmi_dataset DOUBLE, bundle_sha256 VARCHAR NOT NULL,
    stage_seconds JSON);
CREATE TABLE evaluations (
    evaluation_id VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL, index_version VARCHAR NOT NULL,
    task VARCHAR NOT NULL, domain VARCHAR, strategy VARCHAR NOT NULL, budget BIGINT NOT NULL,
    budget_fraction DOUBLE NOT NULL, seed INTEGER NOT NULL, accuracy DOUBLE NOT NULL, domain_precision DOUBLE,
    n_pretrain BIGINT NOT NULL, pretrain_seconds DOUBLE, finetune_seconds DOUBLE, params JSON,
    PRIMARY KEY (evaluation_id, task, strategy, budget, seed));
INSERT INTO index_versions VALUES ('v0', TIMESTAMP '2025-01-02 03:04:05', '{}', NULL, NULL, 'tiny', 3, 2, 2,
    NULL, 'b', '{}');
INSERT INTO evaluations VALUES ('ev0', TIMESTAMP '2025-01-02 03:04:05', 'v0', 't', NULL, 'nds', 10, 0.1, 0,
    0.5, NULL, 10, NULL, NULL, '{}');
CREATE VIEW selections AS SELECT * FROM read_parquet('{glob}', union_by_name = true);
"""


def _summary(selection_id: str, *, datasets=None, counts=None, weights=(0.75, 0.25)) -> dict:
    return {
        "selection_id": selection_id, "index_version": "v1", "bundle_sha256": "b", "mode": "rotation",
        "parameters": {"budget": 2.0, "seed": 0, "temperature": 0.02, "datasets": datasets, "method": "auto"},
        "expert_weights": list(weights), "manifest_location": f"/m/{selection_id}", "manifest_sha256": "h",
        "rows": 2, "n_eligible": 3, "counts_per_dataset": counts or {"mnist": 1, "fashion": 1}, "seconds": 0.1,
    }


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.delenv("NDS_WAREHOUSE", raising=False)
    ws = Workspace(tmp_path / "ws")
    _load(ws.warehouse_path)
    return ws


def test_audit_row_carries_origin_requester_flow_run_and_filter(ws):
    service.record_selection(ws, _summary("sel-a"), scores=[0.9, 0.1])
    service.record_selection(ws, _summary("sel-b", datasets=["mnist"], counts={"mnist": 2}), scores=[0.9, 0.1],
                             origin="deployment", requester="alice", flow_run_id="6f1c", datasets=["mnist"])
    service.record_selection(ws, _summary("sel-c"), scores=[0.9, 0.1], origin="evaluation")
    rows = warehouse.query(ws.warehouse_path, "SELECT selection_id, origin, requester, flow_run_id, datasets "
                                              "FROM selections ORDER BY selection_id")
    assert [tuple(r.values()) for r in rows] == [
        ("sel-a", "cli", None, None, None),
        ("sel-b", "deployment", "alice", "6f1c", ["mnist"]),
        ("sel-c", "evaluation", None, None, None),
    ]
    # What a client asked for, leaving tests' and evaluations' rows out:
    client = warehouse.query(ws.warehouse_path, "SELECT count(*) AS n FROM selections WHERE origin <> 'evaluation'")
    assert client[0]["n"] == 2


def test_unknown_origin_is_refused_and_nothing_written(ws):
    with pytest.raises(InvalidInputError, match="unknown selection origin 'ui'.*cli, deployment, service, evaluation"):
        service.record_selection(ws, _summary("sel-x"), scores=[0.5, 0.5], origin="ui")
    assert not (service.selections_dir(ws) / "sel-x.parquet").exists()


def test_json_columns_timestamptz_and_long_views(ws):
    before = dt.datetime.now(dt.timezone.utc)
    service.record_selection(ws, _summary("sel-a"), scores=[0.9, 0.1])
    service.record_selection(ws, _summary("sel-b", datasets=["mnist"], counts={"mnist": 2}), scores=[0.9, 0.1],
                             datasets=["mnist"])
    db = ws.warehouse_path
    types = {r["column_name"]: r["column_type"] for r in warehouse.query(db, "DESCRIBE selections")}
    assert types["parameters"] == types["counts_per_dataset"] == "JSON"
    assert types["created_at"] == "TIMESTAMP WITH TIME ZONE"
    rows = warehouse.query(db, "SELECT selection_id, json_extract(parameters, '$.temperature')::DOUBLE AS t, "
                               "parameters->>'$.seed' AS seed, counts_per_dataset->>'$.mnist' AS mnist, created_at "
                               "FROM selections ORDER BY selection_id")
    assert [(r["t"], r["seed"], r["mnist"]) for r in rows] == [(0.02, "0", "1"), (0.02, "0", "2")]
    assert all(before - dt.timedelta(seconds=1) <= r["created_at"] <= dt.datetime.now(dt.timezone.utc) for r in rows)
    # The same instant in any session time zone (the stored value is UTC, not local time).
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'America/New_York'")
        con.execute(f"SET file_search_path = '{db.parent}'")
        con.execute(f"ATTACH '{db}' AS w (READ_ONLY)")
        ny = con.execute("SELECT epoch(created_at) FROM w.selections ORDER BY selection_id").fetchall()
    finally:
        con.close()
    assert [e for (e,) in ny] == pytest.approx([r["created_at"].timestamp() for r in rows])

    counts = warehouse.query(db, "SELECT * FROM selection_counts")
    assert [tuple(r.values()) for r in counts] == [("sel-a", "fashion", 1), ("sel-a", "mnist", 1), ("sel-b", "mnist", 2)]
    # Expert 0 holds mnist (mass 1), expert 1 fashion (mass 1); weights 0.75/0.25; sel-b filtered to mnist.
    put = warehouse.query(db, "SELECT selection_id, dataset, weight FROM selection_dataset_weights")
    assert [tuple(r.values()) for r in put] == [("sel-a", "fashion", 0.25), ("sel-a", "mnist", 0.75),
                                                ("sel-b", "mnist", 1.0)]


def test_df_gives_pandas_frames(ws):
    pd = pytest.importorskip("pandas", reason="pandas is a declared dependency")
    service.record_selection(ws, _summary("sel-a"), scores=[0.9, 0.1])
    with warehouse.connect(ws.warehouse_path, read_only=True) as con:
        frames = {name: con.sql(f"SELECT * FROM {name}").df()
                  for name in ("selections", "selection_counts", "cluster_summary", "weights_by_dataset")}
    assert all(isinstance(f, pd.DataFrame) for f in frames.values())
    sel = frames["selections"]
    assert sel.loc[0, "selection_id"] == "sel-a" and sel.loc[0, "origin"] == "cli"
    assert str(sel["created_at"].dt.tz) == "UTC"
    assert frames["selection_counts"]["n"].sum() == 2
    assert frames["cluster_summary"]["expert"].tolist() == [0, 1]


def test_old_row_files_read_through_the_view(ws):
    """Rows written before schema 2 (VARCHAR JSON, no origin) sit next to new ones."""
    old = _summary("sel-old", datasets=["fashion"], counts={"fashion": 2})
    row = {
        "selection_id": "sel-old", "created_at": dt.datetime(2025, 1, 2, 3, 4, 5), "index_version": "v1",
        "bundle_sha256": "b", "mode": "rotation", "parameters": json.dumps(old["parameters"], sort_keys=True),
        "scores": [0.1, 0.9], "expert_weights": [0.25, 0.75], "manifest_location": "/m/old", "manifest_sha256": "h",
        "n_selected": 2, "n_eligible": 1, "counts_per_dataset": json.dumps({"fashion": 2}), "seconds": 0.2,
    }
    folder = service.selections_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([row], schema=OLD_SELECTIONS_SCHEMA), folder / "sel-old.parquet")
    assert pq.read_schema(folder / "sel-old.parquet").field("parameters").type == pa.string()
    service.record_selection(ws, _summary("sel-new"), scores=[0.9, 0.1], origin="service", requester="tok")
    rows = warehouse.query(ws.warehouse_path,
                           "SELECT selection_id, created_at, origin, requester, datasets, "
                           "json_extract(parameters, '$.budget')::DOUBLE AS budget, "
                           "json_extract(counts_per_dataset, '$.fashion')::BIGINT AS fashion FROM selections")
    by_id = {r["selection_id"]: r for r in rows}
    assert set(by_id) == {"sel-old", "sel-new"}
    assert by_id["sel-old"]["created_at"] == dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert by_id["sel-old"]["origin"] == "unknown" and by_id["sel-old"]["datasets"] == ["fashion"]
    assert by_id["sel-old"]["budget"] == 2.0 and by_id["sel-old"]["fashion"] == 2
    assert by_id["sel-new"]["origin"] == "service" and by_id["sel-new"]["requester"] == "tok"
    counts = warehouse.query(ws.warehouse_path, "SELECT n FROM selection_counts WHERE selection_id = 'sel-old'")
    assert counts == [{"n": 2}]


def test_copied_warehouse_reads_its_own_rows(ws, tmp_path, monkeypatch):
    service.record_selection(ws, _summary("sel-a"), scores=[0.9, 0.1])
    copy = tmp_path / "elsewhere" / "wh"
    shutil.copytree(ws.warehouse_path.parent, copy)
    service.record_selection(ws, _summary("sel-only-in-original"), scores=[0.9, 0.1])
    db = copy / ws.warehouse_path.name
    # A decoy selections/ folder in the working directory is not read either.
    decoy = tmp_path / "cwd" / "selections"
    decoy.mkdir(parents=True)
    shutil.copy(service.selections_dir(ws) / "sel-only-in-original.parquet", decoy)
    monkeypatch.chdir(decoy.parent)
    ids = lambda: [r["selection_id"] for r in warehouse.query(db, "SELECT selection_id FROM selections")]  # noqa: E731
    assert ids() == ["sel-a"]
    shutil.rmtree(ws.root)  # the original is gone: the copy does not need it
    assert ids() == ["sel-a"]
    # The duckdb command line / a bare connection: started in the warehouse folder, the view resolves too.
    monkeypatch.chdir(copy)
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT selection_id FROM selections").fetchall() == [("sel-a",)]
    finally:
        con.close()


def test_older_warehouse_upgrades_in_place_idempotently(tmp_path):
    db = tmp_path / "wh" / "nds.duckdb"
    folder = warehouse.selections_folder(db)
    folder.mkdir(parents=True)
    pq.write_table(OLD_SELECTIONS_SCHEMA.empty_table(), folder / warehouse.SELECTIONS_SCHEMA_FILE)
    con = duckdb.connect(str(db))
    con.execute(OLD_DDL.replace("{glob}", str(folder / "*.parquet")))
    con.close()

    # A read-only reader finds the old schema and upgrades it once, in place.
    rows = warehouse.query(db, "SELECT index_version, created_at FROM index_versions")
    assert rows == [{"index_version": "v0", "created_at": dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)}]
    assert pq.read_schema(folder / warehouse.SELECTIONS_SCHEMA_FILE).equals(warehouse.SELECTIONS_SCHEMA)

    def state():
        with warehouse.connect(db, read_only=True) as c:
            return (
                c.execute("SELECT table_name, data_type FROM duckdb_columns() WHERE column_name = 'created_at' "
                          "AND table_name IN ('index_versions', 'evaluations') ORDER BY 1").fetchall(),
                c.execute("SELECT version FROM schema_version").fetchall(),
                c.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'selections'").fetchone()[0],
                c.execute("SELECT evaluation_id, epoch(created_at) FROM evaluations").fetchall(),
            )

    first = state()
    assert first[0] == [("evaluations", "TIMESTAMP WITH TIME ZONE"), ("index_versions", "TIMESTAMP WITH TIME ZONE")]
    assert first[1] == [(warehouse.SCHEMA_VERSION,)]
    assert "'selections/*.parquet'" in first[2] and str(folder) not in first[2]
    assert first[3] == [("ev0", dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc).timestamp())]
    # Writers apply the DDL every time: nothing changes a second (or third) time.
    _load(db)
    with warehouse.connect(db):
        pass
    assert state() == first
    assert {r["index_version"] for r in warehouse.query(db, "SELECT index_version FROM index_versions")} == {"v0", "v1"}


def test_views_round_mass_and_list_clusters_in_order(tmp_path):
    db = tmp_path / "w.duckdb"
    n = 100
    samples = pa.table({"sample_id": [f"s{i}" for i in range(n)], "dataset": ["mnist"] * n,
                        "uri": [f"u{i}" for i in range(n)], "label": ["1"] * n, "split": ["source"] * n,
                        "sha256": [f"h{i}" for i in range(n)]})
    # Clusters inserted in descending expert order: only the view's ORDER BY lists them ascending.
    clusters = pa.Table.from_pylist([
        {"expert": e, "name": f"k{e}", "size": size, "top_dataset": "mnist", "top_dataset_share": 1.0,
         "rotation_accuracy": 0.5, "expert_sha256": f"e{e}"} for e, size in ((1, 2), (0, 98))])
    # Expert 0: 98 samples of weight 1/49 (mass 2, summed as 1.9999999999999998); expert 1: 2 of 1/2.
    weights = pa.table({"sample_id": [f"s{i}" for i in range(n)], "expert": [0] * 98 + [1] * 2,
                        "weight": [1 / 49] * 98 + [0.5] * 2})
    warehouse.load_index_version(
        db, version_row={"index_version": "v", "params": {}, "n_samples": n, "n_datasets": 1, "k": 2,
                         "bundle_sha256": "b"},
        samples=samples, clusters=clusters, weights=weights)
    raw = warehouse.query(db, "SELECT sum(weight) AS m FROM sample_weights WHERE expert = 0")[0]["m"]
    assert raw != 2.0 and raw == pytest.approx(2.0)  # the float noise the view rounds away
    mass = warehouse.query(db, "SELECT expert, weight_mass, typeof(weight_mass) AS t FROM weights_by_dataset")
    assert mass == [{"expert": 0, "weight_mass": 2.0, "t": "DECIMAL(18,9)"},
                    {"expert": 1, "weight_mass": 1.0, "t": "DECIMAL(18,9)"}]
    # Sums of the mass (a data engineer's next query) stay exact.
    assert str(warehouse.query(db, "SELECT sum(weight_mass) AS m FROM weights_by_dataset")[0]["m"]) == "3.000000000"
    assert [r["expert"] for r in warehouse.query(db, "SELECT expert FROM cluster_summary")] == [0, 1]
    assert [r["expert"] for r in warehouse.query(db, "SELECT expert FROM clusters")] == [1, 0]


def test_evaluation_rows_are_stamped_in_utc(tmp_path, monkeypatch):
    from nds.evaluate.outputs import RESULTS_SCHEMA, record_evaluation

    monkeypatch.delenv("NDS_WAREHOUSE", raising=False)
    ws = Workspace(tmp_path)
    row = {"task": "t", "domain": None, "strategy": "none", "budget": 0, "budget_fraction": 0.0, "seed": 0,
           "accuracy": 0.5, "domain_precision": None, "n_pretrain": 0, "pretrain_seconds": None,
           "finetune_seconds": 0.1}
    before = dt.datetime.now(dt.timezone.utc)
    record_evaluation(ws, pa.Table.from_pylist([row], schema=RESULTS_SCHEMA), evaluation_id="ev", index_version="v",
                      params={})
    (got,) = warehouse.query(ws.warehouse_path, "SELECT created_at, typeof(created_at) AS t FROM evaluations")
    assert got["t"] == "TIMESTAMP WITH TIME ZONE"
    assert before - dt.timedelta(seconds=1) <= got["created_at"] <= dt.datetime.now(dt.timezone.utc)
