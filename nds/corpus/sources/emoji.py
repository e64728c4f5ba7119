"""Emoji: the fully-qualified sequences of Unicode's emoji-test.txt drawn with Noto Color Emoji."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nds._registry import SOURCES
from nds.corpus.sources._base import Candidate, Source, split_by_hash
from nds.corpus.sources._common import MARGIN_PX, debian_version, fit_on_square, require

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
INSTALL = "apt-get install -y fonts-noto-color-emoji unicode-data"
#: Size NotoColorEmoji's bitmaps are stored at (CBDT strikes are fixed size).
EMOJI_FONT_PX = 109
#: A sequence the font cannot ligate comes out as several glyphs side by side.
EMOJI_MAX_ASPECT = 1.4


def _check(sources_dir: Path) -> None:
    require("emoji", EMOJI_FONT, EMOJI_TEST)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _list(sources_dir: Path) -> list[Candidate]:
    """Fully-qualified emoji (single code points and sequences) labelled by their group."""
    out, group = [], None
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = _slug(line.split(":", 1)[1])
        elif line and not line.startswith("#") and group:
            codes, status = (part.strip() for part in line.split("#", 1)[0].split(";"))
            if status == "fully-qualified":
                sample_id = "emoji:" + "-".join(codes.split())
                text = "".join(chr(int(code, 16)) for code in codes.split())
                out.append(Candidate(sample_id, group, split_by_hash(sample_id), text))
    return out


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(EMOJI_FONT), EMOJI_FONT_PX)


def _render(text: str) -> np.ndarray | None:
    font = _font()
    left, top, right, bottom = font.getbbox(text, mode="RGBA")
    if right <= left or bottom <= top:
        return None
    layer = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((-left, -top), text, font=font, embedded_color=True)
    bbox = layer.getchannel("A").getbbox()
    if bbox is None:
        return None
    ink = layer.crop(bbox)
    if ink.width > EMOJI_MAX_ASPECT * ink.height:
        return None
    return fit_on_square(ink, (255, 255, 255), MARGIN_PX)


def _load(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    return [_render(c.locator) for c in candidates]


def _describe(sources_dir: Path) -> dict:
    return {
        "package": "fonts-noto-color-emoji, unicode-data",
        "version": {p: debian_version(p) for p in ("fonts-noto-color-emoji", "unicode-data")},
        "path": [str(EMOJI_FONT), str(EMOJI_TEST)],
    }


SOURCES["emoji"] = Source("fonts-noto-color-emoji", INSTALL, _check, _list, _load, _describe)
