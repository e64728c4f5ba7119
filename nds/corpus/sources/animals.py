"""Animal silhouettes from the PyPI package animal-mnist, read without importing it."""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import importlib.util
import io
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nds._registry import SOURCES
from nds.corpus.sources._base import Candidate, Source, split_by_hash
from nds.corpus.sources._common import grey28_to_rgb32, missing, require

ANIMALS_PACKAGE = "animal_mnist"
ANIMALS_FILES = ("data/Animal_MNIST/animal_data_version_3.gz", "data/Animal_MNIST/animal_label_version_3.gz")
#: The package lists its classes alphabetically and its label ids follow that order
#: (checked by eye on a montage of each id: 0 bears ... 9 zebras).
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
INSTALL = "pip install --no-deps animal-mnist==0.4"


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
        raise missing("animals", f"python package {ANIMALS_PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0])


def _check(sources_dir: Path) -> None:
    folder = _animals_dir()
    require("animals", *(folder / name for name in ANIMALS_FILES))


@functools.lru_cache(maxsize=1)
def _arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    loaded = []
    for name in ANIMALS_FILES:
        with gzip.open(folder / name, "rb") as fh:
            loaded.append(np.asarray(_NumpyOnlyUnpickler(io.BytesIO(fh.read())).load()))
    images, labels = loaded
    return images.astype(np.uint8, copy=False), labels.astype(np.int64, copy=False)


def _list(sources_dir: Path) -> list[Candidate]:
    _, labels = _arrays(_animals_dir())
    out = []
    for i, label in enumerate(labels.tolist()):
        sample_id = f"animals:{i:05d}"
        out.append(Candidate(sample_id, ANIMAL_CLASSES[label], split_by_hash(sample_id), i))
    return out


def _load(candidates: Sequence[Candidate], sources_dir: Path) -> list[np.ndarray | None]:
    images, _ = _arrays(_animals_dir())
    if not candidates:
        return []
    return list(grey28_to_rgb32(images[[c.locator for c in candidates]]))


def _describe(sources_dir: Path) -> dict:
    try:
        version = importlib.metadata.version("animal-mnist")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package": "pypi animal-mnist", "version": version, "path": str(_animals_dir())}


SOURCES["animals"] = Source("animal-mnist", INSTALL, _check, _list, _load, _describe)
