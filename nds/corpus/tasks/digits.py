"""Digit tasks from outside the source: ``digits-m`` (MNIST-M style) and ``lcd-digits`` (fonts-dseg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nds.config import IMAGE_SIZE, Workspace
from nds.errors import NotFoundError

DIGITS = tuple(str(d) for d in range(10))
#: Where Debian's fonts-dseg puts its fonts; only these files are read.
DSEG_DIR = Path("/usr/share/fonts/truetype/dseg")
#: Source domains whose HELD-OUT images give digits-m its colour patches.
TEXTURE_DOMAINS = ("clipart", "sprites")
#: Patch side cut from a 32 px texture before it is scaled to 32 px: small crops are smooth
#: colour fields, large ones keep the drawing's structure (MNIST-M's BSDS patches vary alike).
PATCH_MIN, PATCH_MAX = 8, 24
#: lcd-digits is drawn at 2x and reduced, so thin segments are anti-aliased like a photo's.
LCD_CANVAS = 2 * IMAGE_SIZE


def build_digits_m(ws: Workspace, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out MNIST digits blended over colour patches: out = |patch - digit| per channel."""
    from nds.corpus.read import load_catalog, load_images_at

    cat = load_catalog(ws.data_dir, split="holdout")
    ds = np.asarray(cat.column("dataset").to_pylist(), dtype=object)
    labels = np.asarray(cat.column("label").to_pylist(), dtype=object).astype(str)
    uris = np.asarray(cat.column("uri").to_pylist(), dtype=object)
    textures = np.flatnonzero(np.isin(ds, TEXTURE_DOMAINS))
    if not (ds == "mnist").any() or len(textures) == 0:
        raise NotFoundError(f"task digits-m needs held-out mnist and {'/'.join(TEXTURE_DOMAINS)} images in "
                            f"{ws.data_dir}: build the corpus first (`nds corpus build`)")
    rng = np.random.default_rng([seed, 0xD161])
    picked = []
    for d in DIGITS:
        members = np.flatnonzero((ds == "mnist") & (labels == d))
        picked.extend(rng.permutation(members)[:per_class].tolist())
    picked = np.asarray(picked, dtype=np.int64)
    digits = load_images_at(ws.data_dir, uris[picked].tolist())[..., 0].astype(np.int16)
    tex_rows = rng.choice(textures, size=len(picked))
    tex = load_images_at(ws.data_dir, uris[tex_rows].tolist())
    out = np.empty((len(picked), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(len(picked)):
        side = int(rng.integers(PATCH_MIN, PATCH_MAX + 1))
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - side + 1, size=2))
        patch = Image.fromarray(tex[i][y:y + side, x:x + side]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        patch = np.asarray(patch, dtype=np.int16)[..., rng.permutation(3)]
        out[i] = np.abs(patch - digits[i][..., None]).astype(np.uint8)
    return out, labels[picked]


def dseg_fonts() -> list[Path]:
    """The seven- and fourteen-segment fonts of fonts-dseg, sorted (NotFoundError if not installed)."""
    fonts = sorted(p for p in DSEG_DIR.glob("DSEG*.ttf") if p.name.startswith(("DSEG7", "DSEG14")))
    if not fonts:
        raise NotFoundError(f"task lcd-digits needs the fonts-dseg fonts in {DSEG_DIR}: "
                            "install them with `apt-get install fonts-dseg`")
    return fonts


def _draw_lcd(font_path: Path, digit: str, rng: np.random.Generator) -> np.ndarray:
    """One segment-display digit, (32, 32, 3) uint8, its look drawn from ``rng``."""
    size = int(rng.integers(30, 54))
    font = ImageFont.truetype(str(font_path), size)
    stroke = int(rng.integers(0, 3))
    ink = Image.new("L", (LCD_CANVAS, LCD_CANVAS), 0)
    draw = ImageDraw.Draw(ink)
    left, top, right, bottom = draw.textbbox((0, 0), "8", font=font, stroke_width=stroke)
    x = (LCD_CANVAS - (right - left)) // 2 - left + int(rng.integers(-4, 5))
    y = (LCD_CANVAS - (bottom - top)) // 2 - top + int(rng.integers(-4, 5))
    if rng.random() < 0.5:  # the unlit segments of a real display, faintly visible
        draw.text((x, y), "8", font=font, fill=int(rng.integers(30, 90)), stroke_width=stroke)
    draw.text((x, y), digit, font=font, fill=255, stroke_width=stroke)
    alpha = np.asarray(ink.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS), np.float64)[..., None] / 255
    fg, bg = rng.uniform(170, 255), rng.uniform(0, 70)
    if rng.random() < 0.5:
        fg, bg = 255 - fg, 255 - bg  # dark segments on a light panel
    tint = rng.uniform(0.55, 1.0, size=3) if rng.random() < 0.4 else np.ones(3)
    img = (bg + (fg - bg) * alpha) * tint + rng.normal(0.0, rng.uniform(0, 20), size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def build_lcd_digits(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` drawings of each digit 0-9 in random fonts-dseg fonts and looks."""
    fonts = dseg_fonts()
    rng = np.random.default_rng([seed, 0x1CD])
    images, labels = [], []
    for d in DIGITS:
        for _ in range(per_class):
            images.append(_draw_lcd(fonts[int(rng.integers(len(fonts)))], d, rng))
            labels.append(d)
    return np.stack(images), np.asarray(labels)
