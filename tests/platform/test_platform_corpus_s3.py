"""A corpus that lives in S3 (moto on loopback): `nds corpus publish` uploads the packaged shards (or
an old corpus's arrays) and points the catalogs' `uri`s at `s3://` objects; the index stages,
selections with presigned URLs and the client download then read the images from S3 and get
exactly the local bytes."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.cli import main as nds_main
from nds.config import Workspace
from nds.corpus.publish import publish_corpus
from nds.corpus.read import CACHE_ENV, load_catalog, load_images, load_images_at
from nds.errors import NDSError
from nds.index.extract import run_extract
from nds.params import load_params
from nds.select import service as selections

from s3fixtures import BUCKET, s3_env, s3_server  # noqa: F401  (fixtures)
from test_platform_dvc_s3 import _scores


@pytest.fixture
def published(tiny_index, s3_env, tmp_path, monkeypatch):
    """A copy of the tiny workspace whose corpus was published to S3 and deleted locally."""
    src, _ = tiny_index
    root = tmp_path / "server"
    shutil.copytree(src.root, root, ignore=shutil.ignore_patterns("*.duckdb.wal"))
    ws = Workspace(root)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    before = load_catalog(ws.data_dir, split=None)
    images = load_images_at(ws.data_dir, before.column("uri").to_pylist())
    features = np.load(ws.stage_dir("extract") / "features.npy")
    assert nds_main(["--root", str(root), "-q", "corpus", "publish", f"s3://{BUCKET}/{tmp_path.name}/corpus",
                     "--drop-local", "--no-dvc"]) == 0
    return ws, before, images, features


def test_published_corpus_reads_back_from_s3(published, tmp_path):
    ws, before, images, _ = published
    from nds.corpus.registry import list_sources

    after = load_catalog(ws.data_dir, split=None)
    assert not (ws.data_dir / "packaged").exists(), "--drop-local leaves only the catalogs"
    assert after.column("sample_id") == before.column("sample_id")
    assert after.column("sha256") == before.column("sha256")
    prefix = f"s3://{BUCKET}/{tmp_path.name}/corpus/packaged/"
    assert all(u.startswith(prefix) and ".tar#" in u for u in after.column("uri").to_pylist())
    assert {i["location"] for i in list_sources(ws.data_dir)} == {f"{prefix}{d}/" for d in set(before.column("dataset").to_pylist())}
    again = load_images_at(ws.data_dir, after.column("uri").to_pylist())
    assert np.array_equal(again, images)
    # Publishing again is a no-op: the catalogs already name their objects.
    assert publish_corpus(ws, f"s3://{BUCKET}/elsewhere")["objects"] == []
    assert load_catalog(ws.data_dir, split=None).equals(after)


def test_a_legacy_array_corpus_still_publishes(tiny_corpus_dir, s3_env, tmp_path, monkeypatch):
    """A corpus built before packaged datasets were sources (arrays + catalog.parquet)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
    from corpusfixtures import write_legacy_corpus

    src, before = write_legacy_corpus(Workspace(tiny_corpus_dir.parent), Workspace(tmp_path / "src"))
    ws = Workspace(tmp_path / "old")
    shutil.copytree(src.data_dir, ws.data_dir)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    info = publish_corpus(ws, f"s3://{BUCKET}/{tmp_path.name}/old", keep_local=False)
    after = load_catalog(ws.data_dir, split=None)
    assert not (ws.data_dir / "images").exists()
    assert info["objects"] == sorted(set(after.column("array").to_pylist()))
    assert all(u.startswith(f"s3://{BUCKET}/{tmp_path.name}/old/images/") for u in after.column("uri").to_pylist())
    images = load_images(src.data_dir, before.column("array").to_pylist(), np.asarray(before.column("row")))
    assert np.array_equal(load_images_at(ws.data_dir, after.column("uri").to_pylist()), images)


def test_extract_selection_and_download_from_an_s3_corpus(published, tmp_path, monkeypatch):
    ws, before, images, features = published
    # The extract stage streams the images from S3: same features as from the local arrays.
    run_extract(ws, load_params(ws.params_path))
    assert np.array_equal(np.load(ws.stage_dir("extract") / "features.npy"), features)
    index = pq.read_table(ws.stage_dir("extract") / "index.parquet")
    assert index.column("uri")[0].as_py().startswith("s3://")
    assert np.array_equal(np.load(ws.stage_dir("extract") / "pixels.npy"),
                          images[np.flatnonzero(np.isin(before.column("sample_id").to_pylist(),
                                                        index.column("sample_id").to_pylist()))])

    # A presigned selection needs no DVC remote: the catalog names the S3 objects.
    monkeypatch.setenv("NDS_MANIFESTS", str(tmp_path / "manifests"))
    scores = _scores(ws, tmp_path / "scores.json")
    summary = selections.run_selection(
        ws, selections.SelectRequest(scores_path=str(scores), budget=30, seed=2, presign_expiry_s=300),
        out_dir=tmp_path / "sel")
    urls = (tmp_path / "sel" / "urls.csv").read_text()
    assert "X-Amz-Expires=300" in urls and summary["rows"] == 30

    client = tmp_path / "client"
    client.mkdir()
    assert nds_main(["--root", str(client), "-q", "client", "download", "--manifest", str(tmp_path / "sel"),
                     "--out", str(tmp_path / "images")]) == 0
    from PIL import Image

    from nds.client.download import safe_name
    from nds.formats.manifest import load_manifest

    m = load_manifest(tmp_path / "sel")
    by_id = {s: i for i, s in enumerate(before.column("sample_id").to_pylist())}
    for i in range(m.num_rows):
        png = (tmp_path / "images" / safe_name(m["dataset"][i].as_py()) / safe_name(m["label"][i].as_py())
               / f"{safe_name(m['sample_id'][i].as_py())}.png")
        assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), images[by_id[m["sample_id"][i].as_py()]])


def test_publish_refuses_a_non_s3_target_and_a_missing_object(tiny_index, s3_env, tmp_path, monkeypatch):
    src, _ = tiny_index
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.data_dir, ws.data_dir)
    catalogs = {p: p.read_bytes() for p in sorted((ws.data_dir / "sources").rglob("*")) if p.is_file()}
    with pytest.raises(NDSError, match="must be an S3 location"):
        publish_corpus(ws, "file:///tmp/x")
    (ws.data_dir / "packaged" / "mnist" / "mnist-00000.tar").unlink()
    with pytest.raises(NDSError, match="mnist-00000.tar is missing"):
        publish_corpus(ws, f"s3://{BUCKET}/{tmp_path.name}")
    assert {p: p.read_bytes() for p in catalogs} == catalogs, "a failed publish leaves the catalogs as they were"

    # A catalog pointing at an object that is not in the store: one clear error at read time.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(NDSError, match="not found"):
        load_images(ws.data_dir, [f"s3://{BUCKET}/nowhere/images/x.npy"], np.asarray([0]))
    assert not any((tmp_path / "cache").rglob("*.npy")), "no partial cache file"
