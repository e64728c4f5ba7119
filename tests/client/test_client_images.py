"""nds.client.images: reading client images into the corpus format and hashing them."""

from __future__ import annotations

import hashlib
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
from nds.corpus.read import image_sha256
from nds.errors import NDSError


# --------------------------------------------------------------------------- helpers


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _bomb_header_png(path: Path, width: int, height: int) -> None:
    """A PNG that only declares its size (signature + IHDR + IEND): what Pillow reads first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


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
    assert client.compute_image_hashes(data.images) == expected == [image_sha256(im) for im in imgs]


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
    assert client.compute_image_hashes(data.images) == [image_sha256(im) for im in imgs]
