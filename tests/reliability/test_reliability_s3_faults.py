"""The S3 server stops in the middle of a push, a manifest write or a bundle download.

A loopback TCP proxy sits between NDS and moto and cuts every connection after a given
number of requests, then refuses all later ones (as a server that died). NDS must retry a
bounded number of times, fail with one clear error, and leave nothing partial visible:
no summary.json (a manifest's commit marker) and no bundle.json (an index version's) on S3,
no local manifest without its warehouse row, no half-fetched bundle on the client.
"""

from __future__ import annotations

import time

import boto3
import pytest

from nds.client.fetch import fetch_experts
from nds.errors import NDSError
from nds.platform import storage
from nds.platform import warehouse
from nds.select import service as selections

from relhelpers import CuttingProxy, copy_workspace, write_valid_scores
from s3fixtures import BUCKET, s3_server  # noqa: F401  (fixture)

#: Attempts after the cut are accepted and closed at once and counted. One failed publish makes
#: at most S3_MAX_ATTEMPTS for the upload plus as many for deleting its temporary key (nds/platform/storage.py);
#: s3transfer may add one more round of its own. Bounded either way: 3x the per-call limit.
MAX_REFUSED = 3 * storage.S3_MAX_ATTEMPTS


@pytest.fixture(scope="module")
def ws(tiny_index, tmp_path_factory):
    src, _ = tiny_index
    return copy_workspace(src.root, tmp_path_factory.mktemp("rel-s3") / "ws")


def _keys(endpoint: str, prefix: str) -> list[str]:
    resp = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_s3_dies_during_a_manifest_publish(ws, s3_server, tmp_path, monkeypatch):  # noqa: F811
    """Publishing one manifest is 3 files x (upload to a temp key, copy to the final key, delete the
    temp key) = 9 requests; the server dies at the 5th: the first file is published, the second half-way."""
    cut_after = 4
    scores = write_valid_scores(ws, tmp_path / "scores.json")
    proxy = CuttingProxy(s3_server, cut_after=cut_after)
    monkeypatch.setenv("NDS_MANIFESTS", str(tmp_path / "manifests"))
    monkeypatch.setenv("NDS_STORAGE_URL", f"s3://{BUCKET}/cut{cut_after}")
    monkeypatch.setenv("NDS_S3_ENDPOINT_URL", proxy.endpoint)
    request = selections.SelectRequest(scores_path=str(scores), budget=25, seed=4, out_name="mine")
    rows_before = warehouse.query(ws.warehouse_path, "SELECT count(*) AS n FROM selections")[0]["n"]
    sid = selections.new_selection_id()
    t0 = time.monotonic()
    try:
        with pytest.raises(NDSError, match=r"cannot reach S3 at .* check NDS_S3_ENDPOINT_URL"):
            selections.run_selection(ws, request, selection_id=sid)
    finally:
        proxy.close()
    seconds = time.monotonic() - t0
    assert proxy.cut.is_set()
    # Bounded retries: after the cut the client tried again, but no more than its limit.
    assert 1 <= proxy.refused <= MAX_REFUSED, proxy.refused
    assert seconds < 60
    # Nothing partial visible: no commit marker on S3, no local manifest, no warehouse row.
    published = _keys(s3_server, f"cut{cut_after}/manifests/{sid}/")
    assert f"cut{cut_after}/manifests/{sid}/manifest.parquet" in published  # the cut was mid-publish
    assert f"cut{cut_after}/manifests/{sid}/summary.json" not in published
    assert not (tmp_path / "manifests" / "mine").exists()
    assert not list((tmp_path / "manifests").glob(".mine.tmp-*"))
    assert warehouse.query(ws.warehouse_path, "SELECT count(*) AS n FROM selections")[0]["n"] == rows_before

    # The server is back: the same request under the same name succeeds and equals a clean run.
    monkeypatch.setenv("NDS_S3_ENDPOINT_URL", s3_server)
    again = selections.run_selection(ws, request, selection_id=sid)
    # (A temporary key whose delete failed while the server was down stays behind; every reader
    # ignores `*.tmp-*` keys, see nds.platform.storage.S3Storage.list.)
    assert [k for k in _keys(s3_server, f"cut{cut_after}/manifests/{sid}/") if ".tmp-" not in k] == [
        f"cut{cut_after}/manifests/{sid}/{n}" for n in ("manifest.csv", "manifest.parquet", "summary.json")]
    clean = selections.run_selection(ws, request.model_copy(update={"out_name": "clean"}))
    assert again["manifest_sha256"] == clean["manifest_sha256"]
    print(f"cut after {cut_after} requests: {proxy.refused} retries refused, failed in {seconds:.1f}s")


def test_s3_dies_during_a_bundle_push_and_a_client_fetch(ws, s3_server, tmp_path, monkeypatch):  # noqa: F811
    """The index version's bundle is pushed with bundle.json last; a cut push exposes no version,
    and a cut fetch leaves the client with nothing."""
    from flows.index import publish_bundle

    version = selections.load_current_index(ws).version
    proxy = CuttingProxy(s3_server, cut_after=5)
    monkeypatch.setenv("NDS_STORAGE_URL", f"s3://{BUCKET}/team")
    monkeypatch.setenv("NDS_S3_ENDPOINT_URL", proxy.endpoint)
    t0 = time.monotonic()
    try:
        with pytest.raises(NDSError, match="cannot reach S3"):
            publish_bundle.fn(str(ws.root), version)
    finally:
        proxy.close()
    print(f"bundle push cut: {proxy.refused} attempts refused, failed in {time.monotonic() - t0:.1f}s")
    assert 1 <= proxy.refused <= MAX_REFUSED, proxy.refused
    assert f"team/experts/{version}/bundle.json" not in _keys(s3_server, f"team/experts/{version}/")
    # A client asking for the half-pushed version is told it is not there; nothing lands locally.
    monkeypatch.setenv("NDS_S3_ENDPOINT_URL", s3_server)
    with pytest.raises(NDSError, match=r"bundle\.json not found; check the bundle URL"):
        fetch_experts(f"s3://{BUCKET}/team/experts/{version}", tmp_path / "half")
    assert not (tmp_path / "half").exists()

    # Pushed completely, then the server dies while the client downloads the experts.
    publish_bundle.fn(str(ws.root), version)
    proxy = CuttingProxy(s3_server, cut_after=4)
    monkeypatch.setenv("NDS_S3_ENDPOINT_URL", proxy.endpoint)
    t0 = time.monotonic()
    try:
        with pytest.raises(NDSError, match=r"cannot reach S3 for s3://.* check NDS_S3_ENDPOINT_URL"):
            fetch_experts(f"s3://{BUCKET}/team/experts/{version}", tmp_path / "fetched")
    finally:
        proxy.close()
    print(f"bundle fetch cut: {proxy.refused} attempts refused, failed in {time.monotonic() - t0:.1f}s")
    assert 1 <= proxy.refused <= MAX_REFUSED, proxy.refused
    assert not (tmp_path / "fetched").exists() and not list(tmp_path.glob(".fetched.tmp-*"))
    monkeypatch.setenv("NDS_S3_ENDPOINT_URL", s3_server)
    bundle = fetch_experts(f"s3://{BUCKET}/team/experts/{version}", tmp_path / "fetched")
    assert bundle["index_version"] == version
