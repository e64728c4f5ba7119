"""Transfer evaluation: does pre-training on the NDS selection help a target task?

For a target task (``nds.evaluate.tasks``: a client's few-shot labelled train set and a test
set) and a list of budgets, each strategy (``nds.evaluate.strategies``: nds, uniform, all,
none) picks source data, a small CNN is pre-trained on it with the source labels (label space
``dataset:label``), fine-tuned on the client's train set and scored on its test set
(``nds.evaluate.training``). ``nds.evaluate.outputs`` summarises and stores the results,
``nds.evaluate.fit`` fits accuracy against log(budget).

Pure library code: no Prefect import; the ``evaluate`` flow (``flows/evaluate.py``) and
``nds evaluate`` orchestrate it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from nds._registry import EVAL_STRATEGIES
from nds.config import Workspace
from nds.errors import InvalidInputError
from nds.evaluate.outputs import RESULTS_SCHEMA
from nds.evaluate.strategies import BUDGETED, domain_precision, load_source_pool, score_task, select_for_strategy
from nds.evaluate.tasks import TASKS, TargetTask, build_target_task
from nds.evaluate.training import TrainConfig, finetune_and_test, pretrain
from nds.select.probability import budget_from_number, resolve_budget

log = logging.getLogger(__name__)

#: Torch threads while evaluating. Measured on the 2-core dev machine next to other jobs:
#: one thread trains this small CNN 4x faster per step than two (0.11 s vs 0.45 s for a
#: 128-image step), because the tiny convolutions do not amortise threading overhead.
TORCH_THREADS = 1


def resolve_budgets(budgets: Sequence[float], n_source: int) -> list[int]:
    """Counts (>= 1, whole) or fractions (0 < f < 1) of the source -> sorted distinct counts.

    Each budget goes through ``nds.select.probability.resolve_budget``; a whole float such as
    500.0 (the CLI and the request carry floats) is a count there, 1.0 included.
    """
    if not budgets:
        raise InvalidInputError("give at least one budget (a count such as 2000 or a fraction such as 0.1)")
    counts = set()
    for b in budgets:
        counts.add(resolve_budget(budget_from_number(b), n_source))
    return sorted(counts)


def _selection_key(positions: np.ndarray, seed: int, config: TrainConfig) -> str:
    h = hashlib.sha256(np.ascontiguousarray(positions).tobytes())
    h.update(json.dumps([seed, config.model_dump()], sort_keys=True).encode())
    return h.hexdigest()


def default_scorer(ws: Workspace) -> str:
    """The scorer ``nds client score`` uses without --mode for the workspace's expert bundle."""
    from nds.formats.bundle import default_mode, load_bundle

    return default_mode(load_bundle(ws.stage_dir("experts"), verify=False))


def evaluate(ws: Workspace, tasks: Sequence[str | TargetTask], budgets: Sequence[float], *,
             strategies: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2), shots: int = 10,
             test_per_class: int = 50, config: TrainConfig | None = None, temperature: float | None = None,
             work_dir: Path | None = None, progress: bool = True, device: str | None = None,
             scorer: str | None = None) -> pa.Table:
    """Run every (task, strategy, budget, seed); one row per run (``outputs.RESULT_COLUMNS``).

    ``tasks``: built-in names (``TASKS``; rebuilt per seed, so the few-shot split varies
    with the seed) or ready ``TargetTask``s. ``budgets``: counts or fractions of the source.
    ``strategies``: some of ``EVAL_STRATEGIES`` (default: all of them). ``all`` gets one row per
    seed at the source size, ``none`` one at budget 0. A model
    pre-trained on the same rows with the same seed is reused (``uniform`` and ``all`` do
    not depend on the task), so several tasks cost less than their sum.
    ``work_dir`` keeps the ``nds`` manifests (default: a temporary folder, removed).
    ``device``: where pre-training, fine-tuning and scoring run (None: $NDS_DEVICE, else auto).
    ``scorer``: how the ``nds`` strategy scores the experts on the task's train images (``SCORERS``;
    None: ``default_scorer``, what ``nds client score`` uses without --mode).
    """
    from nds.models.device import is_cpu, pick_device
    from nds.models.experts import torch_threads

    dev = pick_device(device)
    with torch_threads(TORCH_THREADS):
        return _evaluate(ws, tasks, budgets, strategies=strategies, seeds=seeds, shots=shots,
                         test_per_class=test_per_class, config=config, temperature=temperature,
                         work_dir=work_dir, progress=progress, on={} if is_cpu(dev) else {"device": dev},
                         scorer=scorer)


