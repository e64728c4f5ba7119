"""Image-file tasks from Debian packages outside the source: ``icons`` and ``nebulae``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from nds.config import IMAGE_SIZE
from nds.corpus.sources._common import fit_on_square
from nds.errors import NotFoundError

#: oxygen-icon-theme's 32 px icons (their native size: nothing is resampled), one folder per category.
OXYGEN_DIR = Path("/usr/share/icons/oxygen/base/32x32")
#: Categories with fewer icons are left out (oxygen's "animations" holds 2 spinner strips).
MIN_ICONS = 10
#: stellarium-data's deep-sky photos and the common names that say what each object is.
STELLARIUM_DIR = Path("/usr/share/stellarium/nebulae/default")
#: An image is kept when the common names of its Messier/NGC/IC object name exactly one of these.
NEBULA_KINDS = ("galaxy", "nebula", "cluster")
_DESIGNATION = re.compile(r"(m|n|ic)(\d+)")
_PREFIX = {"m": "M", "n": "NGC", "ic": "IC"}


def _per_class(files_by_class: dict[str, list[Path]], per_class: int, seed: int, salt: int, load
               ) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` files per class, shuffled by seed, loaded as (32, 32, 3) uint8."""
    rng = np.random.default_rng([seed, salt])
    images, labels = [], []
    for label in sorted(files_by_class):
        files = sorted(files_by_class[label])
        for i in rng.permutation(len(files))[:per_class]:
            images.append(load(files[i]))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def _load_icon(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return fit_on_square(im.convert("RGBA"), (255, 255, 255))  # on white, as the clip-art source


def icon_files() -> dict[str, list[Path]]:
    """Category -> PNG files of oxygen-icon-theme at 32 px (NotFoundError if not installed)."""
    found = {d.name: sorted(d.glob("*.png")) for d in sorted(OXYGEN_DIR.glob("*")) if d.is_dir()}
    found = {c: f for c, f in found.items() if len(f) >= MIN_ICONS}
    if not found:
        raise NotFoundError(f"task icons needs {OXYGEN_DIR}: install it with `apt-get install oxygen-icon-theme`")
    return found


def build_icons(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Icons by category (actions, apps, devices, mimetypes, places, status, ...)."""
    return _per_class(icon_files(), per_class, seed, 0x1C0, _load_icon)


def _load_photo(path: Path) -> np.ndarray:
    """The photo's centre square, reduced to 32 px."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0), np.uint8)


def _common_names() -> dict[tuple[str, str], str]:
    """(catalogue, number) -> its common names, lower case, from stellarium's names.dat."""
    names: dict[tuple[str, str], str] = {}
    for line in (STELLARIUM_DIR / "names.dat").read_text(encoding="utf-8", errors="replace").splitlines():
        found = re.search(r'_\("([^"]*)"\)', line)
        if line.startswith("#") or not found:
            continue
        key = (line[:5].strip(), line[5:20].strip())
        names[key] = f"{names.get(key, '')} {found.group(1).lower()}"
    return names


def nebula_files() -> dict[str, list[Path]]:
    """Kind (galaxy, nebula, cluster) -> stellarium photos whose common names say exactly that kind."""
    if not (STELLARIUM_DIR / "names.dat").exists():
        raise NotFoundError(f"task nebulae needs {STELLARIUM_DIR}: install it with `apt-get install stellarium-data`")
    names = _common_names()
    kinds: dict[str, list[Path]] = {k: [] for k in NEBULA_KINDS}
    for path in sorted(STELLARIUM_DIR.glob("*.png")):
        match = _DESIGNATION.match(path.name)
        if not match:
            continue
        said = [k for k in NEBULA_KINDS if k in names.get((_PREFIX[match.group(1)], match.group(2)), "")]
        if len(said) == 1:
            kinds[said[0]].append(path)
    return kinds


def build_nebulae(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deep-sky photos by kind of object (no source domain is related)."""
    return _per_class(nebula_files(), per_class, seed, 0x5747, _load_photo)
