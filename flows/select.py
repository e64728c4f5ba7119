"""On-demand selection (NDS "server, online"): a client's scores -> an export manifest.

The `select` deployment's form is the request model (nds.select.request): Prefect refuses a
bad form before any run exists. A run is named after the request (`select-<folder>-<budget>`);
one that NDS refuses (scores for another index, an unknown dataset, ...) fails with NDS's
one-line message as its state message and no traceback; it leaves an artifact with the
selected images, the manifest's links and its full checksum when it succeeds.
"""

from __future__ import annotations

import logging

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from nds.config import Workspace
from nds.errors import NDSError
from nds.report import MANIFEST_LINK_EXPIRY_S, manifest_links, selection_montage_png, selection_summary_markdown
from nds.select.request import SelectRequest
from nds.select.service import run_selection

log = logging.getLogger(__name__)


class _RefusalWithoutTraceback(logging.Filter):
    """Drop the traceback Prefect's engine logs when a deployment run ends Failed on an NDS refusal.

    The engine re-raises a failed run's exception after the run ended and logs it, with ~40
    lines of Prefect internals, as "Engine execution exited with unexpected exception". For
    a refusal (an NDSError: bad scores, unknown dataset, ...) the run already says it: its
    state message and one ERROR line. Other exceptions keep their traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NDSError) and str(record.msg).startswith("Engine execution exited"))


if not any(isinstance(f, _RefusalWithoutTraceback) for f in logging.getLogger("prefect.flow_runs").filters):
    logging.getLogger("prefect.flow_runs").addFilter(_RefusalWithoutTraceback())


def run_name() -> str:
    """`select-<out name or scores file>-<budget>`, from the run's request (Prefect calls this)."""
    from prefect.runtime import flow_run

    try:
        request = flow_run.parameters.get("request")
        if not isinstance(request, SelectRequest):
            request = SelectRequest.model_validate(request)
        return request.run_name()
    except Exception:  # an invalid request fails the run right after; its name does not matter
        return "select"


@task(name="selection-report")
def selection_report(summary: dict, request: SelectRequest, root: str | None) -> str:
    """The artifact's markdown: manifest links and a montage are best effort (the selection is done)."""
    ws = Workspace.from_env(root)
    links, montage = None, None
    try:
        links = manifest_links(summary, expires_s=request.presign_expiry_s or MANIFEST_LINK_EXPIRY_S)
    except NDSError as exc:
        log.warning("selection %s: no manifest links (%s)", summary["selection_id"], exc)
    try:
        montage = selection_montage_png(ws, summary.get("local_manifest") or summary["manifest_location"])
    except (NDSError, OSError) as exc:
        log.warning("selection %s: no montage of the selected images (%s)", summary["selection_id"], exc)
    return selection_summary_markdown(summary, links=links, montage_png=montage)


@flow(name="select", flow_run_name=run_name)
def select(request: SelectRequest, root: str | None = None, out_dir: str | None = None):
    """Select source images for a client's task and write their manifest.

    Args:
        request: The selection: the client's scores, how many images, which datasets.
        root: Workspace folder on the server (default: the server's NDS_ROOT). Not in the form.
        out_dir: Write the manifest into this server folder instead of the manifests folder
            (the command line's --out). Not in the form.
    """
    from prefect.runtime import deployment, flow_run

    # In the flow itself, not a task: a task that fails logs a traceback (or a "NoneType: None"
    # for a returned Failed state); here NDS's refusal is the run's state message and nothing else.
    try:
        summary = run_selection(Workspace.from_env(root), request, out_dir=out_dir,
                                origin="deployment" if deployment.id else "cli", flow_run_id=flow_run.id)
    except NDSError as exc:
        get_run_logger().error("selection refused: %s", exc)
        return Failed(message=str(exc), data=exc)
    create_markdown_artifact(
        key="selection-summary",
        markdown=selection_report(summary, request, root),
        description=f"NDS selection: {summary['rows']} images, {request.out_name or summary['selection_id']}",
    )
    return summary
