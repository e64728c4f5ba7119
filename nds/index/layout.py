"""The cluster layout: sample indices grouped by cluster, one pair of .npy files per index.

The weights stage writes it (`weights/layout/`); the clustered sampler reads it and then
touches only the B drawn positions, so a selection costs O(K + B) however large N is.

    order   (N,) int32 (int64 if N >= 2**31): the members of cluster c, in index order,
            at order[offsets[c]:offsets[c + 1]]
    offsets (K + 1,) int64, rising from 0 to N
"""

from __future__ import annotations

from numbers import Integral
from pathlib import Path

import numpy as np

from nds._io import atomic_file
from nds.errors import InvalidInputError, NotFoundError

LAYOUT_FILES = ("order.npy", "offsets.npy")

# Counting sort block: 2**20 int16 codes sort in cache-sized pieces (see GROUP_BLOCK in
# nds.select.samplers.two_stage) while keeping the Python loop to N / 1e6 iterations.
LAYOUT_BLOCK = 2**20

# numpy's stable argsort is a radix sort for integer types of 16 bits or less, so
# cluster codes are narrowed to int16 whenever K allows.
RADIX_SORT_MAX_CLUSTERS = int(np.iinfo(np.int16).max)


def narrow_codes(a: np.ndarray, k: int) -> np.ndarray:
    """Cluster ids as int16 when K allows, so numpy's stable argsort is a radix sort."""
    return a.astype(np.int16) if k <= RADIX_SORT_MAX_CLUSTERS else a


def build_cluster_layout(assignments, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices grouped by cluster, computed once per index for select_samples_clustered.

    assignments: (N,) int cluster ids in [0, k) (a memory-mapped array is read block by block).
    Returns (order, offsets): order (N,) int32 (int64 if N >= 2**31) holds the members of
    cluster c, in index order, at order[offsets[c]:offsets[c + 1]]; offsets (k + 1,) int64.
    O(N) time (a blockwise counting sort), memory: the output plus one block.
    """
    a = np.asarray(assignments)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise InvalidInputError(f"assignments must be a (N,) array of integer cluster ids, got {a.dtype} {a.shape}")
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise InvalidInputError(f"k must be a positive int (the number of clusters), got {k!r}")
    k = int(k)
    n = a.size
    counts = np.zeros(k, dtype=np.int64)
    for lo in range(0, n, LAYOUT_BLOCK):
        block = a[lo : lo + LAYOUT_BLOCK]
        if block.min() < 0 or block.max() >= k:
            raise InvalidInputError(
                f"assignments hold cluster ids in [{int(block.min())}, {int(block.max())}] "
                f"but k={k}: ids must lie in [0, k)"
            )
        counts += np.bincount(block, minlength=k)
    offsets = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    order = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
    cursor = offsets[:-1].copy()
    for lo in range(0, n, LAYOUT_BLOCK):
        codes = narrow_codes(np.asarray(a[lo : lo + LAYOUT_BLOCK]), k)
        local = np.argsort(codes, kind="stable")
        cnt = np.bincount(codes, minlength=k)
        sorted_codes = codes[local].astype(np.int64)
        within = np.arange(local.size) - (np.cumsum(cnt) - cnt)[sorted_codes]
        order[cursor[sorted_codes] + within] = local + lo
        cursor += cnt
    return order, offsets


def save_cluster_layout(layout, directory) -> list:
    """Write (order, offsets) as .npy files in `directory` (atomically each); returns the paths."""
    order, offsets = as_layout(layout)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arr in zip(LAYOUT_FILES, (order, offsets)):
        path = directory / name
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        paths.append(path)
    return paths


def load_cluster_layout(directory, *, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read the layout written by save_cluster_layout; `order` memory-mapped unless mmap=False."""
    directory = Path(directory)
    missing = [n for n in LAYOUT_FILES if not (directory / n).exists()]
    if missing:
        raise NotFoundError(f"cluster layout {missing} missing in {directory}: rebuild it with build_cluster_layout")
    order = np.load(directory / LAYOUT_FILES[0], mmap_mode="r" if mmap else None)
    offsets = np.load(directory / LAYOUT_FILES[1])
    return as_layout((order, offsets))


def as_layout(layout) -> tuple[np.ndarray, np.ndarray]:
    """Check an (order, offsets) pair; returns it with offsets as int64 (order untouched)."""
    try:
        order, offsets = layout
    except (TypeError, ValueError):
        raise InvalidInputError("layout must be the (order, offsets) pair from build_cluster_layout") from None
    order = order if isinstance(order, np.ndarray) else np.asarray(order)
    offsets = np.asarray(offsets)
    if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
        raise InvalidInputError(f"layout order must be a (N,) integer array, got {order.dtype} {order.shape}")
    if offsets.ndim != 1 or offsets.size < 2 or not np.issubdtype(offsets.dtype, np.integer):
        raise InvalidInputError(f"layout offsets must be a (K+1,) integer array, got {offsets.dtype} {offsets.shape}")
    offsets = offsets.astype(np.int64, copy=False)
    if offsets[0] != 0 or offsets[-1] != order.size or (np.diff(offsets) < 0).any():
        raise InvalidInputError(
            f"layout offsets must rise from 0 to N={order.size}: the layout files come from "
            "different index versions (rebuild it with build_cluster_layout)"
        )
    return order, offsets
