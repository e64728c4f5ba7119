"""What the index stages share: their atomic output folders and reading earlier stages' artifacts.

Each stage writes its folder under `artifacts/` atomically (build in a temporary sibling, then
swap) and reads earlier stages only through their stored artifacts, never through memory.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nds._io import atomic_dir
from nds.config import Workspace
from nds.errors import NotFoundError


@contextmanager
def stage_output(ws: Workspace, name: str) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `artifacts/<name>` in one rename."""
    with atomic_dir(ws.stage_dir(name)) as tmp:
        yield tmp


def read_json(path: Path) -> dict:
    if not path.exists():
        raise NotFoundError(f"{path} is missing: run the stage that makes it (`nds index` or `dvc repro`)")
    return json.loads(path.read_text())


def require(path: Path, stage: str) -> Path:
    """`path` if it exists, else a NotFoundError naming the stage that makes it."""
    if not path.exists():
        raise NotFoundError(f"{path} is missing: run the `{stage}` stage first (`nds index` or `dvc repro {stage}`)")
    return path


def load_index_order(ws: Workspace) -> pa.Table:
    """The source samples in feature/assignment order (written by the extract stage)."""
    return pq.read_table(require(ws.stage_dir("extract") / "index.parquet", "extract"))


def load_assignments(ws: Workspace) -> np.ndarray:
    return np.load(require(ws.stage_dir("cluster") / "assignments.npy", "cluster"))


def load_index_images(ws: Workspace, positions: np.ndarray, index: pa.Table | None = None) -> np.ndarray:
    """Corpus-format images of the index rows at ``positions`` (in that order).

    Packaged rows come from the corpus arrays; a registered source's rows from the pixels the
    extract stage decoded from the originals (``artifacts/extract/pixels.npy``), so no stage
    after extract fetches an object again.
    """
    from nds.corpus.read import load_images_at

    index = load_index_order(ws) if index is None else index
    positions = np.asarray(positions, dtype=np.int64)
    uris = index.column("uri").take(positions).to_pylist()
    pixel_row = (index.column("pixel_row").take(positions).to_numpy() if "pixel_row" in index.column_names
                 else np.full(len(positions), -1, dtype=np.int64))
    packaged = np.flatnonzero(pixel_row < 0)
    if len(packaged) == len(positions):
        return load_images_at(ws.data_dir, uris)
    from nds.config import IMAGE_SIZE

    out = np.empty((len(positions), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    if len(packaged):
        out[packaged] = load_images_at(ws.data_dir, [uris[i] for i in packaged])
    decoded = np.flatnonzero(pixel_row >= 0)
    pixels = np.load(require(ws.stage_dir("extract") / "pixels.npy", "extract"), mmap_mode="r")
    order = np.argsort(pixel_row[decoded], kind="stable")  # forward reads through the memory map
    out[decoded[order]] = pixels[pixel_row[decoded][order]]
    return out
