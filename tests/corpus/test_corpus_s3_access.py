"""S3 refusing access (HTTP 403) to `nds source add` and `nds client download`, on a real moto server.

moto checks credentials only once IAM authentication is on, and then only identity policies:
a bucket policy is stored but never enforced (moto 5.2), and a presigned URL answers 500 (its
request has no Authorization header). So the server below is moto in its own process (the
setting is global to a process: the session's open `s3_server` must not start refusing), set up
without auth, then switched on through ``POST /moto-api/reset-auth``; the denial is an IAM user
policy (``Deny s3:GetObject`` on one prefix), which S3 answers exactly as a denying bucket
policy would: 403 AccessDenied. Unknown keys answer 403 InvalidAccessKeyId, a wrong secret 403
SignatureDoesNotMatch. The server's request log counts the GETs a refused object received.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main as nds_main  # noqa: E402
from nds.client import download as dl  # noqa: E402
from nds.config import Workspace  # noqa: E402
from nds.corpus.registry import add_source  # noqa: E402

BUCKET = "nds-private"
PREFIX = "photos/"
DENIED = "photos/dogs/"  # listed, but GetObject (and HEAD) refused
ADMIN = {"AWS_ACCESS_KEY_ID": "admin", "AWS_SECRET_ACCESS_KEY": "admin", "AWS_DEFAULT_REGION": "us-east-1"}
NDS = Path(sys.executable).parent / "nds"
SERVER_START_S = 30


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


OBJECTS = {f"{PREFIX}cats/{i}.png": _png(i) for i in range(3)} | {f"{DENIED}{i}.png": _png(10 + i) for i in range(2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DenyingS3:
    """moto in a child process, with IAM auth on; users `reader` (denied DENIED) and `blind` (cannot list)."""

    def __init__(self, log: Path):
        self.log = log
        self.endpoint = f"http://127.0.0.1:{_free_port()}"
        self.keys: dict[str, dict] = {}
        port = self.endpoint.rsplit(":", 1)[1]
        with open(log, "wb") as fh:  # werkzeug writes one line per request to stderr
            self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                                          stdout=fh, stderr=subprocess.STDOUT,
                                          env={**os.environ, **ADMIN, "PYTHONUNBUFFERED": "1"})

    def start(self) -> "DenyingS3":
        import boto3
        import httpx

        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                httpx.get(f"{self.endpoint}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError(f"moto did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        admin = {"endpoint_url": self.endpoint, "region_name": "us-east-1", "aws_access_key_id": "admin",
                 "aws_secret_access_key": "admin"}
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        s3.create_bucket(Bucket=BUCKET)
        for key, data in OBJECTS.items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        policies = {
            "reader": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                       {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/{DENIED}*"}],
            "blind": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                      {"Effect": "Deny", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{BUCKET}"}],
        }
        for user, statements in policies.items():
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": statements}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            self.keys[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()  # from now on: IAM
        return self

    def env(self, user: str | None = None, **override) -> dict:
        creds = self.keys[user] if user else {}
        return {"NDS_S3_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1", **creds, **override}

    def gets(self, key: str) -> int:
        """GET requests the server logged for `key` so far."""
        return self.log.read_text().count(f'"GET /{BUCKET}/{key} ')

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)


@pytest.fixture(scope="module")
def denying_s3(tmp_path_factory):
    server = DenyingS3(tmp_path_factory.mktemp("moto-auth") / "requests.log")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def reader(denying_s3, monkeypatch):
    """This process reads S3 as `reader`. (nds keeps one S3 client per process and endpoint: every
    in-process test of this module uses these same credentials; other identities run as `nds`.)"""
    for k, v in denying_s3.env("reader").items():
        monkeypatch.setenv(k, v)
    return denying_s3


def write_test_manifest(folder: Path, rows: list[dict]) -> Path:
    """A manifest of `rows` (sample_id, uri, sha256) in rank order, as `nds select` writes one."""
    import pyarrow as pa

    from nds.formats.manifest import MANIFEST_COLUMNS, write_manifest

    n = len(rows)
    cols = {"sample_id": [r["sample_id"] for r in rows], "dataset": ["pets"] * n, "uri": [r["uri"] for r in rows],
            "label": ["cat"] * n, "probability": [1.0 / n] * n, "expert": [0] * n, "rank": list(range(n)),
            "sha256": [r["sha256"] for r in rows]}
    types = {"probability": pa.float64(), "expert": pa.int64(), "rank": pa.int64()}
    write_manifest(pa.table({c: pa.array(cols[c], types.get(c, pa.string())) for c in MANIFEST_COLUMNS}), folder,
                   summary_extra={})
    return folder


def _tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` (hidden ones included) -> sha256 of a file's bytes ('' for a folder)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(folder.rglob("*"))}


def test_connecting_s3_denies_what_this_module_expects(reader):
    """The premise: moto refuses the denied prefix and the bad credentials (else the tests below prove nothing)."""
    import boto3
    from botocore.exceptions import ClientError

    def code(call, **creds) -> str:
        client = boto3.client("s3", endpoint_url=reader.endpoint, region_name="us-east-1", **creds)
        try:
            call(client)
        except ClientError as exc:
            return f"{exc.response['ResponseMetadata']['HTTPStatusCode']} {exc.response['Error']['Code']}"
        return "200"

    good = {"aws_access_key_id": reader.keys["reader"]["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": reader.keys["reader"]["AWS_SECRET_ACCESS_KEY"]}
    assert code(lambda c: c.get_object(Bucket=BUCKET, Key=f"{PREFIX}cats/0.png"), **good) == "200"
    assert code(lambda c: c.get_object(Bucket=BUCKET, Key=f"{DENIED}0.png"), **good) == "403 AccessDenied"
    assert code(lambda c: c.list_objects_v2(Bucket=BUCKET), aws_access_key_id="AKIANOSUCHKEY",
                aws_secret_access_key="x") == "403 InvalidAccessKeyId"


@pytest.mark.parametrize("who, code", [
    ("unknown-key", "InvalidAccessKeyId"), ("wrong-secret", "SignatureDoesNotMatch"), ("blind", "AccessDenied")])
def test_refused_listing_is_one_error_line_and_leaves_data_untouched(denying_s3, tmp_path, who, code):
    ws = Workspace.from_env(tmp_path / "ws")
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "a.png").write_bytes(_png(99))
    add_source(ws, "own", str(tmp_path / "own"), progress=False, track=False)
    before = _tree(ws.data_dir)
    creds = {"unknown-key": {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY", "AWS_SECRET_ACCESS_KEY": "x"},
             "wrong-secret": {**denying_s3.keys["reader"], "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
             "blind": denying_s3.keys["blind"]}[who]
    env = {**os.environ, **denying_s3.env(), **creds}
    r = subprocess.run([str(NDS), "--root", str(ws.root), "-q", "source", "add", "pets", "--from",
                        f"s3://{BUCKET}/{PREFIX}"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"error: cannot list s3://{BUCKET}/{PREFIX} ({code}): check the credentials "
                                     "and permissions"], r.stderr
    assert r.stdout == ""
    assert _tree(ws.data_dir) == before


def test_objects_refused_while_the_listing_works_are_counted_skips(reader, tmp_path, capsys):
    ws = Workspace.from_env(tmp_path / "ws")
    denied = sorted(k for k in OBJECTS if k.startswith(DENIED))
    before = [reader.gets(k) for k in denied]
    assert nds_main(["--root", str(ws.root), "-q", "source", "add", "pets", "--from", f"s3://{BUCKET}/{PREFIX}",
                     "--no-dvc"]) == 0
    out = capsys.readouterr().out
    assert "source pets (s3): 3 images, 1 labels" in out and "skipped: 2 denied" in out
    info = json.loads((ws.data_dir / "sources" / "pets" / "source.json").read_text())
    assert info["counts"]["registered"] == 3 and info["counts"]["denied"] == 2 and info["counts"]["unreachable"] == 0
    assert info["skipped_examples"]["denied"] == [f"s3://{BUCKET}/{k}" for k in denied]
    assert [reader.gets(k) - n for k, n in zip(denied, before)] == [1, 1], "a 403 is final: not retried"


def test_download_counts_a_refused_s3_link_as_dead_without_retrying(reader, tmp_path, capsys):
    ok, refused = f"{PREFIX}cats/1.png", f"{DENIED}1.png"
    manifest = write_test_manifest(tmp_path / "sel", [
        {"sample_id": "pets/cats/1.png", "uri": f"s3://{BUCKET}/{ok}", "sha256": hashlib.sha256(OBJECTS[ok]).hexdigest()},
        {"sample_id": "pets/dogs/1.png", "uri": f"s3://{BUCKET}/{refused}",
         "sha256": hashlib.sha256(OBJECTS[refused]).hexdigest()}])
    before = reader.gets(refused)
    out = tmp_path / "images"
    assert nds_main(["-q", "client", "download", str(manifest), "--out", str(out), "--retries", "3"]) == 0
    assert "1 of 2 selected ok, 1 dead" in capsys.readouterr().out
    report = json.loads((out / dl.REPORT_NAME).read_text())
    assert report["primary"] == {"ok": 1, "dead": 1, "changed": 0, "corrupt": 0}
    (failure,) = report["failures"]
    assert failure["sample_id"] == "pets/dogs/1.png" and failure["status"] == "dead"
    assert failure["error"] == f"S3 refused s3://{BUCKET}/{refused} (AccessDenied): check the credentials"
    assert reader.gets(refused) - before == 1, "a 403 is final: neither boto3 nor nds retries it"
    assert [p.read_bytes() for p in out.rglob("*.png")] == [OBJECTS[ok]]


def test_refused_s3_links_in_a_link_table_are_counted_skips(reader, tmp_path):
    ok, refused, missing = (f"s3://{BUCKET}/{k}" for k in (f"{PREFIX}cats/2.png", f"{DENIED}0.png", "photos/none.png"))
    table = tmp_path / "links.csv"
    table.write_text(f"url,label\n{ok},cat\n{refused},dog\n{missing},dog\n")
    info = add_source(Workspace.from_env(tmp_path / "ws"), "links", str(table), progress=False, track=False)
    assert (info["counts"]["registered"], info["counts"]["denied"], info["counts"]["missing"]) == (1, 1, 1)
    assert info["skipped_examples"]["denied"] == [refused] and info["skipped_examples"]["missing"] == [missing]


def test_check_with_refused_credentials_is_one_error_not_a_report_of_missing_objects(reader, tmp_path, capsys):
    ws = Workspace.from_env(tmp_path / "ws")
    add_source(ws, "pets", f"s3://{BUCKET}/{PREFIX}", progress=False, track=False)
    before = _tree(ws.data_dir)
    env = {**os.environ, **reader.env(), "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY", "AWS_SECRET_ACCESS_KEY": "x"}
    r = subprocess.run([str(NDS), "--root", str(ws.root), "-q", "source", "check", "pets"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines() == [f"error: cannot list s3://{BUCKET}/{PREFIX} (InvalidAccessKeyId): check the "
                                     "credentials and permissions"]
    assert _tree(ws.data_dir) == before
    # With access to the listing, the objects refused at registration are not drift: listed, not in the catalog.
    assert nds_main(["--root", str(ws.root), "-q", "source", "check", "pets"]) == 0
    assert "source pets: 3 checked, 3 unchanged, 0 changed, 0 missing, 2 listed but not in the catalog" in \
        capsys.readouterr().out
