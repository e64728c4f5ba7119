"""The `select` flow as operators meet it in the Prefect UI, on the real Prefect test server.

- the form: the deployment's parameter schema offers the index's datasets, hides the
  command-line parameters, and Prefect refuses a bad request (no scores, 1.5 images, an
  unknown dataset, `..` in the folder name) before a flow run exists, through the API and
  through the endpoint the UI form calls;
- a run is named after its request;
- a run NDS refuses fails with NDS's one-line message and no traceback in its logs;
- the selection artifact: full checksum, manifest links, a montage, exact counts;
- the current index's summary and montage, published without an `index` run.
"""

from __future__ import annotations

import base64
import io
import json
import uuid

import pytest

from nds.errors import NDSError
from nds.formats.bundle import load_bundle
from nds.formats.scores import write_scores
from nds.platform import prefect_ui
from nds.report import selection_summary_markdown
from nds.select.request import SelectRequest


@pytest.fixture(scope="module")
def scores_file(tiny_index, tmp_path_factory):
    ws, _ = tiny_index
    bundle = load_bundle(ws.stage_dir("experts"), verify=False)
    k = int(bundle["k"])
    path = tmp_path_factory.mktemp("ui") / "acme" / "scores.json"
    path.parent.mkdir()
    write_scores(path, bundle=bundle, mode="rotation", scores=[0.9] + [0.5] * (k - 1), seconds_per_expert=[0.0] * k)
    return path


