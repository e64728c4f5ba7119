"""What operators see in the Prefect UI beyond the flows' own output, set over the REST API.

- The `select` deployment's form: the current index's source datasets become the only
  choices of "Source datasets", and the command-line-only parameters (`root`, `out_dir`)
  leave the form (nds.select.request.select_form_schema).
- The current index's summary and cluster montage, published as the `index-summary` and
  `cluster-montage` artifacts, so that a fresh server shows them before any `index` run.

`nds server up` does both once the deployments exist; the `index` flow refreshes the form
after each build it runs as a deployment. Like prefect_server, no Prefect import: plain
HTTP on the API, which runs on loopback.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from nds.errors import NDSError

log = logging.getLogger(__name__)

SELECT_DEPLOYMENT = "select/select"
INDEX_SUMMARY_KEY = "index-summary"
CLUSTER_MONTAGE_KEY = "cluster-montage"
REQUEST_TIMEOUT_S = 30
RETRY_CODES = (429, 502, 503)   # what the Prefect server and its client treat as retryable
RETRIES = 5                      # backoff 0.5, 1, 2, 4, 8 s: ~15 s in all
RETRY_BASE_S = 0.5


def api_call(api: str, method: str, path: str, body: dict | None = None):
    """One JSON request to the Prefect API; None for 404, an NDSError for any other failure.

    The answers the Prefect server marks as retryable (429, 502, 503: a busy SQLite database
    answers 503) are retried with exponential backoff, as Prefect's own client does; the
    server rolls the request back before it answers, so a retry never applies it twice.
    """
    data = None if body is None else json.dumps(body).encode()
    url = f"{api.rstrip('/')}/{path.lstrip('/')}"
    for attempt in range(RETRIES + 1):
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                text = resp.read()
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            detail = exc.read().decode(errors="replace")[:300]
            if exc.code in RETRY_CODES and attempt < RETRIES:
                wait = RETRY_BASE_S * 2 ** attempt
                log.info("Prefect API %s %s answered %s; retrying in %.1f s", method, path, exc.code, wait)
                time.sleep(wait)
                continue
            raise NDSError(f"Prefect API {method} {path} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise NDSError(f"Prefect API at {api} unreachable ({exc}): is the server up?") from None
    return json.loads(text) if text else None


def index_datasets(ws) -> list[str] | None:
    """The source datasets of the workspace's current index (None: no index yet)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(ws.stage_dir("extract")) / "index.parquet"
    if not path.is_file():
        return None
    return sorted(pc.unique(pq.read_table(path, columns=["dataset"]).column("dataset")).to_pylist())


def refresh_select_form(api: str, ws, *, deployment: str = SELECT_DEPLOYMENT) -> dict | None:
    """Set the `select` deployment's form from the workspace's index; None if it is not deployed."""
    from nds.select.request import select_form_schema

    deployment = api_call(api, "GET", f"deployments/name/{deployment}")
    if deployment is None:
        return None
    datasets = index_datasets(ws)
    schema = select_form_schema(deployment["parameter_openapi_schema"], datasets=datasets)
    api_call(api, "PATCH", f"deployments/{deployment['id']}", {"parameter_openapi_schema": schema})
    log.info("select form: dataset choices %s (workspace %s)", datasets or "free text (no index yet)", ws.root)
    return {"deployment_id": deployment["id"], "datasets": datasets}


def publish_index_report(api: str, ws) -> dict | None:
    """Publish the current index's summary and cluster montage as artifacts; None without an index."""
    from nds.report import current_index_report

    report = current_index_report(ws)
    if report is None:
        return None
    version = report["index_version"]
    ids = {}
    for key, what in ((INDEX_SUMMARY_KEY, "summary"), (CLUSTER_MONTAGE_KEY, "montage")):
        made = api_call(api, "POST", "artifacts/", {"key": key, "type": "markdown", "data": report[what],
                                                    "description": f"NDS index {version} (published at server start)"})
        ids[key] = made["id"]
    return {"index_version": version, "artifacts": ids}


def publish_operator_view(api: str, ws) -> dict:
    """Both of the above; what could not be published is said in `notes`, not raised."""
    out: dict = {"notes": []}
    out["select_form"] = refresh_select_form(api, ws)
    if out["select_form"] is not None and not out["select_form"]["datasets"]:
        out["notes"].append(f"no index in {ws.root} yet: the select form's datasets are free text until an "
                            "`index` run (or the next `nds server up`)")
    try:
        out["index_report"] = publish_index_report(api, ws)
    except NDSError as exc:  # e.g. the corpus images are not on this machine: the montage needs them
        out["index_report"] = None
        out["notes"].append(f"index summary not published: {exc}")
    return out
