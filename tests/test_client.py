"""nds.client: reading client images, fetching the bundle (local and S3), scores.json."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from nds.client import images as client

from nds.corpus import build as corpus

from nds.models import experts
from nds.errors import NDSError

SHA_A = "a" * 64


# --------------------------------------------------------------------------- helpers


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _bomb_header_png(path: Path, width: int, height: int) -> None:
    """A PNG that only declares its size (signature + IHDR + IEND): what Pillow reads first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _make_bundle(folder: Path, k: int = 2) -> dict:
    """k untrained-ish experts (2 steps) and bundle.json in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for e in range(k):
        model, metrics = experts.train_expert(_rgb(32, 32, e)[None].repeat(8, 0), max_steps=2, batch_size=8, seed=e)
        f = f"expert_{e:03d}.pt"
        sha = experts.save_expert(model, folder / f, meta={"arch": "rotnet_small", "expert": e})
        entries.append({"expert": e, "file": f, "sha256": sha, **metrics})
    return experts.write_bundle(folder, index_version="v-test", arch="rotnet_small", experts=entries)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bundle") / "experts"
    _make_bundle(d)
    return d


# --------------------------------------------------------------------------- load_client_images


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Class 'a': 5 readable files of mixed modes; class 'b': 3 readable + 4 bad ones."""
    root = tmp_path / "client"
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    Image.fromarray(np.full((28, 28), 200, np.uint8), "L").save(a / "grey28.png")
    Image.fromarray(_rgb(32, 32, 1)).save(a / "rgb32.png")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:16, :, :] = [10, 20, 30, 255]  # top half opaque, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(a / "rgba32.png")
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(a / "pal.png", transparency=0)
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(a / "photo.JPG", quality=95)
    Image.fromarray(_rgb(64, 64, 2)).save(b / "big.bmp")
    Image.fromarray(_rgb(16, 16, 3)).convert("P").save(b / "anim.gif")
    Image.fromarray(_rgb(48, 24, 4)).save(b / "pic.webp")
    (b / "corrupt.png").write_bytes(b"this is not a png at all" * 10)
    good = (a / "rgb32.png").read_bytes()
    (b / "truncated.png").write_bytes(good[: len(good) // 2])
    (b / "empty.jpg").write_bytes(b"")
    Image.fromarray(_rgb(100, 100, 5)).save(b / "bomb.png")  # 10k pixels > max_pixels below
    (b / "notes.txt").write_text("not an image; ignored")
    return root


def test_image_folder_mixed_modes_sizes_and_bad_files(image_folder):
    before = Image.MAX_IMAGE_PIXELS
    data = client.load_client_images(image_folder, max_pixels=5000, progress=False)
    assert Image.MAX_IMAGE_PIXELS == before  # the limit is scoped to the call
    assert data.images.shape == (8, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.class_names == ["a", "b"]
    assert data.labels.tolist() == ["a"] * 5 + ["b"] * 3
    assert len(data.paths) == 8
    assert data.n_skipped == 4
    reasons = {Path(p).name: r for p, r in data.skipped}
    assert set(reasons) == {"corrupt.png", "truncated.png", "empty.jpg", "bomb.png"}
    assert reasons["empty.jpg"] == "empty file"
    assert "decompression bomb" in reasons["bomb.png"]
    by_name = {Path(p).name: im for p, im in zip(data.paths, data.images)}
    np.testing.assert_array_equal(by_name["rgb32.png"], _rgb(32, 32, 1))  # 32x32 RGB untouched
    grey = by_name["grey28.png"]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == grey[..., 2]).all()
    assert (grey == 200).all()  # square 28 -> 32: scaled up, no padding
    rgba = by_name["rgba32.png"]
    assert (rgba[:16] == [10, 20, 30]).all() and (rgba[16:] == 255).all()  # composited on white
    assert (by_name["pal.png"] == [255, 0, 0]).all()
    photo = by_name["photo.JPG"]  # 40x20 -> 32x16, centred; rows above and below are white padding
    assert (photo[:8] == 255).all() and (photo[24:] == 255).all() and photo[10:22].max() < 20


def test_flat_folder_has_no_labels(tmp_path):
    for i in range(3):
        Image.fromarray(_rgb(32, 32, i)).save(tmp_path / f"{i}.png")
    data = client.load_client_images(tmp_path, progress=False)
    assert data.labels is None and data.class_names == [] and len(data) == 3


def test_files_next_to_class_folders_are_reported(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.fromarray(_rgb(32, 32)).save(tmp_path / "cat" / "1.png")
    Image.fromarray(_rgb(32, 32)).save(tmp_path / "stray.png")
    data = client.load_client_images(tmp_path, progress=False)
    assert len(data) == 1 and data.skipped == [(str(tmp_path / "stray.png"), "outside the class folders")]


def test_header_only_bomb_is_skipped_before_decoding(tmp_path):
    _bomb_header_png(tmp_path / "huge.png", 100_000, 100_000)  # 10 gigapixels, 57 bytes on disk
    with pytest.raises(NDSError, match=r"no readable image.*1 files were skipped.*decompression bomb"):
        client.load_client_images(tmp_path, progress=False)


def test_npz_input(tmp_path):
    imgs = np.stack([_rgb(32, 32, i) for i in range(4)])
    np.savez(tmp_path / "rgb.npz", images=imgs, labels=np.array([0, 1, 0, 1]))
    data = client.load_client_images(tmp_path / "rgb.npz", progress=False)
    np.testing.assert_array_equal(data.images, imgs)
    assert data.labels.tolist() == ["0", "1", "0", "1"] and data.class_names == ["0", "1"]
    assert data.paths[3].endswith("rgb.npz#3")

    np.savez(tmp_path / "grey.npz", images=np.full((2, 28, 28), 7, np.uint8))
    grey = client.load_client_images(tmp_path / "grey.npz", progress=False)
    assert grey.images.shape == (2, 32, 32, 3) and grey.labels is None
    assert (grey.images == 7).all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "holds no image files"),
        (lambda p: (p / "x.csv").write_text("a") and p / "x.csv", "neither a folder nor an .npz"),
        (lambda p: np.savez(p / "n.npz", pixels=np.zeros((1, 32, 32, 3), np.uint8)) or p / "n.npz", "no array named 'images'"),
        (lambda p: np.savez(p / "n.npz", images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.arange(2)) or p / "n.npz",
         "one label per image"),
        (lambda p: np.savez(p / "n.npz", images=np.zeros((1, 32, 32, 3), np.float32)) or p / "n.npz", "must be uint8"),
    ],
)
def test_bad_inputs_are_clear_errors(tmp_path, make, match):
    with pytest.raises(NDSError, match=match):
        client.load_client_images(make(tmp_path), progress=False)


