"""nds.corpus.registry + locations: registering outside sources, on real components.

An ImageFolder of real PNGs from the Debian package oxygen-icon-theme, moto S3 on loopback holding
JPEG/PNG objects, an http.server on 127.0.0.1 serving images (and refusing some), WebDataset
shards written here with `tarfile`, a real DVC repo. Every bad input is either one clear error
(nothing written) or a counted skip.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import sys
import tarfile
import threading
import zlib
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # s3fixtures lives there

from s3fixtures import BUCKET, s3_env, s3_server  # noqa: E402,F401  (fixtures)

from nds.config import Workspace  # noqa: E402
from nds.corpus import registry  # noqa: E402
from nds.corpus.objects import fetch_bytes  # noqa: E402
from nds.corpus.registry import (  # noqa: E402
    CATALOG_SCHEMA,
    add_source,
    check_source,
    list_sources,
    load_registered,
    remove_source,
)
from nds.errors import InvalidInputError, NotFoundError, StorageError  # noqa: E402

OXYGEN = Path("/usr/share/icons/oxygen/base/32x32")
CATEGORIES = ("places", "devices", "emblems")
PER_CATEGORY = 8


def _png(seed: int, size=(24, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG that only declares its size: 10 gigapixels in 57 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.from_env(tmp_path / "ws")


@pytest.fixture
def icons(tmp_path) -> Path:
    """An ImageFolder of real PNGs: a few oxygen icon categories, copied (links resolved)."""
    if not OXYGEN.is_dir():
        pytest.fail("the Debian package oxygen-icon-theme is missing: run scripts/setup.sh (or apt-get install it)")
    root = tmp_path / "icons"
    for category in CATEGORIES:
        (root / category).mkdir(parents=True)
        files = sorted(p for p in (OXYGEN / category).glob("*.png") if not p.is_symlink())[:PER_CATEGORY]
        for p in files:
            shutil.copyfile(p, root / category / p.name)
    return root


def _catalog(ws: Workspace, name: str):
    return pq.read_table(ws.data_dir / "sources" / name / "catalog.parquet")


def _leftovers(ws: Workspace) -> list[str]:
    root = ws.data_dir / "sources"
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.exists() else []


# --------------------------------------------------------------------------- local folders


def test_imagefolder_of_real_pngs_is_registered_with_labels_hashes_and_versions(ws, icons):
    info = add_source(ws, "icons", str(icons), progress=False)
    assert (info["kind"], info["label_from"], info["labels"]) == ("imagefolder", "dirs", len(CATEGORIES))
    table = _catalog(ws, "icons")
    assert table.schema.equals(CATALOG_SCHEMA)
    rows = table.to_pylist()
    assert info["counts"]["registered"] == len(rows) and len(rows) >= 2 * PER_CATEGORY
    assert [r["sample_id"] for r in rows] == sorted(r["sample_id"] for r in rows)
    for r in rows:
        path = Path(r["uri"])
        assert r["sample_id"] == f"icons/{path.relative_to(icons).as_posix()}" and r["label"] == path.parent.name
        assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and r["bytes"] == path.stat().st_size
        assert r["version"] == f"{path.stat().st_size}-{path.stat().st_mtime_ns}"
        assert (r["width"], r["height"], r["split"], r["dataset"]) == (32, 32, "source", "icons")
    assert info["catalog_sha256"] == hashlib.sha256((ws.data_dir / "sources/icons/catalog.parquet").read_bytes()).hexdigest()
    assert [s["name"] for s in list_sources(ws.data_dir)] == ["icons"]
    assert load_registered(ws.data_dir).equals(table) and _leftovers(ws) == []


def test_flat_folder_has_no_labels_and_refuses_dirs(ws, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.png").write_bytes(_png(i))
    info = add_source(ws, "flat", str(flat), progress=False)
    assert (info["kind"], info["label_from"], info["counts"]["registered"]) == ("folder", "none", 3)
    assert _catalog(ws, "flat").column("label").null_count == 3
    with pytest.raises(InvalidInputError, match=r"--label-from dirs does not apply .*use one of none"):
        add_source(ws, "flat2", str(flat), label_from="dirs", progress=False)


def test_bad_files_are_counted_skips(ws, icons):
    good = next((icons / "places").glob("*.png"))
    (icons / "places" / "copy-of-first.png").write_bytes(good.read_bytes())  # duplicate bytes
    data = _png(1, (64, 64))
    (icons / "places" / "truncated.png").write_bytes(data[: len(data) // 2])
    (icons / "places" / "notes.txt").write_text("not an image")
    (icons / "places" / "text.png").write_text("a text file named .png")
    (icons / "places" / "bomb.png").write_bytes(_bomb_png())
    info = add_source(ws, "icons", str(icons), progress=False)
    counts = info["counts"]
    assert (counts["corrupt"], counts["not_image"], counts["too_large"]) == (1, 2, 1)
    assert counts["duplicate_within"] >= 1  # the copy (and any icons the theme ships twice)
    assert str(icons / "places" / "bomb.png") in info["skipped_examples"]["too_large"]
    uris = set(_catalog(ws, "icons").column("uri").to_pylist())
    assert not {"truncated.png", "notes.txt", "text.png", "bomb.png"} & {Path(u).name for u in uris}


def test_folder_without_images_is_an_error_and_writes_nothing(ws, tmp_path):
    empty = tmp_path / "docs"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(InvalidInputError, match=r"docs holds no image files .* among its 1 files"):
        add_source(ws, "docs", str(empty), progress=False)
    with pytest.raises(NotFoundError, match="does not exist"):
        add_source(ws, "docs", str(tmp_path / "nowhere"), progress=False)
    assert not (ws.data_dir / "sources").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "Photos", "", "-x", "x" * 65])
def test_names_with_path_characters_are_refused(ws, icons, name):
    with pytest.raises(InvalidInputError, match="must match"):
        add_source(ws, name, str(icons), progress=False)
    assert not ws.data_dir.exists()


def test_packaged_and_existing_names_are_refused_unless_replace(ws, icons):
    with pytest.raises(InvalidInputError, match="packaged dataset"):
        add_source(ws, "mnist", str(icons), progress=False)
    add_source(ws, "icons", str(icons), progress=False)
    before = _catalog(ws, "icons")
    with pytest.raises(InvalidInputError, match=r"already registered .*--replace"):
        add_source(ws, "icons", str(icons / "places"), progress=False)
    assert _catalog(ws, "icons").equals(before)
    info = add_source(ws, "icons", str(icons / "places"), replace=True, progress=False)
    assert info["kind"] == "folder" and _catalog(ws, "icons").num_rows < before.num_rows


def test_duplicates_of_another_source_are_dropped_and_reported(ws, icons, tmp_path):
    add_source(ws, "icons", str(icons), progress=False)
    more = tmp_path / "more"
    shutil.copytree(icons / "places", more)
    (more / "new.png").write_bytes(_png(7))
    info = add_source(ws, "more", str(more), progress=False)
    assert info["counts"]["registered"] == 1 and info["counts"]["duplicate_of_other_source"] >= PER_CATEGORY - 1
    assert "(= icons/places/" in info["skipped_examples"]["duplicate_of_other_source"][0]
    table = load_registered(ws.data_dir)
    assert table.column("dataset").to_pylist() == sorted(table.column("dataset").to_pylist())
    assert len(set(table.column("sha256").to_pylist())) == table.num_rows


def test_interrupted_add_leaves_the_catalog_as_it_was(ws, icons, monkeypatch):
    add_source(ws, "icons", str(icons), progress=False)
    before = (ws.data_dir / "sources/icons/catalog.parquet").read_bytes()
    calls = []

    def interrupted(data, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return Image.new("RGB", (32, 32))

    monkeypatch.setattr(registry, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add_source(ws, "icons", str(icons), replace=True, progress=False, workers=1)
    assert (ws.data_dir / "sources/icons/catalog.parquet").read_bytes() == before and _leftovers(ws) == []


def test_the_catalog_reader_never_sees_a_registration_under_way(ws, icons):
    from nds.corpus.read import load_catalog

    add_source(ws, "icons", str(icons), progress=False)
    n = load_catalog(ws.data_dir).num_rows
    # what atomic_dir leaves while a `source add` writes (or a `source remove` deletes): a hidden folder
    half = ws.data_dir / "sources" / ".other.tmp-1"
    shutil.copytree(ws.data_dir / "sources" / "icons", half)
    assert load_catalog(ws.data_dir).num_rows == n
    assert set(load_catalog(ws.data_dir).column("dataset").to_pylist()) == {"icons"}


def test_remove_and_unknown_source(ws, icons):
    add_source(ws, "icons", str(icons), progress=False)
    with pytest.raises(NotFoundError, match=r"no registered source 'nope' \(registered: icons\)"):
        remove_source(ws, "nope")
    with pytest.raises(NotFoundError):
        remove_source(ws, "../icons")
    info = remove_source(ws, "icons")
    assert info["name"] == "icons" and load_registered(ws.data_dir) is None and _leftovers(ws) == []
    assert all(p.exists() for p in icons.rglob("*.png"))  # the objects are never touched


def test_check_reports_changed_and_missing_files(ws, icons):
    add_source(ws, "icons", str(icons), progress=False)
    assert check_source(ws, "icons")["changed"] == 0
    files = sorted((icons / "devices").glob("*.png"))
    files[0].write_bytes(_png(3))
    files[1].unlink()
    report = check_source(ws, "icons")
    assert (report["changed"], report["missing"]) == (1, 1)
    assert report["examples"]["changed"] == [str(files[0])] and report["examples"]["missing"] == [str(files[1])]
    assert report["re_register"].endswith("--label-from dirs --replace")


def test_build_corpus_keeps_registered_sources(ws, icons, monkeypatch):
    from nds.corpus.build import build_corpus

    import nds.corpus.build

    monkeypatch.setenv("NDS_SOURCES", str(Path(__file__).resolve().parents[2] / ".sources"))
    monkeypatch.setattr(nds.corpus.build, "DATASETS", ("mnist",))  # one packaged dataset is enough here
    add_source(ws, "icons", str(icons), progress=False)
    before = {p.name: p.read_bytes() for p in (ws.data_dir / "sources/icons").iterdir()}
    build_corpus(ws, "tiny", progress=False)
    assert sorted(p.name for p in (ws.data_dir / "sources").iterdir()) == ["icons", "mnist"]
    assert {p.name: p.read_bytes() for p in (ws.data_dir / "sources/icons").iterdir()} == before
    # A rebuild replaces the packaged dataset's source (never carries the old one over) and keeps icons.
    mnist = (ws.data_dir / "sources/mnist/catalog.parquet").read_bytes()
    build_corpus(ws, "tiny", progress=False)
    assert (ws.data_dir / "sources/mnist/catalog.parquet").read_bytes() == mnist
    assert {p.name: p.read_bytes() for p in (ws.data_dir / "sources/icons").iterdir()} == before


def test_registering_in_a_dvc_repo_tracks_data(ws, icons):
    from nds.platform import dvc

    ws.root.mkdir(parents=True)
    dvc.init_repo(ws)
    info = add_source(ws, "icons", str(icons), progress=False)
    assert info["dvc_md5"] and (ws.root / "data.dvc").exists()
    assert remove_source(ws, "icons")["dvc_md5"] != info["dvc_md5"]


# --------------------------------------------------------------------------- S3


def _put(client, key: str, data: bytes) -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=data)


def test_s3_prefix_with_labels_from_the_next_segment(ws, s3_env):
    from nds.platform.storage import s3_client

    client = s3_client()
    for i in range(3):
        _put(client, f"lake/cats/{i}.jpg", _jpeg(i))
        _put(client, f"lake/dogs/{i}.png", _png(10 + i))
    _put(client, "lake/dogs/broken.jpg", _jpeg(99)[:200])
    _put(client, "lake/index.json", b"{}")
    _put(client, "lake2/cats/x.jpg", _jpeg(50))  # a sibling prefix: not part of s3://.../lake
    info = add_source(ws, "lake", f"s3://{BUCKET}/lake", progress=False)
    assert (info["kind"], info["label_from"], info["counts"]["registered"]) == ("s3", "dirs", 6)
    assert (info["counts"]["corrupt"], info["counts"]["not_image"]) == (1, 1)
    rows = _catalog(ws, "lake").to_pylist()
    assert rows[0]["sample_id"] == "lake/cats/0.jpg" and rows[0]["uri"] == f"s3://{BUCKET}/lake/cats/0.jpg"
    assert {r["label"] for r in rows} == {"cats", "dogs"}
    head = client.head_object(Bucket=BUCKET, Key="lake/cats/0.jpg")
    assert rows[0]["version"] == head["ETag"].strip('"')
    assert rows[0]["sha256"] == hashlib.sha256(fetch_bytes(rows[0]["uri"])).hexdigest()
    _put(client, "lake/cats/1.jpg", _jpeg(123))
    assert check_source(ws, "lake")["examples"]["changed"] == [f"s3://{BUCKET}/lake/cats/1.jpg"]


def test_unreachable_s3_endpoint_is_one_clear_error(ws, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NDS_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr("nds.platform.storage.S3_MAX_ATTEMPTS", 1)  # the retries are storage's (tested there)
    with pytest.raises(StorageError, match=rf"cannot reach S3 at http://127.0.0.1:{port}"):
        add_source(ws, "lake", "s3://bucket/prefix/", progress=False)
    assert not ws.data_dir.exists()


# --------------------------------------------------------------------------- link tables over HTTP


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def send_head(self):
        if self.path.startswith("/forbidden/"):
            self.send_error(403)
            return None
        return super().send_head()


@pytest.fixture
def http_root(tmp_path):
    """(folder, base url): an http.server on 127.0.0.1 serving the folder; /forbidden/* answers 403."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_link_table_counts_dead_links_and_collapses_repeated_urls(ws, http_root, tmp_path):
    root, base = http_root
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "local.png").write_bytes(_png(9))
    table = tmp_path / "links.csv"
    table.write_text("url,label,caption\n"
                     f"{base}/0.png,a,first\n{base}/1.png,b,\n{base}/2.png,a,third\n{base}/0.png,a,again\n"
                     f"{base}/missing.png,a,\n{base}/forbidden/x.png,b,\nlocal.png,b,relative path\n")
    info = add_source(ws, "web", str(table), progress=False)
    counts = info["counts"]
    assert (info["kind"], counts["registered"], counts["duplicate_within"]) == ("table", 4, 1)
    assert (counts["missing"], counts["denied"], counts["unreachable"]) == (1, 1, 0)  # 404 and 403 told apart
    assert info["skipped_examples"]["missing"] == [f"{base}/missing.png"]
    rows = {r["uri"]: r for r in _catalog(ws, "web").to_pylist()}
    assert rows[f"{base}/0.png"]["sample_id"] == f"web/{base}/0.png" and rows[f"{base}/0.png"]["caption"] == "first"
    assert rows[f"{base}/1.png"]["label"] == "b" and rows[f"{base}/1.png"]["version"]
    assert rows[str(tmp_path / "local.png")]["caption"] == "relative path"
    (root / "2.png").unlink()
    assert check_source(ws, "web")["examples"]["missing"] == [f"{base}/2.png"]


def test_link_table_without_url_column_or_with_duplicate_keys_is_an_error(ws, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("link,label\nhttp://x/1.png,a\n")
    with pytest.raises(InvalidInputError, match=r"no `url` column \(columns: link, label\)"):
        add_source(ws, "bad", str(bad), progress=False)
    dup = tmp_path / "dup.csv"
    dup.write_text("key,url\nk1,a.png\nk1,b.png\n")
    with pytest.raises(InvalidInputError, match=r"1 duplicate `key` value\(s\) \('k1'\)"):
        add_source(ws, "dup", str(dup), progress=False)
    assert not ws.data_dir.exists()


def test_parquet_table_with_keys(ws, tmp_path):
    import pyarrow as pa

    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    pq.write_table(pa.table({"key": ["x", "y"], "url": [str(tmp_path / "0.png"), str(tmp_path / "1.png")],
                             "label": [1, 2]}), tmp_path / "t.parquet")
    info = add_source(ws, "tab", str(tmp_path / "t.parquet"), progress=False)
    rows = _catalog(ws, "tab").to_pylist()
    assert info["label_from"] == "column" and [(r["sample_id"], r["label"]) for r in rows] == [("tab/x", "1"), ("tab/y", "2")]


# --------------------------------------------------------------------------- WebDataset shards


def _shard(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _shards(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    _shard(folder / "000000.tar", [
        {"__key__": "s0", "png": _png(0), "cls": b"3", "txt": b"a red thing"},
        {"__key__": "s1", "jpg": _jpeg(1), "json": b'{"label": "cat", "caption": "a cat"}'},
        {"__key__": "s2", "json": b"{}"},  # no image member
    ])
    _shard(folder / "000001.tar", [
        {"__key__": "s3", "png": _png(3, (64, 64))[:120], "cls": b"1"},  # truncated
        {"__key__": "s4", "png": _png(4), "cls": b"1"},
    ])
    return sorted(folder.glob("*.tar"))


def test_local_webdataset_shards(ws, tmp_path):
    shards = _shards(tmp_path / "shards")
    (tmp_path / "shards" / "000002.tar").write_bytes(b"not a tar at all" * 64)
    info = add_source(ws, "wds", str(tmp_path / "shards"), progress=False)
    assert (info["kind"], info["label_from"], info["counts"]["registered"]) == ("webdataset", "column", 3)
    assert (info["counts"]["not_image"], info["counts"]["corrupt"]) == (1, 2)  # a truncated png, a bad shard
    assert str(tmp_path / "shards" / "000002.tar") in info["skipped_examples"]["corrupt"]
    rows = {r["sample_id"]: r for r in _catalog(ws, "wds").to_pylist()}
    assert set(rows) == {"wds/000000.tar/s0", "wds/000000.tar/s1", "wds/000001.tar/s4"}
    s0 = rows["wds/000000.tar/s0"]
    assert (s0["label"], s0["caption"], s0["uri"]) == ("3", "a red thing", f"{shards[0]}#s0.png")
    assert (rows["wds/000000.tar/s1"]["label"], rows["wds/000000.tar/s1"]["caption"]) == ("cat", "a cat")
    stat = shards[0].stat()
    assert s0["version"] == f"{stat.st_size}-{stat.st_mtime_ns}"
    assert hashlib.sha256(fetch_bytes(s0["uri"])).hexdigest() == s0["sha256"]  # the uri reads the same bytes
    remove_source(ws, "wds")
    by_glob = add_source(ws, "wds", str(tmp_path / "shards" / "*.tar"), label_from="none", progress=False)
    assert by_glob["counts"]["registered"] == 3 and _catalog(ws, "wds").column("label").null_count == 3


def test_s3_webdataset_shards(ws, s3_env, tmp_path):
    from nds.platform.storage import s3_client

    client = s3_client()
    for shard in _shards(tmp_path / "shards"):
        _put(client, f"wds/{shard.name}", shard.read_bytes())
    info = add_source(ws, "wds", f"s3://{BUCKET}/wds/", progress=False)
    assert (info["kind"], info["counts"]["registered"]) == ("webdataset", 3)
    row = _catalog(ws, "wds").to_pylist()[0]
    assert row["uri"] == f"s3://{BUCKET}/wds/000000.tar#s0.png"
    assert row["version"] == client.head_object(Bucket=BUCKET, Key="wds/000000.tar")["ETag"].strip('"')
    assert hashlib.sha256(fetch_bytes(row["uri"])).hexdigest() == row["sha256"]
    _put(client, "wds/000001.tar", (tmp_path / "shards/000000.tar").read_bytes())
    assert check_source(ws, "wds")["changed"] == 1  # the one row of the rewritten shard