@pytest.fixture(scope="module")
def api(prefect_server):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def form_deployment(api, tiny_index):
    """A `select` deployment made the way `prefect deploy` makes it, its form set by prefect_ui."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.callables import parameter_schema

    from flows.select import select

    ws, _ = tiny_index
    name = f"form-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(select)
        dep_id = client.create_deployment(flow_id, name, enforce_parameter_schema=True,
                                          parameter_openapi_schema=parameter_schema(select).model_dump_for_openapi())
    out = prefect_ui.refresh_select_form(api, ws, deployment=f"select/{name}")
    assert out == {"deployment_id": str(dep_id), "datasets": prefect_ui.index_datasets(ws)}
    return dep_id


def _schema(api, dep_id) -> dict:
    return prefect_ui.api_call(api, "GET", f"deployments/{dep_id}")["parameter_openapi_schema"]


def test_form_offers_the_index_datasets_and_hides_cli_parameters(api, form_deployment, tiny_index):
    ws, _ = tiny_index
    schema = _schema(api, form_deployment)
    assert set(schema["properties"]) == {"request"}, "root and out_dir are for the command line"
    request = schema["definitions"]["SelectRequest"]
    array = next(o for o in request["properties"]["datasets"]["anyOf"] if o.get("type") == "array")
    assert array["items"]["enum"] == prefect_ui.index_datasets(ws) == sorted(
        {"animals", "clipart", "emoji", "fashion", "glyphs", "mnist", "sprites"})
    # Written for operators: titles and descriptions, no developer shorthand.
    titles = {k: v["title"] for k, v in request["properties"].items()}
    assert titles["budget"] == "How many images" and titles["presign_expiry_s"].startswith("Download links")
    text = json.dumps(request)
    for jargon in ("O(K", "es-keys (O(N)", "validated form", "Presign Expiry S", "Scores Path"):
        assert jargon not in text
    assert "1 means one image" in request["properties"]["budget"]["description"]


BAD_FORMS = [
    ("no scores", {"budget": 50}, "scores_path"),
    ("no scores (nulls)", {"scores": None, "scores_path": None, "budget": 50}, "scores_path"),
    ("both scores", {"scores": {"k": 1}, "scores_path": "/x.json", "budget": 50}, "scores_path"),
    ("1.5 images", {"scores_path": "/x.json", "budget": 1.5}, "budget"),
    ("zero images", {"scores_path": "/x.json", "budget": 0}, "budget"),
    ("dataset typed in", {"scores_path": "/x.json", "budget": 5, "datasets": ["Fashion"]}, "datasets"),
    ("no dataset chosen", {"scores_path": "/x.json", "budget": 5, "datasets": []}, "datasets"),
    ("folder escapes", {"scores_path": "/x.json", "budget": 5, "out_name": "../x"}, "out_name"),
    ("unknown field", {"scores_path": "/x.json", "budget": 5, "budgt": 5}, "budgt"),
]


@pytest.mark.parametrize("name,request_,field", BAD_FORMS, ids=[b[0] for b in BAD_FORMS])
def test_bad_request_is_refused_before_a_run_exists(api, form_deployment, name, request_, field):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        runs = DeploymentFilter(id=DeploymentFilterId(any_=[form_deployment]))
        before = len(client.read_flow_runs(deployment_filter=runs))
        with pytest.raises(PrefectHTTPStatusError) as info:
            client.create_flow_run_from_deployment(form_deployment, parameters={"request": request_})
        assert info.value.response.status_code == 409
        detail = info.value.response.json()["detail"]
        assert f"request.{field}" in detail or f"'{field}'" in detail, detail
        assert len(client.read_flow_runs(deployment_filter=runs)) == before, "no flow run was created"
    # The endpoint the UI form calls before it submits says the same, under the field.
    answer = prefect_ui.api_call(api, "POST", "ui/schemas/validate",
                                 {"schema": _schema(api, form_deployment), "values": {"request": request_}})
    assert answer["valid"] is False
    assert field in json.dumps(answer["errors"])


def test_form_messages_say_what_is_expected(api, form_deployment):
    def errors(request_):
        answer = prefect_ui.api_call(api, "POST", "ui/schemas/validate",
                                     {"schema": _schema(api, form_deployment), "values": {"request": request_}})
        return json.dumps(answer["errors"])

    assert "path of the client's scores.json, or paste the scores above" in errors(
        {"scores": None, "scores_path": None, "budget": 5})
    assert "nothing here: the scores are pasted above" in errors({"scores": {"k": 1}, "scores_path": "/x", "budget": 5})
    assert "1.5 is not a multiple of 1" in errors({"scores_path": "/x", "budget": 1.5})
    assert "a folder name without '..'" in errors({"scores_path": "/x", "budget": 5, "out_name": "a/../../b"})


def test_api_caller_is_told_the_choices(form_deployment):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    with get_client(sync_client=True) as client, pytest.raises(PrefectHTTPStatusError) as info:
        client.create_flow_run_from_deployment(
            form_deployment, parameters={"request": {"scores_path": "/x", "budget": 5, "datasets": ["Fashion"]}})
    assert "'Fashion' is not one of ['animals', 'clipart', 'emoji', 'fashion'" in info.value.response.json()["detail"]


def test_good_request_is_accepted_and_cli_parameters_still_pass_the_api(form_deployment, scores_file, tmp_path):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for request_ in ({"scores_path": str(scores_file), "budget": 1},  # one image: a count
                         {"scores_path": str(scores_file), "budget": 0.1, "datasets": ["fashion", "mnist"],
                          "scores": None, "out_name": None, "presign_expiry_s": None},
                         {"scores": json.loads(scores_file.read_text()), "scores_path": "", "budget": 500.0}):
            run = client.create_flow_run_from_deployment(
                form_deployment, parameters={"request": request_, "out_dir": str(tmp_path / "o")})
            client.delete_flow_run(run.id)  # never picked up: no worker serves this deployment


def test_request_model_refuses_what_the_form_refuses(scores_file):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="budget 12.5 is neither a whole count nor a fraction below 1"):
        SelectRequest(scores_path=str(scores_file), budget=12.5)
    with pytest.raises(ValidationError, match="exactly one"):
        SelectRequest(scores_path="  ", budget=3)  # a cleared form field is no path
    assert SelectRequest(scores_path=str(scores_file), budget=3, out_name="").out_name is None


@pytest.mark.parametrize("fields,name", [
    ({"scores_path": "/srv/inbox/acme/scores.json", "budget": 500.0}, "select-acme-500"),
    ({"scores_path": "/srv/inbox/client-7.json", "budget": 0.1}, "select-client-7-0.1"),
    ({"scores_path": "/srv/x/scores.json", "budget": 20, "out_name": "acme jan/run"}, "select-acme-jan-run-20"),
    ({"scores": {}, "budget": 1}, "select-pasted-scores-1"),
])
def test_run_name_comes_from_the_request(fields, name):
    assert SelectRequest(**fields).run_name() == name


def _flow_run_logs(flow_run_id, until: str, timeout_s: float = 30) -> list[str]:
    """The run's log messages, once `until` has arrived (logs reach the API in batches)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        messages = [log.message for log in logs]
        if until in messages or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def test_refused_run_fails_with_the_message_alone(tiny_index, scores_file, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.select import select

    ws, _ = tiny_index
    monkeypatch.setenv("NDS_MANIFESTS", str(tmp_path / "manifests"))
    doc = json.loads(scores_file.read_text())
    doc["index_version"] = "0123456789abcdef"
    stale = tmp_path / "old" / "scores.json"
    stale.parent.mkdir()
    stale.write_text(json.dumps(doc))
    state = select(SelectRequest(scores_path=str(stale), budget=20), str(ws.root), return_state=True)
    assert state.is_failed()
    current = load_bundle(ws.stage_dir("experts"), verify=False)["index_version"]
    expected = (f"scores are for index 0123456789abcdef but the server holds {current}: "
                "fetch the current expert bundle (`nds client fetch-experts`) and score again")
    assert state.message == expected
    with pytest.raises(NDSError, match="scores are for index 0123456789abcdef"):  # the CLI's `error:` line
        state.result()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.name == "select-old-20"
    logs = _flow_run_logs(run.id, until=f"Finished in state Failed('{expected}')")
    assert not any("Traceback" in m for m in logs), logs
    assert f"selection refused: {expected}" in logs
    assert not (tmp_path / "manifests").exists() or not any((tmp_path / "manifests").iterdir())


def _artifact(flow_run_id, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])))
    return artifact.data