def test_all_files_unreadable_says_how_many_and_why(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.png").write_bytes(b"")
    (tmp_path / "c" / "y.jpg").write_bytes(b"garbage")
    with pytest.raises(NDSError, match=r"all 2 files were skipped.*empty file"):
        client.load_client_images(tmp_path, progress=False)


# --------------------------------------------------------------------------- hashes


def test_hashes_of_32px_pngs_equal_the_corpus_hash(tmp_path):
    """Corpus-like arrays written as PNG and read back hash like their catalog rows."""
    imgs = np.stack([_rgb(32, 32, i) for i in range(5)])
    (tmp_path / "k").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "k" / f"{i}.png")
    data = client.load_client_images(tmp_path, progress=False)
    expected = [hashlib.sha256(im.tobytes()).hexdigest() for im in imgs]
    assert client.compute_image_hashes(data.images) == expected == [corpus._sha256(im) for im in imgs]


def test_hashes_reject_other_shapes():
    with pytest.raises(NDSError, match=r"\(n, 32, 32, 3\)"):
        client.compute_image_hashes(np.zeros((2, 28, 28), np.uint8))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(imgs=arrays(np.uint8, st.tuples(st.integers(1, 3), st.just(32), st.just(32), st.just(3))))
def test_32px_rgb_pngs_round_trip_bit_exact(tmp_path_factory, imgs):
    folder = tmp_path_factory.mktemp("rt")
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    data = client.load_client_images(folder, progress=False)
    np.testing.assert_array_equal(data.images, imgs)
    assert client.compute_image_hashes(data.images) == [corpus._sha256(im) for im in imgs]


# --------------------------------------------------------------------------- fetch_experts


def test_fetch_local_bundle(bundle_dir, tmp_path):
    out = tmp_path / "fetched"
    bundle = client.fetch_experts(str(bundle_dir), out)
    assert bundle == experts.load_bundle(bundle_dir)
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "expert_000.pt", "expert_001.pt"]
    assert not list(tmp_path.glob(".fetched.tmp-*"))
    with pytest.raises(NDSError, match="not empty"):
        client.fetch_experts(str(bundle_dir), out)


