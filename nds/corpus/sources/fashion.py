"""Fashion-MNIST from the Debian package dataset-fashion-mnist (gzipped IDX files)."""

from __future__ import annotations

import functools
import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nds._registry import SOURCES
from nds.corpus.sources._base import Candidate, Source
from nds.corpus.sources._common import debian_version, idx_candidates, idx_load, parse_idx, require

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
INSTALL = "apt-get install -y dataset-fashion-mnist"


def _check(sources_dir: Path) -> None:
    files = [f"{part}-{kind}-ubyte.gz" for part in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
    require("fashion", *(FASHION_DIR / name for name in files))


@functools.lru_cache(maxsize=2)
def _arrays(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for part in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            with gzip.open(folder / f"{part}-{kind}-ubyte.gz", "rb") as fh:
                arrays[f"{part}-{kind}"] = parse_idx(fh.read())
    return arrays


def _list(sources_dir: Path) -> list[Candidate]:
    return idx_candidates("fashion", _arrays(FASHION_DIR), FASHION_CLASSES)


def _load(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    return idx_load(_arrays(FASHION_DIR), candidates)


def _describe(sources_dir: Path) -> dict:
    version = debian_version("dataset-fashion-mnist")
    return {"package": "dataset-fashion-mnist", "version": version, "path": str(FASHION_DIR)}


SOURCES["fashion"] = Source("dataset-fashion-mnist", INSTALL, _check, _list, _load, _describe)
