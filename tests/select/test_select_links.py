"""nds.select.links: one link per manifest row (S3 objects and shards presigned, http passed through,
packaged rows as array URL + #row), and a client downloading through them (moto S3 on loopback)."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parents[1]
for extra in (TESTS / "corpus", TESTS / "platform", TESTS / "client"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from linkserver import link_server  # noqa: E402,F401  (fixture)
from s3fixtures import BUCKET, s3_env, s3_server  # noqa: E402,F401  (fixtures)
from test_client_download import _tar, image_bytes, sha, write_test_manifest  # noqa: E402

from nds.client import download as dl  # noqa: E402
from nds.config import Workspace  # noqa: E402
from nds.corpus.read import image_sha256  # noqa: E402
from nds.errors import InvalidInputError  # noqa: E402
from nds.formats.manifest import load_manifest  # noqa: E402
from nds.select.links import presign_links, presigned_sidecar  # noqa: E402
from nds.select.service import write_urls  # noqa: E402


@pytest.fixture
def stored(tmp_path, s3_env, link_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env)
    imgs = {i: image_bytes(200 + i, "JPEG" if i % 2 else "PNG") for i in range(4)}
    array = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, array)
    s3.put_object(Bucket=BUCKET, Key="links/a.png", Body=imgs[0])
    s3.put_object(Bucket=BUCKET, Key="links/shard-0.tar", Body=_tar({"k1.jpg": imgs[1], "k2.png": imgs[2]}))
    s3.put_object(Bucket=BUCKET, Key="links/corpus/images/mnist.npy", Body=buf.getvalue())
    rows = [
        {"sample_id": "obj", "uri": f"s3://{BUCKET}/links/a.png", "sha256": sha(imgs[0])},
        {"sample_id": "m1", "uri": f"s3://{BUCKET}/links/shard-0.tar#k1.jpg", "sha256": sha(imgs[1])},
        {"sample_id": "m2", "uri": f"s3://{BUCKET}/links/shard-0.tar#k2.png", "sha256": sha(imgs[2])},
        {"sample_id": "web", "uri": link_server.add("/w/3.jpg", (200, imgs[3])), "sha256": sha(imgs[3])},
        {"sample_id": "mnist-3", "uri": f"s3://{BUCKET}/links/corpus/images/mnist.npy#3",
         "sha256": image_sha256(array[3]), "dataset": "mnist"},
    ]
    return write_test_manifest(tmp_path / "sel", rows), imgs, array


def test_one_link_per_row(stored, tmp_path):
    manifest, _, _ = stored
    table = load_manifest(manifest)
    urls = presign_links(Workspace(tmp_path), table, 600)
    assert len(urls) == table.num_rows
    obj, m1, m2, web, packaged = urls
    assert urlsplit(obj).path == f"/{BUCKET}/links/a.png" and parse_qs(urlsplit(obj).query)["X-Amz-Expires"] == ["600"]
    assert m1.endswith("#k1.jpg") and m2.endswith("#k2.png") and m1.partition("#")[0] == m2.partition("#")[0]
    assert urlsplit(m1).path == f"/{BUCKET}/links/shard-0.tar"
    assert web == table.column("uri")[3].as_py()  # http passes through untouched
    assert packaged.endswith("#3") and urlsplit(packaged).path.endswith("/links/corpus/images/mnist.npy")
    info = presigned_sidecar(Workspace(tmp_path), table, 600)["info"]
    assert info["objects"] == 3 and info["passed_through"] == 1 and info["expires_s"] == 600


def test_local_objects_and_bad_expiry_are_refused(tmp_path, s3_env):
    local = write_test_manifest(tmp_path / "local", [{"sample_id": "a", "uri": "/srv/photos/a.jpg"},
                                                     {"sample_id": "b", "uri": "http://h/b.jpg"}])
    with pytest.raises(InvalidInputError, match=r"/srv/photos/a.jpg is on this server's disk"):
        presign_links(Workspace(tmp_path), load_manifest(local), 600)
    with pytest.raises(InvalidInputError, match="presign expiry"):
        presign_links(Workspace(tmp_path), load_manifest(local), 0)


def test_client_downloads_through_the_links(stored, tmp_path, s3_env, monkeypatch):
    import boto3

    manifest, imgs, array = stored
    write_urls(manifest, presigned_sidecar(Workspace(tmp_path), load_manifest(manifest), 600)["table"])
    # The object vanishes after the selection: its link is dead, the rest still download.
    boto3.client("s3", endpoint_url=s3_env).delete_object(Bucket=BUCKET, Key="links/a.png")
    # The client holds no S3 settings: every byte comes through the links.
    monkeypatch.delenv("NDS_S3_ENDPOINT_URL")
    out = tmp_path / "images"
    report = dl.download_manifest(manifest, out, retries=0, progress=False)
    assert report["primary"] == {"ok": 4, "dead": 1, "changed": 0, "corrupt": 0}
    assert (out / "web" / "cat" / "m1.jpg").read_bytes() == imgs[1]
    assert (out / "web" / "cat" / "m2.png").read_bytes() == imgs[2]
    assert (out / "web" / "cat" / "web.jpg").read_bytes() == imgs[3]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "mnist" / "cat" / "mnist-3.png")), array[3])
    # Reports and journal name objects by uri: no signature or key id is written.
    for name in (dl.REPORT_NAME, dl.JOURNAL_NAME):
        text = (out / name).read_text()
        assert "X-Amz-Signature" not in text and "X-Amz-Credential" not in text and "testing" not in text
    assert "links/a.png" in (out / dl.REPORT_NAME).read_text()
