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

One module per source (``mnist``, ``fashion``, ``animals``, ``glyphs``, ``clipart``,
``sprites``, ``emoji``) registers its :class:`Source` in ``nds._registry.SOURCES``;
importing this package imports all of them.
"""

from __future__ import annotations

from nds.corpus.sources._base import (
    HOLDOUT,
    HOLDOUT_PERMILLE,
    SOURCE,
    Candidate,
    Source,
    hash_permille,
    rank_key,
    split_by_hash,
)

# The readers register themselves in nds._registry.SOURCES as they are imported, in this
# order (the order of nds.corpus.build.DATASETS); importing any one of them runs this first.
from nds.corpus.sources import mnist, fashion, animals, glyphs, clipart, sprites, emoji  # noqa: F401,I001

__all__ = ["HOLDOUT", "HOLDOUT_PERMILLE", "SOURCE", "Candidate", "Source", "hash_permille", "rank_key", "split_by_hash"]
