"""Client tasks from collections the server has never indexed (cross-domain targets).

The built-in held-out tasks (``nds.evaluate.tasks``) are new images of a source domain; a real
client's images come from elsewhere. Each task here is built from data that is NOT in the
source corpus, and names the source domain(s) a person would call related (none for
``nebulae``: there NDS must simply do no harm):

- ``digits-m``: held-out MNIST digits blended over colour patches of held-out clip art and
  sprites (the MNIST-M construction, ``|patch - digit|``) -> mnist;
- ``lcd-digits``: digits drawn with the seven- and fourteen-segment fonts of Debian
  ``fonts-dseg``, varied size, slant, weight, polarity, tint and noise -> mnist, glyphs;
- ``icons``: Debian ``oxygen-icon-theme`` 32 px icons by category -> clipart, emoji;
- ``nebulae``: Debian ``stellarium-data`` deep-sky photos as galaxy / nebula / cluster -> none.

A builder returns up to ``per_class`` images per class, the same for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from nds.config import Workspace
from nds.errors import InvalidInputError, NotFoundError

#: (ws, per_class, seed) -> (images (n, 32, 32, 3) uint8, labels (n,) str), grouped by class.
Builder = Callable[[Workspace, int, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class OutsideTask:
    """A target task built from data outside the source corpus."""

    name: str
    related: tuple[str, ...]
    description: str
    build: Builder


def _digits_m(ws: Workspace, per_class: int, seed: int):
    from nds.corpus.tasks.digits import build_digits_m

    return build_digits_m(ws, per_class, seed)


def _lcd_digits(ws: Workspace, per_class: int, seed: int):
    from nds.corpus.tasks.digits import build_lcd_digits

    return build_lcd_digits(per_class, seed)


def _icons(ws: Workspace, per_class: int, seed: int):
    from nds.corpus.tasks.files import build_icons

    return build_icons(per_class, seed)


def _nebulae(ws: Workspace, per_class: int, seed: int):
    from nds.corpus.tasks.files import build_nebulae

    return build_nebulae(per_class, seed)


OUTSIDE_TASKS: dict[str, OutsideTask] = {t.name: t for t in (
    OutsideTask("digits-m", ("mnist",), "held-out MNIST digits over colour clip-art/sprite patches", _digits_m),
    OutsideTask("lcd-digits", ("mnist", "glyphs"), "seven/fourteen-segment digits (fonts-dseg)", _lcd_digits),
    OutsideTask("icons", ("clipart", "emoji"), "Oxygen icon categories (oxygen-icon-theme)", _icons),
    OutsideTask("nebulae", (), "deep-sky photos: galaxy, nebula, cluster (stellarium-data)", _nebulae),
)}


def build_outside_task(ws: Workspace, name: str, *, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` images per class of task ``name``: (images (n, 32, 32, 3) uint8, labels (n,) str)."""
    if name not in OUTSIDE_TASKS:
        raise InvalidInputError(f"unknown cross-domain task {name!r}; choose one of: {', '.join(OUTSIDE_TASKS)}")
    if per_class < 1:
        raise InvalidInputError(f"per_class must be >= 1, got {per_class}")
    images, labels = OUTSIDE_TASKS[name].build(ws, per_class, seed)
    if len(images) == 0:
        raise NotFoundError(f"task {name!r} found no images; install its Debian package (scripts/setup.sh)")
    return images, np.asarray(labels).astype(str)
