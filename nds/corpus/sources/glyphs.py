"""Printed glyphs: A-Z, a-z and 0-9 drawn with every usable font of the named Debian packages
(whole fonts held out).

Only files that `GLYPH_PACKAGES` install count: another package that drops a font into the
same folders (installing chromium brings fonts-liberation 1.x) must not change the corpus,
its data.dvc hash or any index version built on it.
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nds._registry import SOURCES
from nds.config import IMAGE_SIZE
from nds.corpus.sources._base import Candidate, Source, split_by_hash
from nds.corpus.sources._common import MARGIN_PX, debian_version, missing

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/share/texmf/fonts/opentype/public/tex-gyre"))
#: The packages whose fonts the glyph source draws with; nothing else under FONT_DIRS is read.
GLYPH_PACKAGES = ("fonts-noto-core", "fonts-urw-base35", "fonts-liberation2", "fonts-dejavu-core",
                  "fonts-dejavu-extra", "fonts-texgyre", "fonts-humor-sans", "fonts-dkg-handwriting")
INSTALL = "apt-get install -y " + " ".join(GLYPH_PACKAGES)

GLYPH_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
#: Fonts whose Latin code points hold symbols (dingbats, Greek), come from another family
#: already in the set (math and script fonts carrying a Latin subset), or are colour bitmaps.
GLYPH_FONT_SKIP = re.compile(r"D050000L|StandardSymbols|Symbols|Math|Emoji|Nushu", re.IGNORECASE)
#: Size glyphs are drawn at before downscaling; large enough for clean anti-aliasing.
GLYPH_RENDER_PX = 64
#: A code point no font maps: drawing it shows the font's .notdef box, which a
#: missing glyph would look identical to.
UNMAPPED_CODEPOINT = 0x10FFFD


@functools.lru_cache(maxsize=1)
def _package_files() -> frozenset[str]:
    """Every path the GLYPH_PACKAGES installed, from dpkg's own file lists."""
    owned: set[str] = set()
    absent = []
    for package in GLYPH_PACKAGES:
        try:
            listed = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            raise missing("glyphs", "dpkg-query is not available (the glyph fonts come from Debian packages)") from None
        if listed.returncode != 0:
            absent.append(package)
        owned.update(line.strip() for line in listed.stdout.splitlines() if line.strip())
    if absent:
        raise missing("glyphs", f"font package(s) {', '.join(absent)} not installed")
    return frozenset(owned)


def _font_files() -> list[Path]:
    owned = _package_files()
    files = {}
    for folder in FONT_DIRS:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if (path.suffix.lower() in {".ttf", ".otf"} and not GLYPH_FONT_SKIP.search(path.name)
                    and str(path) in owned):
                files.setdefault(path.stem, path)  # the stem names the font in sample ids
    return [files[stem] for stem in sorted(files)]


def _glyph_is_missing(font: ImageFont.FreeTypeFont, char: str, notdef: tuple) -> bool:
    mask = font.getmask(char)
    return mask.size[0] == 0 or mask.getbbox() is None or (mask.size, bytes(mask)) == notdef


@functools.lru_cache(maxsize=1)
def _usable_fonts() -> tuple[Path, ...]:
    """Fonts that draw every one of GLYPH_CHARS (script fonts without Latin are skipped whole,
    so each font contributes the same 62 classes)."""
    usable = []
    probe = "Az5" + GLYPH_CHARS  # reject most non-Latin fonts after three glyphs
    for path in _font_files():
        try:
            font = ImageFont.truetype(str(path), 24)
        except OSError:
            continue
        notdef_mask = font.getmask(chr(UNMAPPED_CODEPOINT))
        notdef = (notdef_mask.size, bytes(notdef_mask))
        if not any(_glyph_is_missing(font, char, notdef) for char in probe):
            usable.append(path)
    return tuple(usable)


def _check(sources_dir: Path) -> None:
    if not _usable_fonts():
        raise missing("glyphs", f"no font with all of A-Z a-z 0-9 under {', '.join(map(str, FONT_DIRS))}")


def _list(sources_dir: Path) -> list[Candidate]:
    out = []
    for path in _usable_fonts():
        # Whole fonts are held out, so a target task of held-out letters never shares a
        # typeface with the source.
        split = split_by_hash(path.name)
        out.extend(Candidate(f"glyphs:{path.stem}:{c}", c, split, (str(path), c)) for c in GLYPH_CHARS)
    return out


@functools.lru_cache(maxsize=4)
def _font_layout(path: str) -> tuple[ImageFont.FreeTypeFont, float, int]:
    """Font at render size, the scale that fits its tallest/widest glyph, and the top of its
    highest glyph above the baseline. One scale per font keeps 'o' smaller than 'O'."""
    font = ImageFont.truetype(path, GLYPH_RENDER_PX)
    boxes = [font.getbbox(c, anchor="ls") for c in GLYPH_CHARS]
    top = min(b[1] for b in boxes)
    height = max(b[3] for b in boxes) - top
    width = max(b[2] - b[0] for b in boxes)
    scale = (IMAGE_SIZE - 2 * MARGIN_PX) / max(height, width, 1)
    return font, scale, top


def _render_glyph(path: str, char: str) -> np.ndarray | None:
    font, scale, font_top = _font_layout(path)
    left, top, right, bottom = font.getbbox(char, anchor="ls")
    if right <= left or bottom <= top:
        return None
    ink = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(ink).text((-left, -top), char, font=font, fill=255, anchor="ls")
    size = (max(1, round(ink.width * scale)), max(1, round(ink.height * scale)))
    ink = ink.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    x = (IMAGE_SIZE - size[0]) // 2
    y = MARGIN_PX + round((top - font_top) * scale)
    canvas.paste(ink, (x, min(y, IMAGE_SIZE - size[1])))
    if canvas.getbbox() is None:
        return None
    grey = 255 - np.asarray(canvas, dtype=np.uint8)  # black glyph on white
    return np.repeat(grey[..., None], 3, axis=2)


def _load(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = [None] * len(candidates)
    # Font by font, so each font is opened and measured once.
    for i in sorted(range(len(candidates)), key=lambda i: candidates[i].locator):
        out[i] = _render_glyph(*candidates[i].locator)
    return out


def _describe(sources_dir: Path) -> dict:
    return {
        "package": ", ".join(GLYPH_PACKAGES),
        "version": {p: v for p in GLYPH_PACKAGES if (v := debian_version(p))},
        "fonts": len(_usable_fonts()),
        "path": [str(d) for d in FONT_DIRS],
    }


SOURCES["glyphs"] = Source("fonts-*", INSTALL, _check, _list, _load, _describe)
