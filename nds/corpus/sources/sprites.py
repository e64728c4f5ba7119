"""Game sprites: the 32 px cells of the crawl-tiles-data sprite sheets worth keeping."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from nds._registry import SOURCES
from nds.corpus.sources._base import Candidate, Source, split_by_hash
from nds.corpus.sources._common import debian_version, missing, require

SPRITES_DIR = Path("/usr/share/crawl/dat/tiles")
INSTALL = "apt-get install -y crawl-tiles-data"
SPRITE_CELL = 32
SPRITE_SKIP = re.compile(r"^(title_|logo|stone_soup_icon)")
#: A sprite cell is kept if at least this share of its pixels is visible ...
SPRITE_MIN_COVERAGE = 0.05
#: ... and its colours vary by more than this (grey levels), i.e. it is not a flat fill.
SPRITE_MIN_RANGE = 16


def _sheets() -> list[Path]:
    return [p for p in sorted(SPRITES_DIR.glob("*.png")) if not SPRITE_SKIP.match(p.name)]


def _check(sources_dir: Path) -> None:
    require("sprites", SPRITES_DIR)
    if not _sheets():
        raise missing("sprites", f"no sprite sheets in {SPRITES_DIR}")


@functools.lru_cache(maxsize=16)
def _cells(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Cells of one sheet composited on black (the game's unexplored background), and a
    mask of the cells worth keeping. ``cells: (rows, cols, 32, 32, 3) uint8``."""
    with Image.open(path) as sheet:
        rgba = np.asarray(sheet.convert("RGBA"), dtype=np.float32)
    rows, cols = rgba.shape[0] // SPRITE_CELL, rgba.shape[1] // SPRITE_CELL
    rgba = rgba[: rows * SPRITE_CELL, : cols * SPRITE_CELL]
    rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
    cells = np.rint(rgb).astype(np.uint8).reshape(rows, SPRITE_CELL, cols, SPRITE_CELL, 3).swapaxes(1, 2)
    alpha = rgba[..., 3].reshape(rows, SPRITE_CELL, cols, SPRITE_CELL).swapaxes(1, 2)
    coverage = (alpha > 0).mean(axis=(2, 3))
    spread = cells.reshape(rows, cols, -1).max(axis=2).astype(int) - cells.reshape(rows, cols, -1).min(axis=2)
    keep = (coverage >= SPRITE_MIN_COVERAGE) & (spread > SPRITE_MIN_RANGE)
    return cells, keep


def _list(sources_dir: Path) -> list[Candidate]:
    out = []
    for path in _sheets():
        _, keep = _cells(path)
        for r, c in zip(*np.nonzero(keep)):
            sample_id = f"sprites:{path.stem}:r{r:03d}c{c:03d}"
            out.append(Candidate(sample_id, path.stem, split_by_hash(sample_id), (path, int(r), int(c))))
    return out


def _load(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    return [_cells(path)[0][r, c].copy() for path, r, c in (c.locator for c in candidates)]


def _describe(sources_dir: Path) -> dict:
    return {"package": "crawl-tiles-data", "version": debian_version("crawl-tiles-data"), "path": str(SPRITES_DIR)}


SOURCES["sprites"] = Source("crawl-tiles-data", INSTALL, _check, _list, _load, _describe)
