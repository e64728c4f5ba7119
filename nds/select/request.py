"""What one selection asks for: the request model that `nds select`, the service and the
Prefect `select` form share, written for the operator who fills the form.

Its JSON schema carries every check that needs no index (one scores source, a whole count or
a fraction, no `..` in the folder name), so Prefect refuses a bad form or API call before a
run exists. The checks that need the index (which datasets exist) are added to the deployed
schema by `select_form_schema`, from the index the deployment serves.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nds._registry import SAMPLERS
from nds.platform.storage import MAX_PRESIGN_S
from nds.select.probability import budget_from_number

#: Softmax temperature over expert scores when the request names none. Scores are
#: accuracies in [0, 1] whose spread between relevant and irrelevant experts is a few
#: points to tens of points; see the README's temperature sweep for how this was chosen.
DEFAULT_TEMPERATURE = 0.02

#: `method` of a request: "auto" (see run_selection) or a registered sampler.
SamplerChoice = Literal[("auto", *SAMPLERS.names())]

#: A `..` path segment (the service refuses it too: the folder must stay inside the manifests root).
_PARENT_SEGMENT = r"(^|[/\\])\.\.([/\\]|$)"


def _labels(*titles: str):
    """Name the alternatives of an optional field: the form shows them as a toggle."""

    def edit(schema: dict) -> None:
        for option, title in zip(schema.get("anyOf", []), titles):
            option["title"] = title

    return edit


def _refuse(when: dict, field: str, expected: str) -> dict:
    """A schema rule: if `when` holds, `field` is refused, and the form says what was expected.

    jsonschema has no custom messages; a `const` the refused value cannot equal makes its
    message ("'<expected>' was expected") the one the form shows under `field`.
    """
    return {"if": when, "then": {"properties": {field: {"const": expected}}, "required": [field]}}


_NOT_GIVEN = {"anyOf": [{"type": "null"}, {"type": "string", "pattern": r"^\s*$"}]}


def _schema_rules(schema: dict) -> None:
    schema.setdefault("allOf", []).extend([
        _refuse({"properties": {"scores": {"type": "null"}, "scores_path": _NOT_GIVEN}}, "scores_path",
                "the path of the client's scores.json, or paste the scores above"),
        _refuse({"properties": {"scores": {"type": "object"}, "scores_path": {"type": "string", "pattern": r"\S"}},
                 "required": ["scores", "scores_path"]}, "scores_path",
                "nothing here: the scores are pasted above"),
        # 1.5 is neither a count nor a fraction: "1.5 is not a multiple of 1".
        {"if": {"properties": {"budget": {"minimum": 1}}, "required": ["budget"]},
         "then": {"properties": {"budget": {"multipleOf": 1}}}},
        _refuse({"properties": {"out_name": {"type": "string", "pattern": _PARENT_SEGMENT}}, "required": ["out_name"]},
                "out_name", "a folder name without '..'"),
    ])


class SelectRequest(BaseModel):
    """Choose source images to pre-train on, from the scores a client's task gave each expert."""

    model_config = ConfigDict(extra="forbid", title="Selection request", json_schema_extra=_schema_rules)

    scores_path: str | None = Field(
        None, title="Client scores file", json_schema_extra=_labels("Path on the server", "Not used"),
        description="Path, on the server, of the scores.json the client made with `nds client score` "
        "(e.g. /srv/nds/inbox/acme/scores.json). Fill this or paste the scores below, not both.")
    scores: dict | None = Field(
        None, title="Client scores (pasted)", json_schema_extra=_labels("Pasted JSON", "Not used"),
        description="Or: the content of the client's scores.json, pasted as JSON.")
    budget: float = Field(
        ..., gt=0, allow_inf_nan=False, title="How many images",
        description="A whole number of 1 or more is a number of images (1 means one image, 500 means 500). "
        "A number between 0 and 1 is a share of the eligible images (0.1 means 10 %). 1.5 is refused.")
    fill: float = Field(
        0.0, ge=0, le=1, allow_inf_nan=False, title="Reserve for dead links (share of the budget)",
        description="Also select this share of the budget more, as reserve rows after the budget's own (rank >= "
        "budget, ranks start at 0): 0.2 with 1000 images gives 1200 rows, and the first 1000 are exactly the "
        "selection without reserve. A client replaces images whose links fail from them, in rank order. 0: none.")
    datasets: list[str] | None = Field(
        None, title="Source datasets", json_schema_extra=_labels("Only these", "All datasets"),
        description="Draw only from these source datasets of the current index; default: all of them.")
    exclude: list[str] = Field(
        default_factory=list, title="Images to leave out",
        description="Sample ids or sha256 content hashes of source images never to select "
        "(e.g. copies of the client's test images).")
    out_name: str | None = Field(
        None, title="Manifest folder name", json_schema_extra=_labels("Name", "The selection id"),
        description="Folder, inside the server's manifests folder, that receives the manifest; "
        "also names the run. Default: the selection id.")
    seed: int = Field(0, title="Random seed",
                      description="The same seed and inputs select the same images; change it for another draw.")
    temperature: float = Field(
        DEFAULT_TEMPERATURE, gt=0, allow_inf_nan=False, title="Focus (temperature)",
        description="How strongly the draw favours the experts that scored best: smaller is more focused. "
        f"The default {DEFAULT_TEMPERATURE} suits every scorer (rotation accuracies; the log scores of "
        "features and combined).")
    method: SamplerChoice = Field(
        "auto", title="Sampling algorithm (advanced)",
        description="Every choice draws from the same distribution; they differ only in speed. Keep auto.")
    presign_expiry_s: int | None = Field(
        None, ge=1, le=MAX_PRESIGN_S, title="Download links for each image, valid for (seconds)",
        json_schema_extra=_labels("Seconds", "No links"),
        description="Also write urls.csv beside the manifest: one download link per selected image, valid "
        "this many seconds (at most 604800, 7 days). Needs the corpus in S3.")

    @field_validator("scores_path", "out_name", mode="before")
    @classmethod
    def _empty_is_not_given(cls, value):
        # A form field cleared by hand arrives as "": the same as leaving it out.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("budget")
    @classmethod
    def _count_or_fraction(cls, value: float) -> float:
        budget_from_number(value)  # refuses 1.5 before a run starts (InvalidInputError is a ValueError)
        return value

    @model_validator(mode="after")
    def _one_scores_source(self):
        if (self.scores is None) == (self.scores_path is None):
            raise ValueError("give exactly one of scores (the JSON) or scores_path (a file)")
        return self

    def run_name(self) -> str:
        """A readable Prefect run name: `select-<folder or scores file>-<budget>`."""
        label = self.out_name
        if not label and self.scores_path:
            path = Path(self.scores_path)
            label = path.parent.name if path.stem == "scores" and path.parent.name else path.stem
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", label or "pasted-scores").strip("-.")[:40] or "request"
        return f"select-{label}-{self.budget:g}"


def select_form_schema(parameter_schema: dict, *, datasets: list[str] | None,
                       hidden: tuple[str, ...] = ("root", "out_dir")) -> dict:
    """The `select` deployment's parameter schema as operators get it.

    datasets: the current index's source datasets, offered as the only choices of
    `request.datasets` (None: left as free text). `hidden`: flow parameters for the command
    line and tests (a workspace path, a server folder), dropped from the form; the API still
    accepts them.
    """
    import copy

    schema = copy.deepcopy(parameter_schema)
    for name in hidden:
        schema.get("properties", {}).pop(name, None)
    if "request" in schema.get("properties", {}):
        schema["properties"]["request"]["title"] = "Selection request"
    definition = schema.get("definitions", {}).get("SelectRequest")
    if definition is None:
        raise ValueError("the parameter schema has no SelectRequest: is this the select flow's?")
    field = definition["properties"]["datasets"]
    for option in field.get("anyOf", []):
        if option.get("type") == "array":
            option["items"] = {"type": "string", "enum": list(datasets)} if datasets else {"type": "string"}
            option["minItems"] = 1
            option["uniqueItems"] = True
    return schema
