"""nds.formats.scores: writing and validating scores.json (what leaves the client)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nds.errors import NDSError
from nds.formats.scores import load_scores, write_scores


# --------------------------------------------------------------------------- scores.json


def _bundle_stub(k=3):
    return {"index_version": "v1", "bundle_sha256": "b" * 64, "k": k}


def test_write_scores_round_trip_and_privacy(tmp_path):
    path = tmp_path / "scores.json"
    doc = write_scores(path, bundle=_bundle_stub(), mode="linear", scores=[0.5, 0.25, 1.0],
                       seconds_per_expert=[0.1, 0.2, 0.3])
    on_disk = json.loads(path.read_text())
    assert on_disk == doc == load_scores(path)
    # Nothing about the client's images beyond the K numbers.
    assert set(on_disk) == {"format", "index_version", "bundle_sha256", "mode", "k", "scores",
                            "seconds_per_expert", "created_at"}
    assert on_disk["scores"] == [0.5, 0.25, 1.0] and on_disk["k"] == 3
    assert not list(tmp_path.glob(".scores.json.tmp-*"))


def test_write_scores_with_hashes_sorts_and_dedupes(tmp_path):
    hashes = ["C" * 64, "a" * 64, "c" * 64]
    doc = write_scores(tmp_path / "s.json", bundle=_bundle_stub(1), mode="rotation", scores=[0.3],
                       seconds_per_expert=[0.0], hashes=hashes)
    assert doc["exclude_sha256"] == ["a" * 64, "c" * 64]


def test_write_scores_refuses_nan_and_writes_nothing(tmp_path):
    with pytest.raises(NDSError, match=r"scores\[1\]"):
        write_scores(tmp_path / "s.json", bundle=_bundle_stub(2), mode="linear", scores=[0.1, float("nan")],
                     seconds_per_expert=[0, 0])
    assert not (tmp_path / "s.json").exists()


def _valid():
    return {"format": 1, "index_version": "v1", "bundle_sha256": "b" * 64, "mode": "linear", "k": 2, "scores": [0.1, 0.2]}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format": 2}, "unsupported format"),
        ({"format": True}, "unsupported format"),
        ({"mode": "magic"}, "unknown mode 'magic'; known modes: linear, rotation, rotation-prob, logme"),
        ({"k": 3}, "has 2 values but k = 3"),
        ({"k": True}, "'k' must be a positive integer"),
        ({"scores": [0.1, float("inf")]}, r"scores\[1\] = inf is not a finite number"),
        ({"scores": [float("nan"), 0.2]}, r"scores\[0\] = nan"),
        ({"scores": ["0.1", 0.2]}, r"scores\[0\] = '0.1'"),
        ({"scores": [0.1, True]}, r"scores\[1\] = True"),
        ({"scores": "0.1,0.2"}, "must be a list"),
        ({"bundle_sha256": "xyz"}, "64-character hex"),
        ({"index_version": ""}, "'index_version' must be a non-empty string"),
        ({"exclude_sha256": ["g" * 64]}, r"exclude_sha256\[0\]"),
        ({"seconds_per_expert": [0.1]}, "'seconds_per_expert' has 1 values"),
    ],
)
def test_load_scores_rejects_bad_documents(change, match):
    with pytest.raises(NDSError, match=match):
        load_scores({**_valid(), **change})


def test_load_scores_file_errors_name_the_file(tmp_path):
    with pytest.raises(NDSError, match=r"missing\.json not found"):
        load_scores(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(NDSError, match=r"bad\.json is not valid JSON"):
        load_scores(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text(json.dumps({**_valid(), "scores": [0.1, float("nan")]}))
    with pytest.raises(NDSError, match=r"nan\.json: scores\[1\]"):
        load_scores(tmp_path / "nan.json")


@settings(max_examples=50, deadline=None)
@given(scores=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=20))
def test_finite_scores_round_trip_exactly(scores):
    doc = {**_valid(), "k": len(scores), "scores": scores}
    out = load_scores(json.loads(json.dumps(doc)))
    assert out["scores"] == scores and all(math.isfinite(s) for s in out["scores"])


def test_load_scores_errors_are_typed(tmp_path):
    from nds.errors import InvalidInputError, NotFoundError

    with pytest.raises(NotFoundError):
        load_scores(tmp_path / "missing.json")
    with pytest.raises(InvalidInputError, match="unknown mode"):
        load_scores({**_valid(), "mode": "magic"})


def test_scores_json_bytes(tmp_path):
    """indent=2, keys in document order (not sorted), one trailing newline: as before the move."""
    doc = write_scores(tmp_path / "s.json", bundle=_bundle_stub(1), mode="rotation", scores=[0.5],
                       seconds_per_expert=[0.123456])
    assert (tmp_path / "s.json").read_text() == json.dumps(doc, indent=2) + "\n"
    assert list(doc) == ["format", "index_version", "bundle_sha256", "mode", "k", "scores", "seconds_per_expert",
                         "created_at"]
