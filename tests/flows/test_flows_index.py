"""End to end: the Prefect index flow on the tiny corpus, checked through what it stored."""

import duckdb
import numpy as np

from nds.corpus.read import load_catalog
from nds.formats.bundle import load_bundle
from nds.index._artifacts import load_index_order
from nds.index.experts import train_one_expert
from nds.models import experts
from nds.params import load_params


def test_index_summary(tiny_index):
    ws, summary = tiny_index
    n_source = load_catalog(ws.data_dir, split="source").num_rows
    assert summary["n_samples"] == n_source
    assert summary["k"] == 7
    assert summary["n_datasets"] >= 6
    assert summary["dvc_versioned"] is True
    assert set(summary["stage_seconds"]) == {"extract", "cluster", "train_experts", "compute_weights"}
    # Clusters on ImageNet features should follow domains (report figure: see closing note).
    print("tiny NMI(cluster, domain) =", summary["nmi_dataset"])
    assert summary["nmi_dataset"] > 0.4


def test_warehouse_tables(tiny_index):
    ws, summary = tiny_index
    con = duckdb.connect(str(ws.warehouse_path), read_only=True)
    try:
        version = summary["index_version"]
        (n_samples,) = con.execute("SELECT count(*) FROM samples WHERE index_version = ?", [version]).fetchone()
        assert n_samples == summary["n_samples"]
        (splits,) = con.execute("SELECT list(DISTINCT split) FROM samples").fetchone()
        assert splits == ["source"]  # holdout images are never indexed
        sums = con.execute(
            "SELECT expert, sum(weight), count(*) FROM sample_weights WHERE index_version = ? GROUP BY 1 ORDER BY 1",
            [version],
        ).fetchall()
        assert [r[0] for r in sums] == list(range(7))
        assert all(abs(r[1] - 1.0) < 1e-9 for r in sums)
        sizes = con.execute("SELECT expert, size FROM clusters WHERE index_version = ? ORDER BY 1", [version]).fetchall()
        assert [s for _, s in sizes] == [r[2] for r in sums]
        row = con.execute("SELECT k, n_samples, bundle_sha256, corpus_md5 FROM current_index").fetchone()
        assert row[0] == 7 and row[1] == n_samples and row[3]
        summary_rows = con.execute("SELECT expert, dataset_counts FROM cluster_summary ORDER BY expert").fetchall()
        assert sum(sum(m.values()) for _, m in summary_rows) == n_samples
    finally:
        con.close()


def test_expert_bundle(tiny_index):
    ws, summary = tiny_index
    bundle = load_bundle(ws.stage_dir("experts"))  # verifies every checksum
    assert bundle["index_version"] == summary["index_version"]
    assert bundle["k"] == 7 and len(bundle["experts"]) == 7
    assert bundle["architecture"] == "rotnet_small" and bundle["input_size"] == 32
    accs = [e["rotation_accuracy"] for e in bundle["experts"]]
    print("tiny rotation accuracy range:", min(accs), max(accs))
    assert max(accs) > 0.4  # chance is 0.25
    model, meta = experts.load_expert(ws.stage_dir("experts") / bundle["experts"][0]["file"])
    imgs = np.zeros((2, 32, 32, 3), np.uint8)
    assert model(experts.preprocess(imgs)).shape == (2, 4)


def test_features_follow_catalog_order(tiny_index):
    ws, _ = tiny_index
    feats = np.load(ws.stage_dir("extract") / "features.npy", mmap_mode="r")
    order = load_index_order(ws)
    catalog = load_catalog(ws.data_dir, split="source")
    assert feats.shape[0] == order.num_rows and feats.dtype == np.float16
    assert order.column("sample_id").to_pylist() == catalog.column("sample_id").to_pylist()
    assert np.isfinite(np.asarray(feats, dtype=np.float32)).all()


def test_rerun_reuses_trained_experts(tiny_index):
    ws, summary = tiny_index
    params = load_params(ws.params_path)
    entry = train_one_expert(ws, params, 0)
    assert entry["reused"] is True
    assert entry["sha256"] == load_bundle(ws.stage_dir("experts"))["experts"][0]["sha256"]


def test_cluster_montage_is_a_png_with_a_row_per_expert(tiny_index):
    from PIL import Image

    ws, summary = tiny_index
    img = Image.open(summary["cluster_montage"])
    assert img.format == "PNG" and img.height == 7 * 36
