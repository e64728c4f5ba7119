"""nds.formats.bundle: bundle.json written, checksummed and verified without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nds._io import file_sha256
from nds.errors import InvalidInputError, NotFoundError
from nds.formats.bundle import (
    BUNDLE_FILE, bundle_checksum, expert_files, load_bundle, parse_bundle, write_bundle,
)

NETWORK = {"architecture": "rotnet_small", "input_size": 32, "feature_dim": 128,
           "preprocessing": {"scale": 1 / 255.0, "mean": [0.5] * 3, "std": [0.25] * 3, "layout": "NCHW RGB"}}


def _bundle(folder, k=2) -> dict:
    entries = []
    for e in range(k):
        (folder / f"expert_{e:03d}.pt").write_bytes(f"weights {e}".encode())
        entries.append({"expert": e, "file": f"expert_{e:03d}.pt", "sha256": file_sha256(folder / f"expert_{e:03d}.pt")})
    return write_bundle(folder, index_version="v1", network=NETWORK, experts=entries, extra={"extractor": "x"})


def test_write_then_load_round_trips(tmp_path):
    bundle = _bundle(tmp_path)
    text = (tmp_path / BUNDLE_FILE).read_text()
    assert text == json.dumps(bundle, indent=2, sort_keys=True)  # sorted keys, no trailing newline
    assert load_bundle(tmp_path) == bundle
    assert bundle["k"] == 2 and bundle["feature_dim"] == 128 and bundle["extractor"] == "x"
    assert bundle["bundle_sha256"] == bundle_checksum(bundle)
    assert not list(tmp_path.glob(".bundle.json.tmp-*"))


def test_load_refusals_are_typed(tmp_path):
    with pytest.raises(NotFoundError, match="point --experts at an expert bundle folder"):
        load_bundle(tmp_path)
    _bundle(tmp_path)
    (tmp_path / "expert_001.pt").write_bytes(b"tampered")
    with pytest.raises(InvalidInputError, match="tampered or corrupt"):
        load_bundle(tmp_path)
    load_bundle(tmp_path, verify=False)  # the document itself is intact
    (tmp_path / "expert_001.pt").unlink()
    with pytest.raises(NotFoundError, match="is missing"):
        load_bundle(tmp_path)


def test_parse_and_expert_files_refuse_bad_documents():
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        parse_bundle(b"{nope", "b.json")
    with pytest.raises(InvalidInputError, match="expected a JSON object"):
        parse_bundle(b"[]", "b.json")
    assert expert_files({"experts": [{"file": "expert_000.pt"}]}, "b.json") == ["expert_000.pt"]
    with pytest.raises(InvalidInputError, match="no experts"):
        expert_files({}, "b.json")
    for bad in ("../x.pt", "a/b.pt", "..", ""):
        with pytest.raises(InvalidInputError, match="not a plain file name"):
            expert_files({"experts": [{"file": bad}]}, "b.json")


def test_formats_import_no_torch():
    """Documents crossing client and server load without the network stack (not even lazily)."""
    code = ("import sys, nds.formats.bundle, nds.formats.scores, nds.formats.manifest\n"
            "from nds.formats.scores import load_scores\n"
            "load_scores({'format': 1, 'index_version': 'v', 'bundle_sha256': 'a' * 64, 'mode': 'rotation',"
            " 'k': 1, 'scores': [0.5]})\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_scorer_is_combined_only_where_the_bundle_ships_cluster_stats():
    from nds.formats.bundle import default_mode

    assert default_mode({"experts": []}) == "rotation"  # a bundle made before the statistics
    assert default_mode({"experts": [], "cluster_stats": {"k": 2}}) == "combined"
