"""Clip art from the Debian package openclipart-png, cropped to its ink and fitted on white."""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from nds._registry import SOURCES
from nds.corpus.sources._base import Candidate, Source, split_by_hash
from nds.corpus.sources._common import debian_version, fit_on_square, require

log = logging.getLogger(__name__)

CLIPART_DIR = Path("/usr/share/openclipart/png")
INSTALL = "apt-get install -y openclipart-png"
#: Bigger PNGs are rare poster-sized drawings; decoding them costs more than the
#: rest of the folder and adds nothing at 32 px.
CLIPART_MAX_PIXELS = 4_000_000


def _png_pixels(path: Path) -> int | None:
    """Width*height from the PNG header (24 bytes), so huge files are never decoded."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width * height


def _check(sources_dir: Path) -> None:
    require("clipart", CLIPART_DIR)


def _list(sources_dir: Path) -> list[Candidate]:
    out = []
    for path in sorted(CLIPART_DIR.rglob("*.png")):
        # The package links some drawings into a second category; keep the real file only.
        if path.is_symlink() or not path.is_file():
            continue
        pixels = _png_pixels(path)
        if pixels is None or pixels > CLIPART_MAX_PIXELS:
            continue
        rel = path.relative_to(CLIPART_DIR).as_posix()
        sample_id = f"clipart:{rel}"
        out.append(Candidate(sample_id, rel.split("/", 1)[0], split_by_hash(sample_id), str(path)))
    return out


def _render(path: str) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            image = image.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        log.warning("skipping unreadable clip art %s", path)
        return None
    bbox = image.getchannel("A").getbbox()
    if bbox is None:
        return None
    return fit_on_square(image.crop(bbox), (255, 255, 255))


def _load(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    return [_render(c.locator) for c in candidates]


def _describe(sources_dir: Path) -> dict:
    return {"package": "openclipart-png", "version": debian_version("openclipart-png"), "path": str(CLIPART_DIR)}


SOURCES["clipart"] = Source("openclipart-png", INSTALL, _check, _list, _load, _describe)