def test_fetch_refuses_a_tampered_bundle_and_leaves_nothing(bundle_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in bundle_dir.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    (src / "expert_001.pt").write_bytes(b"tampered")
    with pytest.raises(NDSError, match="does not match bundle.json"):
        client.fetch_experts(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_fetch_refuses_paths_outside_the_bundle(bundle_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    bundle["experts"][0]["file"] = "../../etc/passwd"
    (src / "bundle.json").write_text(json.dumps(bundle))
    with pytest.raises(NDSError, match="not a plain file name"):
        client.fetch_experts(str(src), tmp_path / "out")


def test_fetch_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(NDSError, match="not a folder"):
        client.fetch_experts(str(tmp_path / "nope"), tmp_path / "out")
    with pytest.raises(NDSError, match="unsupported bundle source"):
        client.fetch_experts("gs://bucket/x", tmp_path / "out")


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
    bundle = client.fetch_experts("s3://nds/index/v1/experts/", tmp_path / "out")
    assert bundle["bundle_sha256"] == experts.load_bundle(bundle_dir)["bundle_sha256"]
    assert (tmp_path / "out" / "expert_001.pt").read_bytes() == (bundle_dir / "expert_001.pt").read_bytes()

    s3.delete_object(Bucket="nds", Key="index/v1/experts/expert_001.pt")
    with pytest.raises(NDSError, match=r"s3://nds/index/v1/experts/expert_001.pt not found"):
        client.fetch_experts("s3://nds/index/v1/experts", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------- scores.json


def _bundle_stub(k=3):
    return {"index_version": "v1", "bundle_sha256": "b" * 64, "k": k}


def test_write_scores_round_trip_and_privacy(tmp_path):
    path = tmp_path / "scores.json"
    doc = client.write_scores(path, bundle=_bundle_stub(), mode="linear", scores=[0.5, 0.25, 1.0],
                              seconds_per_expert=[0.1, 0.2, 0.3])
    on_disk = json.loads(path.read_text())
    assert on_disk == doc == client.load_scores(path)
    # Nothing about the client's images beyond the K numbers.
    assert set(on_disk) == {"format", "index_version", "bundle_sha256", "mode", "k", "scores",
                            "seconds_per_expert", "created_at"}
    assert on_disk["scores"] == [0.5, 0.25, 1.0] and on_disk["k"] == 3
    assert not list(tmp_path.glob(".scores.json.tmp-*"))


def test_write_scores_with_hashes_sorts_and_dedupes(tmp_path):
    hashes = ["C" * 64, "a" * 64, "c" * 64]
    doc = client.write_scores(tmp_path / "s.json", bundle=_bundle_stub(1), mode="rotation", scores=[0.3],
                              seconds_per_expert=[0.0], hashes=hashes)
    assert doc["exclude_sha256"] == ["a" * 64, "c" * 64]


def test_write_scores_refuses_nan_and_writes_nothing(tmp_path):
    with pytest.raises(NDSError, match=r"scores\[1\]"):
        client.write_scores(tmp_path / "s.json", bundle=_bundle_stub(2), mode="linear", scores=[0.1, float("nan")],
                            seconds_per_expert=[0, 0])
    assert not (tmp_path / "s.json").exists()


def _valid():
    return {"format": 1, "index_version": "v1", "bundle_sha256": "b" * 64, "mode": "linear", "k": 2, "scores": [0.1, 0.2]}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format": 2}, "unsupported format"),
        ({"format": True}, "unsupported format"),
        ({"mode": "magic"}, "unknown mode 'magic'; known modes: linear, rotation, logme"),
        ({"k": 3}, "has 2 values but k = 3"),
        ({"k": True}, "'k' must be a positive integer"),
        ({"scores": [0.1, float("inf")]}, r"scores\[1\] = inf is not a finite number"),
        ({"scores": [float("nan"), 0.2]}, r"scores\[0\] = nan"),
        ({"scores": ["0.1", 0.2]}, r"scores\[0\] = '0.1'"),
        ({"scores": [0.1, True]}, r"scores\[1\] = True"),
        ({"scores": "0.1,0.2"}, "must be a list"),
        ({"bundle_sha256": "xyz"}, "64-character hex"),
        ({"index_version": ""}, "'index_version' must be a non-empty string"),
        ({"exclude_sha256": ["g" * 64]}, r"exclude_sha256\[0\]"),
        ({"seconds_per_expert": [0.1]}, "'seconds_per_expert' has 1 values"),
    ],
)
def test_load_scores_rejects_bad_documents(change, match):
    with pytest.raises(NDSError, match=match):
        client.load_scores({**_valid(), **change})


def test_load_scores_file_errors_name_the_file(tmp_path):
    with pytest.raises(NDSError, match=r"missing\.json not found"):
        client.load_scores(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(NDSError, match=r"bad\.json is not valid JSON"):
        client.load_scores(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text(json.dumps({**_valid(), "scores": [0.1, float("nan")]}))
    with pytest.raises(NDSError, match=r"nan\.json: scores\[1\]"):
        client.load_scores(tmp_path / "nan.json")


@settings(max_examples=50, deadline=None)
@given(scores=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=20))
def test_finite_scores_round_trip_exactly(scores):
    doc = {**_valid(), "k": len(scores), "scores": scores}
    out = client.load_scores(json.loads(json.dumps(doc)))
    assert out["scores"] == scores and all(math.isfinite(s) for s in out["scores"])
