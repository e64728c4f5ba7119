"""`nds client download` per image: loopback HTTP links (some failing), moto S3 objects, files and tar
members; sha256 verification, the failure report, resume after an interruption, fill from reserve rows."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

TESTS = Path(__file__).resolve().parents[1]
for extra in (TESTS / "corpus", TESTS / "platform"):  # linkserver and s3fixtures live there
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from linkserver import link_server  # noqa: E402,F401  (fixture)
from s3fixtures import BUCKET, s3_env, s3_server  # noqa: E402,F401  (fixtures)

from flows.cli import main as nds_main  # noqa: E402
from nds.client import download as dl  # noqa: E402
from nds.errors import InvalidInputError, NotFoundError  # noqa: E402
from nds.formats.manifest import MANIFEST_COLUMNS, write_manifest  # noqa: E402

FAST = {"retries": 2, "backoff_s": 0.01, "timeout_s": 5, "progress": False}


def image_bytes(seed: int, fmt: str = "PNG", size: int = 24) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_test_manifest(folder: Path, rows: list[dict], **summary) -> Path:
    """A manifest of `rows` (sample_id, uri, sha256; optional dataset/label) in rank order."""
    n = len(rows)
    cols = {"sample_id": [r["sample_id"] for r in rows], "dataset": [r.get("dataset", "web") for r in rows],
            "uri": [r["uri"] for r in rows], "label": [r.get("label", "cat") for r in rows],
            "probability": [1.0 / n] * n, "expert": [0] * n, "rank": list(range(n)),
            "sha256": [r.get("sha256") for r in rows]}
    types = {"probability": pa.float64(), "expert": pa.int64(), "rank": pa.int64()}
    table = pa.table({c: pa.array(cols[c], types.get(c, pa.string())) for c in MANIFEST_COLUMNS})
    write_manifest(table, folder, summary_extra=summary)
    return folder


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def mixed(tmp_path, link_server, s3_env):
    """A manifest over every kind of link, with 3 dead, 1 changed and 1 corrupt one."""
    import boto3

    imgs = {i: image_bytes(i, "JPEG" if i % 2 else "PNG") for i in range(12)}
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.put_object(Bucket=BUCKET, Key="dl/s3-ok.jpg", Body=imgs[1])
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "local.png").write_bytes(imgs[2])
    (tmp_path / "shard-0.tar").write_bytes(_tar({"000007.png": imgs[3], "000008.jpg": imgs[5]}))
    srv = link_server
    rows = [
        {"sample_id": "http-ok", "uri": srv.add("/a/ok.png", (200, imgs[0])), "sha256": sha(imgs[0])},
        {"sample_id": "http-flaky", "uri": srv.add("/a/flaky.jpg", (503, b""), (200, imgs[7])), "sha256": sha(imgs[7])},
        {"sample_id": "http-gone", "uri": srv.add("/a/gone.png", (404, b"")), "sha256": sha(imgs[4])},
        {"sample_id": "http-private", "uri": srv.add("/a/private.png", (403, b"")), "sha256": sha(imgs[4])},
        {"sample_id": "http-changed", "uri": srv.add("/a/changed.png", (200, imgs[6])), "sha256": sha(imgs[8])},
        {"sample_id": "http-truncated", "uri": srv.add("/a/cut.jpg", (200, imgs[9][: len(imgs[9]) // 2])),
         "sha256": sha(imgs[9])},
        {"sample_id": "noext", "uri": srv.add("/a/blob", (200, imgs[11])), "sha256": None, "label": None},
        {"sample_id": "s3-ok", "uri": f"s3://{BUCKET}/dl/s3-ok.jpg", "sha256": sha(imgs[1]), "dataset": "bucket"},
        {"sample_id": "s3-missing", "uri": f"s3://{BUCKET}/dl/none.jpg", "sha256": sha(imgs[1]), "dataset": "bucket"},
        {"sample_id": "file-ok", "uri": str(tmp_path / "photos" / "local.png"), "sha256": sha(imgs[2]),
         "dataset": "folder"},
        {"sample_id": "tar/7", "uri": f"{tmp_path / 'shard-0.tar'}#000007.png", "sha256": sha(imgs[3]),
         "dataset": "shards"},
        {"sample_id": "tar/8", "uri": f"{(tmp_path / 'shard-0.tar').as_uri()}#000008.jpg", "sha256": sha(imgs[5]),
         "dataset": "shards"},
    ]
    return write_test_manifest(tmp_path / "sel", rows), rows, imgs


def test_download_counts_dead_changed_and_corrupt_links(mixed, tmp_path, capsys):
    manifest, rows, imgs = mixed
    out = tmp_path / "images"
    assert nds_main(["-q", "client", "download", str(manifest), "--out", str(out), "--retries", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"7 images in {out} (7 of 12 selected ok, 3 dead, 1 changed, 1 corrupt)")
    report = json.loads((out / dl.REPORT_NAME).read_text())
    assert report["primary"] == {"ok": 7, "dead": 3, "changed": 1, "corrupt": 1}


def test_download_keeps_original_bytes_and_extensions(mixed, tmp_path):
    manifest, rows, imgs = mixed
    out = tmp_path / "images"
    report = dl.download_manifest(manifest, out, workers=4, **FAST)
    assert report["primary"] == {"ok": 7, "dead": 3, "changed": 1, "corrupt": 1}
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and p.name not in (dl.REPORT_NAME, dl.JOURNAL_NAME)}
    assert files == {
        "web/cat/http-ok.png": imgs[0], "web/cat/http-flaky.jpg": imgs[7], "web/unlabelled/noext.jpg": imgs[11],
        "bucket/cat/s3-ok.jpg": imgs[1], "folder/cat/file-ok.png": imgs[2],
        "shards/cat/tar_7.png": imgs[3], "shards/cat/tar_8.jpg": imgs[5],
    }
    failures = {f["sample_id"]: f for f in report["failures"]}
    assert {k: f["status"] for k, f in failures.items()} == {
        "http-gone": "dead", "http-private": "dead", "s3-missing": "dead", "http-changed": "changed",
        "http-truncated": "corrupt"}
    assert "HTTP 404" in failures["http-gone"]["error"] and "HTTP 403" in failures["http-private"]["error"]
    assert "changed since registration" in failures["http-changed"]["error"]
    assert report["verified_sha256"] == 11 and report["images"] == 7
    assert not list(out.rglob(".*.tmp-*"))


def test_resume_after_an_interruption(mixed, tmp_path, link_server, monkeypatch):
    manifest, rows, imgs = mixed
    out = tmp_path / "images"
    real = dl._fetch_one
    calls = {"n": 0}

    def interrupted(row, reader, out_dir):
        calls["n"] += 1
        if calls["n"] >= 6:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the download
        return real(row, reader, out_dir)

    monkeypatch.setattr(dl, "_fetch_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dl.download_manifest(manifest, out, workers=1, **FAST)
    monkeypatch.setattr(dl, "_fetch_one", real)
    done_before = {p.name for p in out.rglob("*.*") if p.name not in (dl.REPORT_NAME, dl.JOURNAL_NAME)}
    assert done_before == {"http-ok.png", "http-flaky.jpg"} and not (out / dl.REPORT_NAME).exists()
    (out / "web" / "cat" / ".http-ok.png.tmp-1-ab").write_bytes(b"half")  # a write the kill cut off

    with pytest.raises(InvalidInputError, match="pass --resume"):
        dl.download_manifest(manifest, out, **FAST)
    hits_before = dict(link_server.hits)
    report = dl.download_manifest(manifest, out, resume=True, **FAST)
    assert report["primary"] == {"ok": 7, "dead": 3, "changed": 1, "corrupt": 1}
    assert report["already_present"] == 2
    assert link_server.hits["/a/ok.png"] == hits_before["/a/ok.png"], "a verified file is not fetched again"
    assert link_server.hits["/a/gone.png"] == hits_before.get("/a/gone.png", 0) + 1
    assert not list(out.rglob(".*.tmp-*"))

    # A file damaged since is fetched again; a finished download resumes to the same result.
    (out / "web" / "cat" / "http-ok.png").write_bytes(b"damaged")
    assert nds_main(["-q", "client", "download", "--manifest", str(manifest), "--out", str(out), "--resume"]) == 0
    again = json.loads((out / dl.REPORT_NAME).read_text())
    assert again["primary"] == report["primary"] and again["already_present"] == 6
    assert (out / "web" / "cat" / "http-ok.png").read_bytes() == imgs[0]

    other = write_test_manifest(tmp_path / "other", rows[:2])
    with pytest.raises(InvalidInputError, match="another manifest"):
        dl.download_manifest(other, out, resume=True, **FAST)


def _fill_manifest(tmp_path, link_server, dead: set[int], n: int = 8, budget: int = 4, **summary):
    imgs = {i: image_bytes(100 + i) for i in range(n)}
    rows = [{"sample_id": f"s{i}", "sha256": sha(imgs[i]),
             "uri": link_server.add(f"/f/{i}.png", (404, b"") if i in dead else (200, imgs[i]))} for i in range(n)]
    extra = {"budget": budget, "reserve": n - budget} if budget is not None else {}
    return write_test_manifest(tmp_path / f"sel-{len(list(tmp_path.iterdir()))}", rows, **extra, **summary), imgs


def test_fill_from_reserve_in_rank_order(tmp_path, link_server):
    # B = 4: rows 1 and 2 dead; reserve rows 4 (dead) 5 6 7 -> 5 and 6 fill in.
    manifest, imgs = _fill_manifest(tmp_path, link_server, dead={1, 2, 4})
    report = dl.download_manifest(manifest, tmp_path / "filled", **FAST)
    names = sorted(p.name for p in (tmp_path / "filled").rglob("*.png"))
    assert names == ["s0.png", "s3.png", "s5.png", "s6.png"]
    assert report["images"] == 4 and report["filled"] == 2 and report["rows"] == 4 and report["reserve_rows"] == 4
    assert report["primary"]["dead"] == 2 and report["reserve"]["dead"] == 1
    assert link_server.hits["/f/7.png"] == 0, "the reserve is read only as far as needed"

    assert nds_main(["-q", "client", "download", str(manifest), "--out", str(tmp_path / "plain"), "--no-fill"]) == 0
    plain = json.loads((tmp_path / "plain" / dl.REPORT_NAME).read_text())
    assert plain["images"] == 2 and plain["filled"] == 0 and not plain["fill"]

    # Not enough reserve: everything usable, no error.
    short, _ = _fill_manifest(tmp_path, link_server, dead={0, 1, 2, 5, 6})
    assert dl.download_manifest(short, tmp_path / "short", **FAST)["images"] == 3

    # Without reserve fields (an older manifest) every row is selected and nothing fills.
    old, _ = _fill_manifest(tmp_path, link_server, dead={1}, budget=None)
    rep = dl.download_manifest(old, tmp_path / "old", **FAST)
    assert rep["rows"] == 8 and rep["reserve_rows"] == 0 and rep["images"] == 7


def test_surplus_reserve_files_are_dropped_when_a_resumed_row_comes_back(tmp_path, link_server):
    manifest, imgs = _fill_manifest(tmp_path, link_server, dead={1})
    out = tmp_path / "images"
    assert dl.download_manifest(manifest, out, **FAST)["filled"] == 1
    link_server.add("/f/1.png", (200, imgs[1]))  # the dead link is back
    report = dl.download_manifest(manifest, out, resume=True, **FAST)
    assert sorted(p.name for p in out.rglob("*.png")) == ["s0.png", "s1.png", "s2.png", "s3.png"]
    assert report["images"] == 4 and report["filled"] == 0


def test_bad_input_is_one_error(tmp_path, link_server, capsys):
    manifest, _ = _fill_manifest(tmp_path, link_server, dead=set())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    (tmp_path / "not-a-manifest.txt").write_text("hello")
    for argv, pattern in (
        ([str(tmp_path / "none"), "--out", str(tmp_path / "o1")], "no manifest at"),
        ([str(tmp_path / "not-a-manifest.txt"), "--out", str(tmp_path / "o2")], "is not a manifest"),
        ([str(manifest), "--out", str(tmp_path / "busy")], "is not empty"),
        ([str(manifest), "--out", str(tmp_path / "o3"), "--workers", "0"], "--workers must be >= 1"),
        (["--out", str(tmp_path / "o4")], "give the manifest once"),
    ):
        capsys.readouterr()
        assert nds_main(["-q", "client", "download", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and pattern in err, err
    assert (tmp_path / "busy" / "x.txt").read_text() == "mine"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_packaged_rows_need_the_corpus_or_links(tmp_path):
    from nds.config import Workspace

    manifest = write_test_manifest(tmp_path / "sel", [{"sample_id": "m1", "uri": "data/images/mnist.npy#3"}])
    with pytest.raises(NotFoundError, match="mnist.npy is missing.*with --presign"):
        dl.download_manifest(manifest, tmp_path / "out", ws=Workspace(tmp_path / "client"), **FAST)
    with pytest.raises(InvalidInputError, match="no corpus here"):
        dl.download_manifest(manifest, tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()
