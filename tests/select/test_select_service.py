"""The selection service without an index: request model, ids, eligibility errors, audit rows."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from nds._registry import SAMPLERS
from nds.config import Workspace
from nds.errors import InvalidInputError, NotFoundError
from nds.select import service


def _index() -> service.Index:
    catalog = pa.table({
        "sample_id": ["a", "b", "c"], "dataset": ["mnist", "fashion", "mnist"], "uri": ["u0", "u1", "u2"],
        "label": [0, 1, 2], "sha256": ["0" * 64, "1" * 64, "2" * 64],
    })
    return service.Index(version="v", bundle_sha256="s", k=2, catalog=catalog,
                         assignments=np.array([0, 1, 0], dtype=np.int32))


def test_request_methods_are_auto_and_the_registered_samplers():
    schema = service.SelectRequest.model_json_schema()["properties"]["method"]
    assert schema["enum"] == ["auto", *SAMPLERS.names()] == ["auto", "es-keys", "two-stage", "clustered"]
    with pytest.raises(ValidationError):
        service.SelectRequest(scores={}, budget=1, method="magic")


def test_selection_ids_are_time_ordered_and_unguessable():
    ids = {service.new_selection_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"sel-\d{8}T\d{6}-[0-9a-f]{32}", i) for i in ids)


def test_eligible_mask_filters_and_excludes():
    mask, n_excluded = service.eligible_mask(_index(), datasets=["mnist"], exclude=["c", "1" * 64, "nope"])
    assert mask.tolist() == [True, False, False] and n_excluded == 2


def test_eligible_mask_errors_tell_unknown_from_empty():
    with pytest.raises(NotFoundError, match="unknown dataset filter"):
        service.eligible_mask(_index(), datasets=["cifar"], exclude=[])
    with pytest.raises(InvalidInputError, match="unknown dataset filter"):
        service.eligible_mask(_index(), datasets=[], exclude=[])


def test_record_selection_writes_one_parquet_row_atomically(tmp_path, monkeypatch):
    monkeypatch.delenv("NDS_WAREHOUSE", raising=False)
    ws = Workspace(tmp_path)
    summary = {
        "selection_id": "sel-x", "index_version": "v", "bundle_sha256": "s", "mode": "rotation",
        "parameters": {"seed": 0}, "expert_weights": [0.5, 0.5], "manifest_location": "m",
        "manifest_sha256": "h", "rows": 3, "n_eligible": 3, "counts_per_dataset": {"mnist": 3}, "seconds": 0.1,
    }
    path = service.record_selection(ws, summary, scores=[0.1, 0.2])
    assert path == service.selections_dir(ws) / "sel-x.parquet"
    assert [p.name for p in path.parent.iterdir()] == ["sel-x.parquet"]  # no temporary file left
    row = pq.read_table(path).to_pylist()[0]
    assert row["selection_id"] == "sel-x" and row["scores"] == [0.1, 0.2] and row["n_selected"] == 3


def test_write_urls_is_a_csv_in_the_manifest_folder(tmp_path):
    table = pa.table({"sample_id": ["a"], "rank": [0], "url": ["https://x/y#3"]})
    path = service.write_urls(tmp_path, table)
    assert path.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert "https://x/y#3" in path.read_text()
