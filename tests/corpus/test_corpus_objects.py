"""nds.corpus.objects: one object by uri from a file, S3 (moto on loopback), HTTP (a loopback server
that fails on purpose) and tar shards; retries only where a retry can help."""

from __future__ import annotations

import io
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # s3fixtures lives there

from linkserver import link_server  # noqa: E402,F401  (fixture)
from s3fixtures import BUCKET, s3_env, s3_server  # noqa: E402,F401  (fixtures)

from nds.corpus import shards  # noqa: E402
from nds.corpus.objects import (  # noqa: E402
    ObjectAccessError,
    ObjectNotFoundError,
    ObjectUnreachableError,
    fetch_bytes,
    object_version,
)
from nds.errors import InvalidInputError, NotFoundError, StorageError  # noqa: E402

FAST = {"retries": 2, "backoff_s": 0.01, "timeout_s": 5}


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_local_paths_and_file_urls(tmp_path):
    path = tmp_path / "a b" / "#1.jpg"  # '#' outside a tar name is part of the file name
    path.parent.mkdir()
    path.write_bytes(b"\xff\xd8jpeg")
    assert fetch_bytes(str(path)) == b"\xff\xd8jpeg"
    assert fetch_bytes(path.as_uri()) == b"\xff\xd8jpeg"  # file:///.../a%20b/%231.jpg
    stat = path.stat()
    assert object_version(str(path)) == f"{stat.st_size}-{stat.st_mtime_ns}"
    with pytest.raises(ObjectNotFoundError, match="missing.png not found"):
        fetch_bytes(str(tmp_path / "missing.png"))
    with pytest.raises(ObjectNotFoundError):
        object_version(str(tmp_path / "missing.png"))
    with pytest.raises(InvalidInputError, match="unsupported object uri ftp://h/x.png"):
        fetch_bytes("ftp://h/x.png")
    with pytest.raises(InvalidInputError, match="retries"):
        fetch_bytes(str(path), retries=-1)


def test_http_retries_transient_failures_only(link_server):
    ok = link_server.add("/flaky.png", (500, b""), (503, b""), (200, b"png-bytes"))
    assert fetch_bytes(ok, **FAST) == b"png-bytes"
    assert link_server.hits["/flaky.png"] == 3

    for path, status, error in (("/gone.png", 404, ObjectNotFoundError), ("/private.png", 403, ObjectAccessError)):
        url = link_server.add(path, (status, b"no"))
        with pytest.raises(error, match=f"answered HTTP {status}"):
            fetch_bytes(url, **FAST)
        assert link_server.hits[path] == 1, "a 403/404 is final: no retry"
    assert issubclass(ObjectNotFoundError, NotFoundError) and issubclass(ObjectAccessError, StorageError)

    down = link_server.add("/down.png", (502, b""))
    with pytest.raises(ObjectUnreachableError, match=r"failed 3 time\(s\), last: HTTP 502"):
        fetch_bytes(down, **FAST)
    assert link_server.hits["/down.png"] == 3

    cut = link_server.add("/cut.png", ("cut", b"x" * 1000), (200, b"x" * 1000))
    assert fetch_bytes(cut, **FAST) == b"x" * 1000  # a truncated transfer is retried, not returned
    assert link_server.hits["/cut.png"] == 2


def test_http_timeout_and_no_signature_in_messages(link_server):
    slow = link_server.add("/slow.png", (200, b"late", 1.0))
    t0 = time.perf_counter()
    with pytest.raises(ObjectUnreachableError, match="no answer within 0.2 s") as info:
        fetch_bytes(slow + "?X-Amz-Signature=s3cr3t&X-Amz-Credential=KEYID", timeout_s=0.2, retries=1, backoff_s=0.01)
    assert time.perf_counter() - t0 < 1.9
    assert "s3cr3t" not in str(info.value) and "KEYID" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ObjectUnreachableError, match="ConnectError"):
        fetch_bytes("http://127.0.0.1:9/x.png", timeout_s=1, retries=0)


def test_http_version_is_the_etag(link_server):
    url = link_server.add("/v.png", (200, b"one"))
    v1 = object_version(url, **FAST)
    link_server.add("/v.png", (200, b"two"))
    assert v1 and object_version(url, **FAST) != v1
    with pytest.raises(ObjectNotFoundError):
        object_version(link_server.url("/none.png"), **FAST)


def test_s3_objects(s3_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    client.put_object(Bucket=BUCKET, Key="objects/cat 1.jpg", Body=b"jpeg-bytes")
    uri = f"s3://{BUCKET}/objects/cat 1.jpg"
    assert fetch_bytes(uri) == b"jpeg-bytes"
    assert object_version(uri) == client.head_object(Bucket=BUCKET, Key="objects/cat 1.jpg")["ETag"].strip('"')
    client.put_object(Bucket=BUCKET, Key="objects/50%20off #1?.jpg", Body=b"odd-key")  # raw key text
    assert fetch_bytes(f"s3://{BUCKET}/objects/50%20off #1?.jpg") == b"odd-key"
    with pytest.raises(ObjectNotFoundError, match="objects/none.jpg not found"):
        fetch_bytes(f"s3://{BUCKET}/objects/none.jpg")
    with pytest.raises(ObjectNotFoundError, match="no-such-bucket"):
        fetch_bytes("s3://no-such-bucket/x.jpg")
    with pytest.raises(InvalidInputError, match="s3://bucket/key"):
        fetch_bytes(f"s3://{BUCKET}")


def test_tar_members_local_compressed_http_and_s3(tmp_path, link_server, s3_env):
    import boto3

    members = {"000001.jpg": b"first", "000001.cls": b"3", "dir/000002.png": b"second"}
    shard = tmp_path / "shard-0.tar"
    shard.write_bytes(_tar(members))
    assert fetch_bytes(f"{shard}#000001.jpg") == b"first"
    assert fetch_bytes(f"{shard.as_uri()}#dir/000002.png") == b"second"
    assert object_version(f"{shard}#000001.jpg") == object_version(str(shard))
    with pytest.raises(ObjectNotFoundError, match="no member 'nope.jpg'"):
        fetch_bytes(f"{shard}#nope.jpg")
    gz = tmp_path / "shard-1.tar.gz"
    gz.write_bytes(_tar(members, "w:gz"))
    assert fetch_bytes(f"{gz}#dir/000002.png") == b"second"
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ObjectNotFoundError, match="not a readable tar"):
        fetch_bytes(f"{broken}#a.jpg")

    # A remote shard is fetched once per process, however many threads read its members.
    shards.clear_shard_cache()
    url = link_server.add("/shards/s.tar", (200, shard.read_bytes(), 0.2))
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda m=m: got.append(fetch_bytes(f"{url}#{m}", **FAST)))
               for m in ["000001.jpg", "dir/000002.png"] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(got) == sorted([b"first", b"second"] * 4)
    assert link_server.hits["/shards/s.tar"] == 1
    # A presigned shard link: the query comes before #member.
    signed = link_server.add("/shards/signed.tar", (200, shard.read_bytes()))
    assert fetch_bytes(f"{signed}?X-Amz-Signature=abc#dir/000002.png", **FAST) == b"second"

    boto3.client("s3", endpoint_url=s3_env).put_object(Bucket=BUCKET, Key="shards/s.tar", Body=shard.read_bytes())
    assert fetch_bytes(f"s3://{BUCKET}/shards/s.tar#000001.cls") == b"3"
    with pytest.raises(ObjectNotFoundError):
        fetch_bytes(f"s3://{BUCKET}/shards/missing.tar#000001.cls")
    shards.clear_shard_cache()
