"""Credentials stay in the environment, presigned URLs expire, selection ids cannot be guessed.

One full team run on loopback S3 with distinctive fake credentials (DVC push, bundle publish,
`nds select --presign` through the select flow, fetch, download) and then every byte it
produced is searched: the workspace, the client's folders, every object in the bucket, the
console output and the log records.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import boto3
import pyarrow.csv as pacsv
import pytest

from nds.client.download import check_not_expired
from nds.errors import NDSError
from nds.select import service as selections

from relhelpers import copy_workspace, run_cli, write_valid_scores
from s3fixtures import BUCKET, s3_server  # noqa: F401  (fixture)

FAKE_KEY_ID = "AKIARELIABILITY7QX3Z"
FAKE_SECRET = "nds-rel-SECRET-8c1f0e9d2b7a4f35a6e1d0c9b8a7f6e5"
REPO = Path(__file__).resolve().parents[2]


def _dvc(root: Path, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def team_run(tiny_index, s3_server, tmp_path_factory):  # noqa: F811
    """Everything a presigned selection touches, run with fake credentials; returns what to search."""
    from flows.index import dvc_push, publish_bundle

    src, _ = tiny_index
    base = tmp_path_factory.mktemp("rel-sec")
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    mp.setenv("NDS_S3_ENDPOINT_URL", s3_server)
    mp.setenv("NDS_STORAGE_URL", f"s3://{BUCKET}/sec")
    mp.setenv("NDS_MANIFESTS", str(base / "manifests"))
    # boto3's default session caches the first credentials it resolved (the fixture's "testing"):
    # start a fresh one so every client in this run signs with the fake credentials above.
    mp.setattr(boto3, "DEFAULT_SESSION", None)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        ws = copy_workspace(src.root, base / "ws")
        _dvc(ws.root, "remote", "add", "-d", "s3store", f"s3://{BUCKET}/dvc")
        _dvc(ws.root, "remote", "modify", "s3store", "endpointurl", s3_server)
        assert dvc_push.fn(str(ws.root)) == f"s3://{BUCKET}/dvc"
        version = selections.load_current_index(ws).version
        publish_bundle.fn(str(ws.root), version)
        scores = write_valid_scores(ws, base / "scores.json")
        outputs = []
        for argv in (
            ["select", "--scores", str(scores), "--budget", "30", "--presign", "900", "--out", str(base / "sel")],
            ["select", "--scores", str(scores), "--budget", "30", "--presign", "1", "--out", str(base / "short")],
            ["client", "fetch-experts", f"s3://{BUCKET}/sec/experts/{version}", "--out", str(base / "experts")],
            ["client", "download", "--manifest", str(base / "sel"), "--out", str(base / "images")],
        ):
            rc, out, err = run_cli("--root", str(ws.root), "-v", *argv)
            assert rc == 0, err
            outputs.append(out + err)
    finally:
        logging.getLogger().removeHandler(handler)
        mp.undo()
    bucket = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="x", aws_secret_access_key="x",
                          region_name="us-east-1")
    objects = {}
    for page in bucket.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for o in page.get("Contents", []):
            objects[o["Key"]] = bucket.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    logs = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in records)
    return {"base": base, "ws": ws, "objects": objects, "console": "\n".join(outputs), "logs": logs}


def _needles(value: str) -> list[bytes]:
    return [value.encode(), quote(value, safe="").encode()]


def test_no_credential_in_any_output(team_run):
    files = [p for p in team_run["base"].rglob("*") if p.is_file()]
    assert len(files) > 100 and len(team_run["objects"]) > 10
    places = {str(p): p.read_bytes() for p in files}
    places.update({f"s3://{BUCKET}/{k}": v for k, v in team_run["objects"].items()})
    places["console output"] = team_run["console"].encode()
    places["log records"] = team_run["logs"].encode()
    leaks = [where for where, data in places.items() for n in _needles(FAKE_SECRET) if n in data]
    assert not leaks, f"the secret key leaked into {leaks}"
    # The access key id is not a secret, but SigV4 presigned URLs must carry it; nowhere else.
    id_leaks = [where for where, data in places.items() for n in _needles(FAKE_KEY_ID)
                if n in data and not where.endswith("urls.csv")]
    assert not id_leaks, f"the access key id was written into {id_leaks}"
    assert FAKE_KEY_ID.encode() in places[str(team_run["base"] / "sel" / "urls.csv")]  # the search can hit
    print(f"searched {len(places)} files/objects/streams ({sum(map(len, places.values())) / 1e6:.1f} MB): no secret")


def test_presigned_urls_carry_the_configured_expiry(team_run):
    for folder, seconds in (("sel", 900), ("short", 1)):
        urls = pacsv.read_csv(team_run["base"] / folder / "urls.csv").column("url").to_pylist()
        expiries = {parse_qs(urlsplit(u).query)["X-Amz-Expires"][0] for u in urls}
        assert expiries == {str(seconds)}


def test_client_refuses_an_expired_presigned_url_before_fetching(team_run, tmp_path):
    time.sleep(1.5)  # the `short` selection's URLs were valid for 1 s; moto would still serve them
    rc, _, err = run_cli("-q", "client", "download", "--manifest", str(team_run["base"] / "short"),
                         "--out", str(tmp_path / "images"))
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(r"presigned URLs in .*urls\.csv expired at .*nds select --presign", lines[0])
    assert not (tmp_path / "images").exists() and not list(tmp_path.glob(".images.tmp-*"))


def test_expiry_check_boundaries():
    signed = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    url = f"http://h/b/k?X-Amz-Date={signed:%Y%m%dT%H%M%SZ}&X-Amz-Expires=600&X-Amz-Signature=0#3"
    check_not_expired([url], Path("urls.csv"), now=signed + timedelta(seconds=599))
    with pytest.raises(NDSError, match=r"expired at 2026-01-01T12:10:00"):
        check_not_expired([url], Path("urls.csv"), now=signed + timedelta(seconds=600))
    with pytest.raises(NDSError, match="expired"):
        check_not_expired(["http://h/b/k?Expires=1000&Signature=x#0"], Path("urls.csv"))


def test_selection_ids_are_unguessable(team_run):
    ids = [selections.new_selection_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    pattern = re.compile(r"^sel-\d{8}T\d{6}-([0-9a-f]{32})$")
    randoms = [pattern.match(i).group(1) for i in ids]
    # 128 random bits: no shared prefix structure between ids made in the same second.
    assert len({r[:8] for r in randoms}) > 1990
    summary = __import__("json").loads((team_run["base"] / "sel" / "summary.json").read_text())
    assert pattern.match(summary["selection_id"])
    # A client holds only its manifest and presigned corpus URLs: none names another selection's objects.
    urls = pacsv.read_csv(team_run["base"] / "sel" / "urls.csv").column("url").to_pylist()
    assert all("/manifests/" not in u for u in urls)


def test_client_code_cannot_list_selections():
    """Listing selections needs the warehouse: the client-side modules never open it."""
    modules = sorted((REPO / "nds" / "client").glob("*.py"))
    assert {"images.py", "download.py", "scoring.py"} <= {p.name for p in modules}
    for path in modules:
        text = path.read_text()
        assert "warehouse" not in re.sub(r'""".*?"""|#.*', "", text, flags=re.S), path.name


def test_no_credentials_in_tracked_files():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    key_id = re.compile(rb"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    secret = re.compile(rb"(?i)aws_secret_access_key\s*[=:]\s*['\"]?(?!testing|x['\"]|\$|\{)[A-Za-z0-9/+]{20,}")
    hits = []
    for f in files:
        path = REPO / f
        if path.is_file() and path.stat().st_size < 5_000_000:
            data = path.read_bytes()
            if key_id.search(data) and FAKE_KEY_ID.encode() not in data:
                hits.append(f)
            if secret.search(data):
                hits.append(f)
    assert not hits, hits
