"""nds.platform.storage: one interface over a local folder and S3 (moto on loopback), and DuckDB on S3."""

from __future__ import annotations

import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nds.errors import InvalidInputError, NDSError, NotFoundError, StorageError
from nds.platform import storage

from s3fixtures import BUCKET, s3_env, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return storage.open_storage((tmp_path / "store").as_uri())
    request.getfixturevalue("s3_env")
    return storage.open_storage(f"s3://{BUCKET}/{tmp_path.name}")


def test_roundtrip_list_exists(store, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"\x00\x01payload")
    uri = store.put_file("x/a.bin", src)
    assert uri == store.uri("x/a.bin") and uri.endswith("/x/a.bin")
    store.put_bytes("x/y/b.txt", b"hello")
    assert store.get_bytes("x/y/b.txt") == b"hello"
    assert store.get_file("x/a.bin", tmp_path / "back" / "a.bin").read_bytes() == b"\x00\x01payload"
    assert store.exists("x/a.bin") and not store.exists("x/missing")
    # Atomic publish leaves no temporary object behind.
    assert store.list() == ["x/a.bin", "x/y/b.txt"]
    assert store.list("x/y") == ["x/y/b.txt"]
    with pytest.raises(NDSError, match="not found"):
        store.get_bytes("x/missing")
    with pytest.raises(NDSError, match="relative path"):
        store.put_bytes("../escape", b"")


def test_failures_are_told_apart_by_subclass(store, tmp_path):
    """Missing objects are NotFoundError (exists() answers False), bad keys InvalidInputError."""
    with pytest.raises(NotFoundError):
        store.get_bytes("nothing/here")
    with pytest.raises(NotFoundError):
        store.get_file("nothing/here", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert store.exists("nothing/here") is False
    with pytest.raises(InvalidInputError):
        store.get_bytes("/absolute")


def test_missing_bucket_is_a_storage_error_not_absence(s3_env):
    store = storage.open_storage("s3://no-such-bucket-here/p")
    with pytest.raises(StorageError, match="does not exist"):
        store.get_bytes("k")


def test_fetch_object_is_atomic_and_reports_missing(s3_env, tmp_path):
    store = storage.open_storage(f"s3://{BUCKET}/fetch")
    store.put_bytes("obj.bin", b"payload")
    dest = tmp_path / "d" / "obj.bin"
    assert storage.fetch_object(store.uri("obj.bin"), dest) == dest and dest.read_bytes() == b"payload"
    with pytest.raises(NotFoundError):
        storage.fetch_object(store.uri("missing.bin"), tmp_path / "d" / "missing.bin")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["obj.bin"]  # no temporary left behind
    with pytest.raises(NotFoundError, match="push the data first"):
        storage.presign_s3_uri(store.uri("missing.bin"), 60, must_exist=True)
    with pytest.raises(InvalidInputError):
        storage.fetch_object("https://example.com/x", dest)


def test_env_setting_picks_the_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("NDS_STORAGE_URL", (tmp_path / "s").as_uri())
    assert isinstance(storage.open_storage(), storage.LocalStorage)
    monkeypatch.setenv("NDS_STORAGE_URL", "s3://bucket/prefix")
    s3 = storage.open_storage()
    assert isinstance(s3, storage.S3Storage) and s3.uri("k") == "s3://bucket/prefix/k"
    monkeypatch.delenv("NDS_STORAGE_URL")
    with pytest.raises(NDSError, match="NDS_STORAGE_URL"):
        storage.open_storage()
    for bad in ("http://host/x", "s3:///nobucket", "file://host/path"):
        with pytest.raises(NDSError):
            storage.open_storage(bad)


def test_presign_s3_and_refuse_local(s3_env, tmp_path):
    s3 = storage.open_storage(f"s3://{BUCKET}/presign")
    s3.put_bytes("obj", b"abc")
    with urllib.request.urlopen(s3.presign("obj", 60), timeout=10) as resp:
        assert resp.read() == b"abc"
    with pytest.raises(NDSError, match="7 days"):
        s3.presign("obj", 8 * 24 * 3600)
    with pytest.raises(NDSError, match="local folder"):
        storage.open_storage(tmp_path.as_uri()).presign("obj", 60)


def test_unreachable_endpoint_fails_clearly_in_bounded_time(monkeypatch):
    monkeypatch.setenv("NDS_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match="cannot reach S3"):
        storage.open_storage("s3://bucket/p").get_bytes("k")
    assert time.perf_counter() - t0 < 20


def test_duckdb_reads_parquet_on_s3(s3_env, tmp_path):
    pq.write_table(pa.table({"expert": [0, 1, 1], "weight": [1.0, 0.5, 0.5]}), tmp_path / "w.parquet")
    storage.open_storage(f"s3://{BUCKET}/duck").put_file("w/part-0.parquet", tmp_path / "w.parquet")
    con = storage.duckdb_s3_connection()
    try:
        got = con.execute(f"SELECT count(*), sum(weight) FROM read_parquet('s3://{BUCKET}/duck/w/*.parquet')").fetchone()
    finally:
        con.close()
    assert got == (3, 2.0)


def test_duckdb_needs_credentials(monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(NDSError, match="AWS_SECRET_ACCESS_KEY"):
        storage.duckdb_s3_connection()
