"""nds.client.fetch: fetching the expert bundle (local and S3), checksums verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nds.client.fetch import fetch_experts
from nds.errors import NDSError
from nds.formats.bundle import load_bundle

from clientfixtures import make_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bundle") / "experts"
    make_bundle(d)
    return d


# --------------------------------------------------------------------------- fetch_experts


def test_fetch_local_bundle(bundle_dir, tmp_path):
    out = tmp_path / "fetched"
    bundle = fetch_experts(str(bundle_dir), out)
    assert bundle == load_bundle(bundle_dir)
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "expert_000.pt", "expert_001.pt"]
    assert not list(tmp_path.glob(".fetched.tmp-*"))
    with pytest.raises(NDSError, match="not empty"):
        fetch_experts(str(bundle_dir), out)


def test_fetch_refuses_a_tampered_bundle_and_leaves_nothing(bundle_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in bundle_dir.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    (src / "expert_001.pt").write_bytes(b"tampered")
    with pytest.raises(NDSError, match="does not match bundle.json"):
        fetch_experts(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_fetch_refuses_paths_outside_the_bundle(bundle_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    bundle["experts"][0]["file"] = "../../etc/passwd"
    (src / "bundle.json").write_text(json.dumps(bundle))
    with pytest.raises(NDSError, match="not a plain file name"):
        fetch_experts(str(src), tmp_path / "out")


def test_fetch_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(NDSError, match="not a folder"):
        fetch_experts(str(tmp_path / "nope"), tmp_path / "out")
    with pytest.raises(NDSError, match="unsupported bundle source"):
        fetch_experts("gs://bucket/x", tmp_path / "out")


@pytest.fixture
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("NDS_S3_ENDPOINT_URL", f"http://{host}:{port}")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_fetch_from_s3(bundle_dir, tmp_path, s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="nds")
    for p in bundle_dir.iterdir():
        s3.upload_file(str(p), "nds", f"index/v1/experts/{p.name}")
    bundle = fetch_experts("s3://nds/index/v1/experts/", tmp_path / "out")
    assert bundle["bundle_sha256"] == load_bundle(bundle_dir)["bundle_sha256"]
    assert (tmp_path / "out" / "expert_001.pt").read_bytes() == (bundle_dir / "expert_001.pt").read_bytes()

    s3.delete_object(Bucket="nds", Key="index/v1/experts/expert_001.pt")
    with pytest.raises(NDSError, match=r"s3://nds/index/v1/experts/expert_001.pt not found"):
        fetch_experts("s3://nds/index/v1/experts", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_fetch_errors_are_typed(tmp_path):
    from nds.errors import InvalidInputError, NotFoundError

    with pytest.raises(NotFoundError):
        fetch_experts(str(tmp_path / "nope"), tmp_path / "out")
    with pytest.raises(InvalidInputError):
        fetch_experts("gs://bucket/x", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="bundle.json not found"):
        fetch_experts(str(tmp_path / "empty"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
