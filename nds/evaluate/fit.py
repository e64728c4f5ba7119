"""Accuracy against budget: the log-linear fit per strategy and its inverse.

Accuracy is summarised per strategy by a least-squares line ``acc = a + b * log(budget)``
(``fit_log_linear``), which ``predict_budget`` inverts to answer "what budget reaches
accuracy X?" with a delta-method interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nds.errors import InvalidInputError, NotFoundError

#: z for the two-sided 95 % interval of ``predict_budget``.
Z95 = 1.959963984540054
#: The fits and meta of an evaluation folder (``write_outputs`` writes it, ``load_fits`` reads it).
FITS_FILE = "fits.json"


@dataclass(frozen=True)
class LogLinearFit:
    """acc = a + b * log(budget), least squares. Unpacks as (a, b, se_a, se_b).

    ``cov_ab`` is the covariance of the two estimates (needed for the budget interval);
    standard errors are NaN with fewer than 3 points.
    """

    a: float
    b: float
    se_a: float
    se_b: float
    cov_ab: float = 0.0
    n_points: int = 0
    budget_range: tuple[float, float] = (math.nan, math.nan)

    def __iter__(self):
        return iter((self.a, self.b, self.se_a, self.se_b))

    def predict(self, budget: float) -> float:
        return self.a + self.b * math.log(budget)


def fit_log_linear(budgets: Sequence[float], accs: Sequence[float]) -> LogLinearFit:
    """Least-squares ``acc = a + b log(budget)`` over paired points (repeat budgets for seeds)."""
    x = np.asarray(budgets, dtype=np.float64)
    y = np.asarray(accs, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise InvalidInputError(f"budgets and accuracies must be 1-d and of equal length, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(x <= 0):
        raise InvalidInputError("budgets must be positive and finite, accuracies finite")
    lx = np.log(x)
    if len(np.unique(lx)) < 2:
        raise InvalidInputError("a log-linear fit needs at least 2 distinct budgets")
    design = np.column_stack([np.ones_like(lx), lx])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    n = len(y)
    if n > 2:
        resid = y - design @ coef
        sigma2 = float(resid @ resid) / (n - 2)
        cov = sigma2 * np.linalg.inv(design.T @ design)
        se_a, se_b, cov_ab = math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1]), float(cov[0, 1])
    else:
        se_a = se_b = cov_ab = math.nan
    return LogLinearFit(float(coef[0]), float(coef[1]), se_a, se_b, cov_ab, n, (float(x.min()), float(x.max())))


def predict_budget(fit: LogLinearFit, target_acc: float, *, max_budget: float | None = None,
                   z: float = Z95) -> tuple[float, float, float]:
    """Budget at which the fitted line reaches ``target_acc``, with a delta-method interval.

    Returns (budget, low, high). ``budget`` is ``inf`` when the target is out of reach: the
    line does not rise (b <= 0) or needs more than ``max_budget`` samples. The interval is
    exp(log B -+ z * se(log B)), se from the fit's covariance (NaN if the fit has none).
    """
    if not 0 < target_acc <= 1:
        raise InvalidInputError(f"target accuracy must be in (0, 1], got {target_acc}")
    a, b = fit.a, fit.b
    if b <= 0:
        return math.inf, math.inf, math.inf
    log_b = (target_acc - a) / b
    # d logB / da = -1/b ; d logB / db = -(X - a) / b^2
    ga, gb = -1.0 / b, -(target_acc - a) / b**2
    var = ga * ga * fit.se_a**2 + gb * gb * fit.se_b**2 + 2 * ga * gb * fit.cov_ab
    se = math.sqrt(var) if var >= 0 else math.nan
    budget = math.exp(min(log_b, 700.0))
    low = math.exp(min(log_b - z * se, 700.0)) if math.isfinite(se) else math.nan
    high = math.exp(min(log_b + z * se, 700.0)) if math.isfinite(se) else math.nan
    if max_budget is not None and budget > max_budget:
        return math.inf, low, high
    return budget, low, high


def budget_answer_lines(fits: dict[str, dict[str, LogLinearFit]], target_acc: float, *, n_source: int) -> list[str]:
    """Human-readable "what budget reaches accuracy X?" per task and strategy."""
    lines = []
    for task, per in fits.items():
        for strategy, f in per.items():
            budget, low, high = predict_budget(f, target_acc, max_budget=n_source)
            if not math.isfinite(budget):
                why = ("accuracy does not rise with budget" if f.b <= 0 else
                       f"would need ~{math.exp((target_acc - f.a) / f.b):,.0f} samples, more than the {n_source:,} in the source")
                lines.append(f"{task} {strategy}: accuracy {target_acc:.3f} is out of reach ({why})")
            else:
                interval = "" if not math.isfinite(low) else f" (95% interval {low:,.0f} - {high:,.0f})"
                extrap = "" if f.budget_range[0] <= budget <= f.budget_range[1] else " [extrapolated]"
                lines.append(f"{task} {strategy}: accuracy {target_acc:.3f} at ~{budget:,.0f} samples"
                             f" ({budget / n_source:.1%} of the source){interval}{extrap}")
    return lines


def fits_to_dict(fits: dict[str, dict[str, LogLinearFit]]) -> dict:
    return {t: {s: {**asdict(f), "budget_range": list(f.budget_range)} for s, f in per.items()} for t, per in fits.items()}


def fits_from_dict(doc: dict) -> dict[str, dict[str, LogLinearFit]]:
    return {t: {s: LogLinearFit(**{**f, "budget_range": tuple(f["budget_range"])}) for s, f in per.items()}
            for t, per in doc.items()}


class SavedFits(NamedTuple):
    """fits.json of a finished evaluation: the fits and the run's meta (``n_source``, the request)."""

    fits: dict[str, dict[str, LogLinearFit]]
    meta: dict


def load_fits(out_dir: Path) -> SavedFits:
    """The fits ``write_outputs`` wrote into ``out_dir`` (for `nds evaluate --from`)."""
    path = Path(out_dir) / FITS_FILE
    if not path.exists():
        raise NotFoundError(f"{out_dir}/{FITS_FILE} not found: run `nds evaluate --out {out_dir}` first")
    doc = json.loads(path.read_text())
    return SavedFits(fits_from_dict(doc["fits"]), doc["meta"])
