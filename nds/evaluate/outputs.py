"""What an evaluation leaves behind: the results table, its summary, fits, plot and warehouse rows.

``write_outputs`` writes results.parquet, summary.{parquet,csv,md}, fits.json and
accuracy_vs_budget.png (each atomically); ``record_evaluation`` inserts one warehouse row per run.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nds._io import atomic_file, write_text
from nds._registry import EVAL_STRATEGIES
from nds.config import Workspace
from nds.errors import NDSError
from nds.evaluate.fit import FITS_FILE, LogLinearFit, fit_log_linear, fits_to_dict
from nds.evaluate.strategies import BUDGETED

RESULTS_SCHEMA = pa.schema([
    ("task", pa.string()), ("domain", pa.string()), ("strategy", pa.string()), ("budget", pa.int64()),
    ("budget_fraction", pa.float64()), ("seed", pa.int64()), ("accuracy", pa.float64()),
    ("domain_precision", pa.float64()), ("n_pretrain", pa.int64()), ("pretrain_seconds", pa.float64()),
    ("finetune_seconds", pa.float64()),
])
#: One row per (task, strategy, budget, seed) run, as ``nds.evaluate.runner.evaluate`` returns them.
RESULT_COLUMNS = tuple(RESULTS_SCHEMA.names)
#: Mean and std over seeds per (task, strategy, budget), as ``summarize`` returns them.
SUMMARY_SCHEMA = pa.schema([
    ("task", pa.string()), ("strategy", pa.string()), ("budget", pa.int64()), ("budget_fraction", pa.float64()),
    ("n_seeds", pa.int64()), ("accuracy_mean", pa.float64()), ("accuracy_std", pa.float64()),
    ("domain_precision_mean", pa.float64()),
])
#: The warehouse ``evaluations`` columns (warehouse/004_evaluations.sql) ``record_evaluation`` fills.
EVALUATION_COLUMNS = ("evaluation_id", "created_at", "index_version", *RESULT_COLUMNS, "params")


def summarize(results: pa.Table) -> pa.Table:
    """Mean and std (over seeds) of accuracy and domain precision per task, strategy, budget."""
    groups: dict[tuple, list[dict]] = {}
    for r in results.to_pylist():
        groups.setdefault((r["task"], r["strategy"], r["budget"]), []).append(r)
    order = {s: i for i, s in enumerate(EVAL_STRATEGIES.names())}
    out = []
    for (task, strategy, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])):
        acc = np.asarray([r["accuracy"] for r in rs])
        prec = [r["domain_precision"] for r in rs if r["domain_precision"] is not None]
        out.append({
            "task": task, "strategy": strategy, "budget": budget, "budget_fraction": rs[0]["budget_fraction"],
            "n_seeds": len(rs), "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "domain_precision_mean": float(np.mean(prec)) if prec else None,
        })
    return pa.Table.from_pylist(out, schema=SUMMARY_SCHEMA)


def fit_strategies(results: pa.Table) -> dict[str, dict[str, LogLinearFit]]:
    """task -> strategy -> log-linear fit, for strategies measured at >= 2 distinct budgets."""
    fits: dict[str, dict[str, LogLinearFit]] = {}
    rows = results.to_pylist()
    for task in dict.fromkeys(r["task"] for r in rows):
        for strategy in BUDGETED:
            pts = [(r["budget"], r["accuracy"]) for r in rows if r["task"] == task and r["strategy"] == strategy]
            if len({b for b, _ in pts}) >= 2:
                fits.setdefault(task, {})[strategy] = fit_log_linear([b for b, _ in pts], [a for _, a in pts])
    return fits


def summary_markdown(summary: pa.Table, fits: dict[str, dict[str, LogLinearFit]]) -> str:
    lines = ["| task | strategy | budget | fraction | accuracy (mean ± std) | seeds | domain precision |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in summary.to_pylist():
        prec = "" if r["domain_precision_mean"] is None else f"{r['domain_precision_mean']:.2f}"
        lines.append(f"| {r['task']} | {r['strategy']} | {r['budget']} | {r['budget_fraction']:.1%} | "
                     f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {r['n_seeds']} | {prec} |")
    if fits:
        lines += ["", "Fitted acc = a + b·ln(budget) (least squares over seeds; ± standard errors):", "",
                  "| task | strategy | a | b | points |", "|---|---|---:|---:|---:|"]
        for task, per in fits.items():
            for strategy, f in per.items():
                lines.append(f"| {task} | {strategy} | {f.a:.3f} ± {f.se_a:.3f} | {f.b:.4f} ± {f.se_b:.4f} | {f.n_points} |")
    return "\n".join(lines) + "\n"


def plot_results(summary: pa.Table, path: Path) -> Path:
    """Accuracy vs budget (log x) per strategy, one panel per task; ``all``/``none`` as lines."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise NDSError("plotting needs matplotlib: pip install 'matplotlib>=3.8'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = summary.to_pylist()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    colours = {"nds": "tab:blue", "uniform": "tab:orange", "all": "tab:green", "none": "tab:grey"}
    for ax, task in zip(axes[0], tasks):
        budgets = sorted({r["budget"] for r in rows if r["task"] == task and r["strategy"] in BUDGETED}) or [1]
        for strategy in EVAL_STRATEGIES.names():
            rs = sorted((r for r in rows if r["task"] == task and r["strategy"] == strategy), key=lambda r: r["budget"])
            if not rs:
                continue
            m = np.asarray([r["accuracy_mean"] for r in rs])
            s = np.asarray([r["accuracy_std"] for r in rs])
            if strategy in BUDGETED:
                x = [r["budget"] for r in rs]
                ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=strategy, color=colours.get(strategy))
            else:
                label = f"{strategy} ({rs[0]['budget']})" if strategy == "all" else strategy
                ax.axhline(m[0], ls="--", color=colours.get(strategy), label=label)
                ax.axhspan(m[0] - s[0], m[0] + s[0], color=colours.get(strategy), alpha=0.12)
        ax.set_xscale("log")
        ax.set_xlim(min(budgets) / 1.3, max(budgets) * 1.3)
        # Ticks at the measured budgets only: log minor labels (2x10^3, 3x10^3, ...) overlap.
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets], fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(task)
        ax.set_xlabel("pre-training budget (source samples, log)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def write_outputs(results: pa.Table, out_dir: Path, *, meta: dict | None = None) -> dict:
    """results.parquet, summary.parquet/.csv/.md, fits.json, accuracy_vs_budget.png; atomic per file.

    Returns {"summary": Table, "fits": {...}, "markdown": str, "paths": {name: str}}.
    """
    import pyarrow.csv as pacsv

    out = Path(out_dir)
    summary = summarize(results)
    fits = fit_strategies(results)
    markdown = summary_markdown(summary, fits)
    paths = {key: out / name for key, name in (
        ("results", "results.parquet"), ("summary", "summary.parquet"), ("summary_csv", "summary.csv"),
        ("markdown", "summary.md"), ("fits", FITS_FILE), ("plot", "accuracy_vs_budget.png"))}
    for key, table in (("results", results), ("summary", summary)):
        with atomic_file(paths[key]) as tmp:
            pq.write_table(table, tmp)
    with atomic_file(paths["summary_csv"]) as tmp:
        pacsv.write_csv(summary, tmp)
    write_text(paths["markdown"], markdown)
    doc = {"meta": meta or {}, "fits": fits_to_dict(fits)}
    # Not write_json: fits.json keeps its key order (meta, then fits) and ends with a newline.
    write_text(paths["fits"], json.dumps(doc, indent=2, default=str) + "\n")
    plot_results(summary, paths["plot"])
    paths = {key: str(path) for key, path in paths.items()}
    return {"summary": summary, "fits": fits, "markdown": markdown, "paths": paths}


def record_evaluation(ws: Workspace, results: pa.Table, *, evaluation_id: str, index_version: str,
                      params: dict) -> int:
    """Insert one row per run into the warehouse ``evaluations`` table (one transaction)."""
    from nds.platform.warehouse import connect

    created = datetime.now(timezone.utc)  # evaluations.created_at is TIMESTAMPTZ
    params_json = json.dumps(params, sort_keys=True, default=str)
    rows = [[evaluation_id, created, index_version, *(r[c] for c in RESULT_COLUMNS), params_json]
            for r in results.to_pylist()]
    insert = (f"INSERT INTO evaluations ({', '.join(EVALUATION_COLUMNS)}) "
              f"VALUES ({', '.join('?' * len(EVALUATION_COLUMNS))})")
    with connect(ws.warehouse_path) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM evaluations WHERE evaluation_id = ?", [evaluation_id])
            con.executemany(insert, rows)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return len(rows)
