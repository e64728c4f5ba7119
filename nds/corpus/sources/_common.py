"""What several source readers share: install errors, package versions, pixel and IDX helpers."""

from __future__ import annotations

import gzip
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from nds._registry import SOURCES
from nds.config import IMAGE_SIZE
from nds.corpus.sources._base import HOLDOUT, SOURCE, Candidate
from nds.errors import InvalidInputError, NotFoundError

#: Blank border around glyphs and emoji so strokes never touch the image edge.
MARGIN_PX = 2


def missing(dataset: str, what: str) -> NotFoundError:
    """The error for an absent source package, naming the command that installs it."""
    return NotFoundError(f"{dataset} source not found: {what}; install it with `{SOURCES[dataset].install}`")


def require(dataset: str, *paths: Path) -> None:
    for path in paths:
        if not path.exists():
            raise missing(dataset, str(path))


def debian_version(package: str) -> str | None:
    """Version from the package's Debian changelog: cheaper than parsing dpkg's status."""
    changelog = Path("/usr/share/doc") / package / "changelog.Debian.gz"
    try:
        with gzip.open(changelog, "rt", encoding="utf-8", errors="replace") as fh:
            match = re.match(r"\S+ \(([^)]+)\)", fh.readline())
    except OSError:
        return None
    return match.group(1) if match else None


# --- pixels -------------------------------------------------------------------------------


def grey28_to_rgb32(images: np.ndarray) -> np.ndarray:
    """``images: (n, 28, 28) uint8`` -> ``(n, 32, 32, 3) uint8``, padded with black (their background)."""
    pad = (IMAGE_SIZE - images.shape[1]) // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return np.repeat(padded[..., None], 3, axis=3)


def fit_on_square(image: Image.Image, background: tuple[int, int, int], margin: int = 0) -> np.ndarray:
    """Scale an RGB(A) image to fit ``IMAGE_SIZE - 2*margin`` keeping aspect, centred on a square."""
    box = IMAGE_SIZE - 2 * margin
    w, h = image.size
    scale = box / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), background + (255,))
    canvas.alpha_composite(small.convert("RGBA"), ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


# --- IDX files (MNIST and Fashion-MNIST) ----------------------------------------------------


def parse_idx(raw: bytes) -> np.ndarray:
    """IDX format: 2 zero bytes, dtype code 0x08 (uint8), ndim, big-endian dims, data."""
    if raw[:3] != b"\x00\x00\x08":
        raise InvalidInputError("not an uint8 IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_candidates(dataset: str, arrays: dict[str, np.ndarray], names: Sequence[str] | None) -> list[Candidate]:
    """Training files feed the index; the t10k test files are held out whole, as shipped."""
    out = []
    for part, split in (("train", SOURCE), ("t10k", HOLDOUT)):
        labels = arrays[f"{part}-labels-idx1"]
        for i, label in enumerate(labels.tolist()):
            text = names[label] if names else str(label)
            out.append(Candidate(f"{dataset}:{part}:{i:05d}", text, split, (part, i)))
    return out


def idx_load(arrays: dict[str, np.ndarray], candidates: Sequence[Candidate]) -> list[np.ndarray | None]:
    if not candidates:
        return []
    images = np.stack([arrays[f"{c.locator[0]}-images-idx3"][c.locator[1]] for c in candidates])
    return list(grey28_to_rgb32(images))
