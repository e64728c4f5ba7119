"""The source pool and the strategies that pick source data to pre-train on.

Each strategy is registered in ``nds._registry.EVAL_STRATEGIES`` (in the order results and
plots list them) as ``selector(ws, pool, budget, *, seed, scores, temperature, manifest_dir)
-> positions into the pool``:

- ``nds``: the real client path: scores of the expert bundle on the client's TRAIN images
  (``score_task``, any scorer of ``SCORERS``), then ``nds.select.service.run_selection`` at the budget;
- ``uniform``: the same number of source samples drawn uniformly at random (seeded);
- ``all``: the whole indexed source (one budget: its size);
- ``none``: no pre-training (the fine-tuning recipe from a random initialisation).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nds._registry import EVAL_STRATEGIES
from nds.config import Workspace
from nds.errors import InvalidInputError
from nds.evaluate.tasks import TargetTask

#: Strategies whose selection size is the requested budget (``all``/``none`` ignore it).
BUDGETED = ("nds", "uniform")


@dataclass
class SourcePool:
    """The indexed source as evaluation needs it: catalog rows in index order + images.

    images: (n, 32, 32, 3) uint8; labels: (n,) str ``dataset:label``; datasets: (n,) str.
    """

    index: Any  # nds.select.service.Index
    images: np.ndarray
    labels: np.ndarray
    datasets: np.ndarray
    position: dict[str, int] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.labels)


def load_source_pool(ws: Workspace) -> SourcePool:
    from nds.corpus.read import load_images_at
    from nds.select.service import load_current_index

    index = load_current_index(ws)
    images = load_images_at(ws.data_dir, index.catalog.column("uri").to_pylist())
    datasets = np.asarray(index.catalog.column("dataset").to_pylist(), dtype=object)
    labels = np.asarray([f"{d}:{lab}" for d, lab in zip(datasets, index.catalog.column("label").to_pylist())])
    ids = index.catalog.column("sample_id").to_pylist()
    return SourcePool(index, images, labels, datasets.astype(str), {s: i for i, s in enumerate(ids)})


def score_task(ws: Workspace, task: TargetTask, *, seed: int = 0, progress: bool = False,
               mode: str = "rotation") -> dict:
    """The client's scores.json content: ``mode`` scores of the expert bundle on the TRAIN images."""
    from nds.client.images import ClientData
    from nds.client.scoring import score_experts
    from nds.formats.scores import SCORES_FORMAT, load_scores

    data = ClientData(task.train_images, task.train_labels, sorted(set(task.train_labels)), [])
    result = score_experts(ws.stage_dir("experts"), data, mode=mode, seed=seed, progress=progress)
    return load_scores({
        "format": SCORES_FORMAT, "index_version": result.bundle["index_version"],
        "bundle_sha256": result.bundle["bundle_sha256"], "mode": mode, "k": result.bundle["k"],
        "scores": [float(s) for s in result.scores],
    })


def select_for_strategy(ws: Workspace, pool: SourcePool, strategy: str, budget: int, *, seed: int,
                        scores: dict | None = None, temperature: float | None = None,
                        manifest_dir: Path | None = None) -> np.ndarray:
    """Positions into ``pool`` to pre-train on: (budget,) int64 (``all``: every row; ``none``: empty)."""
    selector = EVAL_STRATEGIES[strategy]
    if strategy in BUDGETED and not 1 <= budget <= pool.size:
        raise InvalidInputError(f"budget {budget} must be between 1 and the {pool.size} source samples")
    return selector(ws, pool, budget, seed=seed, scores=scores, temperature=temperature, manifest_dir=manifest_dir)


@EVAL_STRATEGIES.register("nds")
def _select_nds(ws, pool, budget, *, seed, scores, temperature, manifest_dir) -> np.ndarray:
    import pyarrow.parquet as pq

    from nds.select.request import DEFAULT_TEMPERATURE, SelectRequest
    from nds.select.service import run_selection

    if scores is None:
        raise InvalidInputError("strategy 'nds' needs the client's scores (score_task)")
    request = SelectRequest(scores=scores, budget=budget, seed=seed,
                            temperature=temperature or DEFAULT_TEMPERATURE)
    own_dir = manifest_dir is None
    out = Path(tempfile.mkdtemp(prefix="nds-eval-manifest-")) if own_dir else Path(manifest_dir)
    try:
        summary = run_selection(ws, request, out_dir=out, origin="evaluation")  # not a client's request
        ids = pq.read_table(Path(summary["manifest_location"]) / "manifest.parquet",
                            columns=["sample_id"]).column("sample_id").to_pylist()
    finally:
        if own_dir:
            shutil.rmtree(out, ignore_errors=True)
    return np.asarray([pool.position[s] for s in ids], dtype=np.int64)


@EVAL_STRATEGIES.register("uniform")
def _select_uniform(ws, pool, budget, *, seed, **_) -> np.ndarray:
    rng = np.random.default_rng([seed, budget])
    return np.sort(rng.choice(pool.size, size=budget, replace=False)).astype(np.int64)


@EVAL_STRATEGIES.register("all")
def _select_all(ws, pool, budget, **_) -> np.ndarray:
    return np.arange(pool.size, dtype=np.int64)


@EVAL_STRATEGIES.register("none")
def _select_none(ws, pool, budget, **_) -> np.ndarray:
    return np.empty(0, dtype=np.int64)


def domain_precision(pool: SourcePool, positions: np.ndarray, domains) -> float | None:
    """Share of the selected samples from the target's own or related domain(s) (None if none/empty).

    domains: one source domain name, or a sequence of them (``TargetTask.related_domains``).
    """
    domains = (domains,) if isinstance(domains, str) else tuple(domains or ())
    if not domains or len(positions) == 0:
        return None
    return float(np.mean(np.isin(pool.datasets[positions], domains)))