def _evaluate(ws, tasks, budgets, *, strategies, seeds, shots, test_per_class, config, temperature, work_dir,
              progress, on, scorer) -> pa.Table:
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    known = EVAL_STRATEGIES.names()
    strategies = known if strategies is None else strategies
    unknown = sorted(set(strategies) - set(known))
    if unknown or not strategies:
        raise InvalidInputError(f"unknown strategies {unknown or list(strategies)}; choose from: {', '.join(known)}")
    if not tasks:
        raise InvalidInputError(f"give at least one target task: {', '.join(TASKS)} or your own folders")
    for t in tasks:
        if isinstance(t, str) and t not in TASKS:
            raise InvalidInputError(f"unknown target task {t!r}; choose one of: {', '.join(TASKS)}")
    if not seeds:
        raise InvalidInputError("give at least one seed")
    pool = load_source_pool(ws)
    counts = resolve_budgets(budgets, pool.size)
    scorer = scorer or default_scorer(ws)
    strategies = [s for s in known if s in strategies]
    plan = []
    for s in strategies:
        run_budgets = counts if s in BUDGETED else [pool.size if s == "all" else 0]
        plan.extend((s, b) for b in run_budgets)
    cache: dict[str, Any] = {}
    rows = []
    own_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="nds-eval-")) if own_dir else Path(work_dir)
    total = len(tasks) * len(seeds) * len(plan)
    bar = tqdm(total=total, desc="evaluate", unit="run", disable=not progress)
    try:
        for t in tasks:
            for seed in seeds:
                task = (build_target_task(ws, t, shots=shots, seed=seed, test_per_class=test_per_class)
                        if isinstance(t, str) else t)
                scores = score_task(ws, task, seed=seed, mode=scorer) if "nds" in strategies else None
                for strategy, budget in plan:
                    bar.set_postfix_str(f"{task.name} {strategy} {budget} seed {seed}")
                    mdir = work / "manifests" / f"{task.name}-{strategy}-{budget}-seed{seed}"
                    positions = select_for_strategy(ws, pool, strategy, budget, seed=seed, scores=scores,
                                                    temperature=temperature,
                                                    manifest_dir=mdir if strategy == "nds" else None)
                    t0 = time.perf_counter()
                    model = None
                    if len(positions):
                        key = _selection_key(positions, seed, config)
                        if key not in cache:
                            cache[key] = pretrain(pool.images[positions], pool.labels[positions], config=config,
                                                  seed=seed, progress=progress, **on)
                        model = cache[key]
                    t1 = time.perf_counter()
                    acc = finetune_and_test(model, task.train_images, task.train_labels, task.test_images,
                                            task.test_labels, config=config, seed=seed, **on)
                    rows.append({
                        "task": task.name, "domain": task.domain_label, "strategy": strategy, "budget": int(budget),
                        "budget_fraction": budget / pool.size, "seed": int(seed), "accuracy": float(acc),
                        "domain_precision": domain_precision(pool, positions, task.related_domains),
                        "n_pretrain": int(len(positions)), "pretrain_seconds": round(t1 - t0, 3),
                        "finetune_seconds": round(time.perf_counter() - t1, 3),
                    })
                    log.info("%s %s budget %d seed %d: accuracy %.3f", task.name, strategy, budget, seed, acc)
                    bar.update(1)
    finally:
        bar.close()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
