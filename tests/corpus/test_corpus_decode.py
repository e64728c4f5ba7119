"""nds.corpus.decode: bytes -> RGB image (typed refusals), image -> square uint8 array, shared with the client."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nds.client.images import _to_corpus_format
from nds.corpus.decode import (
    CorruptImageError,
    ImageTooLargeError,
    NotAnImageError,
    UnusableImageError,
    decode_image,
    to_array,
)
from nds.errors import InvalidInputError


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _header_only_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_png_round_trips_pixel_for_pixel_at_native_size():
    pixels = _rgb(17, 29)
    image = decode_image(_encode(Image.fromarray(pixels)))
    assert image.mode == "RGB" and image.size == (29, 17)
    assert np.array_equal(np.asarray(image), pixels)


def test_alpha_is_composited_on_white_and_grey_becomes_rgb():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
    image = np.asarray(decode_image(_encode(Image.fromarray(rgba, "RGBA"))))
    assert image[0, 0].tolist() == [200, 0, 0] and image[1, 1].tolist() == [255, 255, 255]
    grey = np.asarray(decode_image(_encode(Image.fromarray(np.full((3, 3), 77, np.uint8), "L"))))
    assert grey.shape == (3, 3, 3) and (grey == 77).all()


def test_exif_orientation_is_applied():
    pixels = _rgb(10, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image = decode_image(_encode(Image.fromarray(pixels), "PNG", exif=exif))
    assert image.size == (10, 20)


@pytest.mark.parametrize("data, error, reason", [
    (b"", NotAnImageError, "not_image"),
    (b"%PDF-1.4 not an image at all" * 5, NotAnImageError, "not_image"),
    (_header_only_png(100_000, 100_000), ImageTooLargeError, "too_large"),
])
def test_unusable_bytes_are_typed_refusals(data, error, reason):
    with pytest.raises(error) as info:
        decode_image(data)
    assert info.value.reason == reason and isinstance(info.value, (UnusableImageError, InvalidInputError))


def test_truncated_jpeg_and_png_are_corrupt():
    for fmt in ("JPEG", "PNG"):
        data = _encode(Image.fromarray(_rgb(64, 64)), fmt)
        with pytest.raises(CorruptImageError) as info:
            decode_image(data[: len(data) // 2])
        assert info.value.reason == "corrupt"


def test_max_pixels_is_checked_from_the_header():
    data = _encode(Image.fromarray(_rgb(10, 10)))
    assert decode_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_image(data, max_pixels=99)


def test_to_array_letterboxes_on_white_at_any_size():
    wide = Image.fromarray(np.zeros((10, 40, 3), np.uint8))  # black, 4:1
    out = to_array(wide, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[:20] == 255).all() and (out[-20:] == 255).all()  # padding rows above and below
    assert (out[28:36] == 0).all()  # the image in the middle
    exact = _rgb(48, 48)
    assert np.array_equal(to_array(Image.fromarray(exact), 48), exact)  # already the size: untouched


def test_to_array_rejects_a_bad_size():
    with pytest.raises(InvalidInputError, match="positive integer"):
        to_array(Image.fromarray(_rgb(4, 4)), 0)


def test_client_and_server_preprocess_identically():
    """The client's corpus format is to_array(decode_image(bytes), 32): same pixels for the same bytes."""
    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(_rgb(40, 25, 1)),
        Image.fromarray(rng.integers(0, 256, (17, 50, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(rng.integers(0, 256, (33, 31), dtype=np.uint8), "L"),
        Image.fromarray(_rgb(32, 32, 2)),
    ]
    for image in images:
        data = _encode(image)
        server = to_array(decode_image(data), 32)
        with Image.open(io.BytesIO(data)) as im:
            client = _to_corpus_format(im.copy())
        assert np.array_equal(server, client)


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 90), h=st.integers(1, 90), size=st.integers(1, 48))
def test_to_array_keeps_the_aspect_ratio_inside_a_white_frame(w, h, size):
    """Any size -> (size, size, 3); the black image fills its longer side and is centred."""
    out = to_array(Image.new("RGB", (w, h)), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    dark_rows = np.flatnonzero((out < 128).all(axis=2).any(axis=1))
    dark_cols = np.flatnonzero((out < 128).all(axis=2).any(axis=0))
    if w >= h:
        assert len(dark_cols) == size
    if h >= w:
        assert len(dark_rows) == size
    assert abs(dark_rows[0] - (size - 1 - dark_rows[-1])) <= 1 and abs(dark_cols[0] - (size - 1 - dark_cols[-1])) <= 1
