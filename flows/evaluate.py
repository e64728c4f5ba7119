"""Transfer evaluation: pre-train on each strategy's selection, fine-tune on a target, compare.

Thin orchestration over `nds.evaluate`; its parameter is a pydantic model, so the Prefect
UI shows a validated form.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

import nds.evaluate.outputs
import nds.evaluate.runner
from nds._io import new_run_id
from nds.config import Workspace
from nds.evaluate.fit import fits_to_dict
from nds.evaluate.request import EvaluateRequest


@task(name="run-transfer-evaluation")
def run_evaluation(request: EvaluateRequest, root: str | None, work_dir: str, progress: bool):
    ws = Workspace.from_env(root)
    return nds.evaluate.runner.evaluate(
        ws, request.target_tasks(), request.budgets, strategies=request.strategies, seeds=request.seeds,
        shots=request.shots, test_per_class=request.test_per_class, config=request.train,
        temperature=request.temperature, work_dir=Path(work_dir), progress=progress, scorer=request.scorer,
    )


@task(name="write-evaluation-outputs")
def write_outputs(results, out_dir: str, meta: dict) -> dict:
    return nds.evaluate.outputs.write_outputs(results, Path(out_dir), meta=meta)


@task(name="record-evaluation")
def record(results, root: str | None, evaluation_id: str, index_version: str, params: dict) -> int:
    return nds.evaluate.outputs.record_evaluation(Workspace.from_env(root), results, evaluation_id=evaluation_id,
                                                  index_version=index_version, params=params)


@flow(name="evaluate")
def evaluate(request: EvaluateRequest, root: str | None = None, progress: bool = False) -> dict:
    from nds.select.service import load_current_index

    ws = Workspace.from_env(root)
    evaluation_id = new_run_id("eval")
    out_dir = Path(request.out_dir).resolve() if request.out_dir else ws.root / "evaluations" / evaluation_id
    index = load_current_index(ws)
    if request.scorer is None:  # the client's default for this bundle, recorded as such
        request = request.model_copy(update={"scorer": nds.evaluate.runner.default_scorer(ws)})
    params = request.model_dump()
    results = run_evaluation(request, str(ws.root), str(out_dir / "work"), progress)
    meta = {"evaluation_id": evaluation_id, "index_version": index.version, "n_source": index.catalog.num_rows,
            "request": params}
    outputs = write_outputs(results, str(out_dir), meta)
    n_rows = record(results, str(ws.root), evaluation_id, index.version, params)
    create_markdown_artifact(
        key="evaluation-table", markdown=f"# Transfer evaluation {evaluation_id}\n\n{outputs['markdown']}",
        description=f"NDS transfer evaluation on index {index.version}",
    )
    create_markdown_artifact(
        key="evaluation-plot",
        markdown=f"![accuracy vs budget]({Path(outputs['paths']['plot']).as_uri()})\n\n"
                 f"Plot: `{outputs['paths']['plot']}`",
        description="accuracy vs pre-training budget (log x) per strategy",
    )
    return {
        "evaluation_id": evaluation_id, "index_version": index.version, "n_source": index.catalog.num_rows,
        "out_dir": str(out_dir), "paths": outputs["paths"], "rows": n_rows, "markdown": outputs["markdown"],
        "fits": fits_to_dict(outputs["fits"]),
    }
