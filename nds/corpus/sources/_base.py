"""What every source reader is and produces: :class:`Candidate`, :class:`Source`, and the hash split."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCE, HOLDOUT = "source", "holdout"

#: Share of samples (or of fonts, for glyphs) reserved for client target tasks, in
#: thousandths so the split is an integer comparison on a hash.
HOLDOUT_PERMILLE = 200


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
