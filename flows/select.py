"""On-demand selection (NDS "server, online"): client scores -> export manifest.

Its parameter is a pydantic model, so the Prefect UI shows a validated form.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from nds.config import Workspace
from nds.report import selection_summary_markdown
from nds.select.service import SelectRequest, run_selection


@task(name="select-samples")
def select_samples(request: SelectRequest, root: str | None, out_dir: str | None) -> dict:
    return run_selection(Workspace.from_env(root), request, out_dir=out_dir)


@flow(name="select")
def select(request: SelectRequest, root: str | None = None, out_dir: str | None = None) -> dict:
    summary = select_samples(request, root, out_dir)
    create_markdown_artifact(
        key="selection-summary",
        markdown=selection_summary_markdown(summary),
        description=f"NDS selection {summary['selection_id']}",
    )
    return summary