def _embedded_png(markdown: str):
    from PIL import Image

    data = markdown.split("data:image/png;base64,", 1)[1].split(")", 1)[0]
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_selection_artifact_shows_images_link_and_full_checksum(tiny_index, scores_file, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.select import select

    ws, _ = tiny_index
    monkeypatch.setenv("NDS_MANIFESTS", str(tmp_path / "manifests"))
    state = select(SelectRequest(scores_path=str(scores_file), budget=60, seed=4, out_name="acme-jan"), str(ws.root),
                   return_state=True)
    summary = state.result()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.name == "select-acme-jan-60"
    md = _artifact(run.id, "selection-summary")
    assert summary["manifest_sha256"] in md and len(summary["manifest_sha256"]) == 64
    folder = tmp_path / "manifests" / "acme-jan"
    assert f"[manifest.csv]({(folder / 'manifest.csv').as_uri()})" in md
    assert f"nds client download --manifest {folder} --out images/" in md
    assert "budget 60: a count" in md
    montage = _embedded_png(md)
    assert montage.format == "PNG" and montage.width == 10 * 66 + 2 and montage.height == 4 * 66 + 2  # 40 images
    # Exact counts per expert, and weights with the digits they need.
    for expert, n in summary["counts_per_expert"].items():
        assert f"| {expert} | {n} |" in md
    assert "| 0.000 |" not in md


def test_small_weights_keep_their_digits():
    summary = {"selection_id": "sel-x", "rows": 3, "n_eligible": 10, "index_version": "v", "mode": "rotation",
               "parameters": {"temperature": 0.02, "seed": 0, "budget": 3, "method": "auto"},
               "manifest_location": "/srv/m/sel-x", "manifest_sha256": "a" * 64,
               "counts_per_dataset": {"mnist": 3}, "counts_per_expert": {"0": 2, "1": 1},
               "expert_weights": [0.999988, 0.000012]}
    md = selection_summary_markdown(summary)
    assert "| 1 | 1 | 0.0012 % |" in md and "| 0 | 2 | 100.0 % |" in md
    assert "`" + "a" * 64 + "`" in md


def test_current_index_report_is_published_without_an_index_run(api, tiny_index, tmp_path):
    ws, summary = tiny_index
    out = prefect_ui.publish_index_report(api, ws)
    assert out["index_version"] == summary["index_version"]
    arts = {key: prefect_ui.api_call(api, "GET", f"artifacts/{artifact_id}") for key, artifact_id in out["artifacts"].items()}
    assert {a["key"] for a in arts.values()} == {"index-summary", "cluster-montage"}
    assert f"# NDS index `{summary['index_version']}`" in arts["index-summary"]["data"]
    assert f"| clusters / experts | {summary['k']} |" in arts["index-summary"]["data"]
    assert _embedded_png(arts["cluster-montage"]["data"]).height == summary["k"] * 36

    # An index built without the flow (`dvc repro`: no index_summary.json): the report comes from
    # the stage outputs. A workspace without an index has none.
    from nds.config import Workspace
    from nds.report import current_index_report

    bare = Workspace(tmp_path / "ws")
    (bare.artifacts_dir).mkdir(parents=True)
    assert current_index_report(bare) is None
    for stage in ("extract", "cluster", "experts"):
        (bare.artifacts_dir / stage).symlink_to(ws.stage_dir(stage))
    bare.data_dir.symlink_to(ws.data_dir)
    report = current_index_report(bare)
    assert report["index_version"] == summary["index_version"]
    assert f"| source images | {summary['n_samples']} |" in report["summary"]
