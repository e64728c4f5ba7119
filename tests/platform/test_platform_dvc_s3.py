"""The team set-up on S3 (moto on loopback): DVC remote push/pull reproduces a selection bit for bit,
manifests and the expert bundle are published to the store, clients download via presigned URLs,
and DuckDB reads the pushed weights Parquet."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from flows.cli import main as nds_main
from nds.config import Workspace
from nds.corpus.read import load_images_at
from nds.errors import NDSError
from nds.formats.bundle import load_bundle
from nds.formats.scores import write_scores
from nds.platform import storage
from nds.platform import warehouse
from nds.select import service as selections

from s3fixtures import BUCKET, s3_env, s3_server  # noqa: F401  (fixtures)


def _dvc(root, *args):
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _scores(ws: Workspace, path):
    """A hand-made scores.json that favours expert 0 (no need to score real images here)."""
    bundle = load_bundle(ws.stage_dir("experts"), verify=False)
    k = int(bundle["k"])
    write_scores(path, bundle=bundle, mode="rotation", scores=[0.9] + [0.5] * (k - 1), seconds_per_expert=[0.0] * k)
    return path


@pytest.fixture(scope="module")
def pushed(tiny_index, s3_server, tmp_path_factory):
    """A copy of the tiny workspace with an S3 default remote, pushed by the index flow's push task."""
    from flows.index import dvc_push

    src, _ = tiny_index
    root = tmp_path_factory.mktemp("team") / "server"
    shutil.copytree(src.root, root, ignore=shutil.ignore_patterns("*.duckdb.wal"))
    _dvc(root, "remote", "add", "-d", "s3store", f"s3://{BUCKET}/dvc")
    _dvc(root, "remote", "modify", "s3store", "endpointurl", s3_server)
    assert dvc_push.fn(str(root)) == f"s3://{BUCKET}/dvc"
    return Workspace(root)


def test_fresh_clone_pulls_and_reproduces_the_selection(pushed, tmp_path, monkeypatch):
    monkeypatch.setenv("NDS_MANIFESTS", str(tmp_path / "manifests"))
    scores = _scores(pushed, tmp_path / "scores.json")
    request = selections.SelectRequest(scores_path=str(scores), budget=0.1, seed=3)
    original = selections.run_selection(pushed, request, out_dir=tmp_path / "a")

    fresh = tmp_path / "fresh"
    shutil.copytree(pushed.root, fresh, ignore=shutil.ignore_patterns("data", "artifacts", "cache", "*.duckdb*"))
    assert not (fresh / "data").exists() and not (fresh / ".dvc" / "cache").exists()
    _dvc(fresh, "pull")
    again = selections.run_selection(Workspace(fresh), request, out_dir=tmp_path / "b")
    assert again["manifest_sha256"] == original["manifest_sha256"]
    assert again["index_version"] == original["index_version"]


def test_duckdb_reads_the_pushed_weights(pushed, s3_env):
    import pyarrow.parquet as pq

    uri = storage.dvc_object_uri(pushed.root, "artifacts/weights/weights.parquet")
    assert uri.startswith(f"s3://{BUCKET}/dvc/files/md5/")
    local = pq.read_table(pushed.stage_dir("weights") / "weights.parquet")
    con = storage.duckdb_s3_connection()
    try:
        n, experts_seen = con.execute(f"SELECT count(*), count(DISTINCT expert) FROM read_parquet('{uri}')").fetchone()
    finally:
        con.close()
    assert n == local.num_rows and experts_seen == len(set(local.column("expert").to_pylist()))


def test_presigned_selection_published_and_downloaded(pushed, s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("NDS_STORAGE_URL", f"s3://{BUCKET}/nds")
    scores = _scores(pushed, tmp_path / "scores.json")
    plain = selections.run_selection(
        pushed, selections.SelectRequest(scores_path=str(scores), budget=40, seed=1), out_dir=tmp_path / "plain")
    assert nds_main(["--root", str(pushed.root), "-q", "select", "--scores", str(scores), "--budget", "40",
                     "--seed", "1", "--presign", "600", "--out", str(tmp_path / "sel")]) == 0
    sel = tmp_path / "sel"
    assert (sel / "urls.csv").exists()

    store = storage.open_storage()
    sid = plain["selection_id"]
    assert plain["manifest_location"] == f"s3://{BUCKET}/nds/manifests/{sid}/"
    assert store.list(f"manifests/{sid}") == [f"manifests/{sid}/{n}" for n in
                                              ("manifest.csv", "manifest.parquet", "summary.json")]
    # A writer connection re-renders the view for this (copied) workspace's selections folder.
    with warehouse.connect(pushed.warehouse_path) as con:
        rows = con.execute("SELECT manifest_location, manifest_sha256 FROM selections WHERE selection_id = ?", [sid]).fetchall()
    assert rows == [(plain["manifest_location"], plain["manifest_sha256"])]

    # A client with no corpus at all downloads through the URLs; the images equal the server's.
    client_ws = tmp_path / "client"
    client_ws.mkdir()
    assert nds_main(["--root", str(client_ws), "-q", "client", "download", "--manifest", str(sel),
                     "--out", str(tmp_path / "images")]) == 0
    from nds.formats.manifest import load_manifest
    from PIL import Image

    m = load_manifest(sel)
    uris = m.column("uri").to_pylist()
    assert all(u.startswith("data/packaged/") and ".tar#" in u for u in uris)
    urls = (sel / "urls.csv").read_text()
    assert f"/{BUCKET}/dvc/files/md5/" in urls and ".tar" not in urls.split("#")[0]  # the shard by its DVC hash
    expected = load_images_at(pushed.data_dir, uris)
    from nds.client.download import safe_name

    for i in (0, m.num_rows - 1):
        png = tmp_path / "images" / safe_name(m["dataset"][i].as_py()) / safe_name(m["label"][i].as_py()) \
            / f"{safe_name(m['sample_id'][i].as_py())}.png"
        assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), expected[i])
    assert sum(1 for _ in (tmp_path / "images").rglob("*.png")) == 40


def test_presign_refused_for_a_local_corpus(tiny_index, tmp_path):
    ws, _ = tiny_index
    scores = _scores(ws, tmp_path / "scores.json")
    with pytest.raises(NDSError, match="remote|locally"):
        selections.run_selection(ws, selections.SelectRequest(scores_path=str(scores), budget=10, presign_expiry_s=60),
                                 out_dir=tmp_path / "sel")
    assert not (tmp_path / "sel").exists()


def test_bundle_published_to_s3_is_fetched_by_the_client(pushed, s3_env, tmp_path, monkeypatch):
    from flows.index import publish_bundle

    monkeypatch.setenv("NDS_STORAGE_URL", f"s3://{BUCKET}/nds")
    bundle = load_bundle(pushed.stage_dir("experts"), verify=False)
    uri = publish_bundle.fn(str(pushed.root), bundle["index_version"])
    assert uri == f"s3://{BUCKET}/nds/experts/{bundle['index_version']}"
    assert nds_main(["-q", "client", "fetch-experts", uri, "--out", str(tmp_path / "experts")]) == 0
    assert load_bundle(tmp_path / "experts", verify=True)["bundle_sha256"] == bundle["bundle_sha256"]
