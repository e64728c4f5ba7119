"""`nds client ...` as a user runs it (a subprocess): inputs checked first, one line per error, one message each.

The bundle is a small real one (two experts trained for two steps), so these tests need no index.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nds._io import file_sha256
from nds.client.images import inspect_client_data, load_client_images
from nds.errors import InvalidInputError, NotFoundError
from nds.formats.bundle import load_bundle, write_bundle
from nds.formats.scores import load_scores, write_scores
from nds.models import experts

from clientfixtures import make_bundle, rgb

NDS = [str(Path(sys.executable).with_name("nds"))] if Path(sys.executable).with_name("nds").exists() \
    else [sys.executable, "-m", "flows.cli"]
UNEXPECTED = re.compile(r"^error: (?P<type>\w+): .+ \(run with -v for the traceback\)$")


def nds(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """`nds ARGV` in a fresh process, without a Prefect API (none is needed on the client)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run([*NDS, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_one_error_line(r: subprocess.CompletedProcess, pattern: str, *, rc: int = 2) -> str:
    lines = r.stderr.splitlines()
    assert r.returncode == rc, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{r.stderr}"
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli-bundle") / "experts"
    make_bundle(d, index_version="v-cli")
    return d


def _images(folder: Path, n: int, *, classes: list[str] | None = None, seed: int = 0) -> Path:
    for i in range(n):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb(32, 32, seed + i)).save(sub / f"img{i}.png")
    return folder


# --------------------------------------------------------------------------- fetch-experts


def test_fetch_experts_reports_once(bundle_dir, tmp_path):
    r = nds("client", "fetch-experts", str(bundle_dir), "--out", str(tmp_path / "experts"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    said = [line for line in (r.stdout + r.stderr).splitlines() if "fetched" in line]
    assert len(said) == 1 and said[0].startswith("fetched 2 experts of index v-cli"), r.stdout + r.stderr
    assert load_bundle(tmp_path / "experts")["bundle_sha256"] == load_bundle(bundle_dir)["bundle_sha256"]


# --------------------------------------------------------------------------- score: inputs first


def test_flat_folder_is_scored_as_unlabelled_and_says_so(bundle_dir, tmp_path):
    flat = _images(tmp_path / "flat", 6)
    r = nds("client", "score", "--experts", str(bundle_dir), "--data", str(flat), "--out", str(tmp_path / "s.json"),
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "0 classes" not in r.stdout + r.stderr
    assert "unlabelled: a flat folder, no class sub-folders" in r.stderr  # the images log line
    assert "6 unlabelled images" in r.stdout
    assert load_scores(tmp_path / "s.json")["k"] == 2
    # A scorer that needs labels is refused before any image is decoded (no "client images" line).
    r = nds("client", "score", "--experts", str(bundle_dir), "--data", str(flat), "--out", str(tmp_path / "l.json"),
            "--mode", "linear", cwd=tmp_path)
    assert_one_error_line(r, r"--mode linear needs labelled images .*6 unlabelled images \(a flat folder.*--mode rotation")
    assert not (tmp_path / "l.json").exists()


def test_default_scorer_is_combined_where_the_bundle_has_a_reference_sample(tmp_path):
    make_bundle(tmp_path / "experts", reference=True)
    data = _images(tmp_path / "data", 6)
    r = nds("client", "score", "--experts", str(tmp_path / "experts"), "--data", str(data), "--out",
            str(tmp_path / "s.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_scores(tmp_path / "s.json")["mode"] == "combined" and "2 combined scores" in r.stdout
    # Log scores are shown as the share of the evidence each expert gets, not as raw logs.
    shares = [float(x) for x in re.findall(r"\(p ([0-9.]+)\)", r.stdout)]
    assert len(shares) == 2 and sum(shares) == pytest.approx(1.0, abs=0.02), r.stdout


def test_experts_and_out_are_checked_before_images_are_decoded(bundle_dir, tmp_path):
    data = _images(tmp_path / "task", 4, classes=["a", "b"])
    (data / "a" / "broken.png").write_bytes(b"not a png")  # decoding would log a 'skipped' warning
    r = nds("client", "score", "--experts", str(tmp_path / "nowhere"), "--data", str(data),
            "--out", str(tmp_path / "s.json"), cwd=tmp_path)
    assert_one_error_line(r, r"nowhere/bundle\.json not found: point --experts at an expert bundle folder")
    r = nds("client", "score", "--experts", str(bundle_dir), "--data", str(tmp_path / "none"),
            "--out", str(tmp_path / "s.json"), cwd=tmp_path)
    assert_one_error_line(r, r"--data .*none does not exist; give a folder of images")
    (tmp_path / "dir.json").mkdir()
    r = nds("client", "score", "--experts", str(bundle_dir), "--data", str(data), "--out", str(tmp_path / "dir.json"),
            cwd=tmp_path)
    assert_one_error_line(r, r"--out .*dir\.json is a folder: give a file name")
    assert not (tmp_path / "s.json").exists()


def test_existing_scores_json_is_kept_unless_overwrite(bundle_dir, tmp_path):
    data = _images(tmp_path / "task", 4, classes=["a", "b"])
    out = tmp_path / "scores.json"
    out.write_text('{"mine": "do not lose me"}\n')
    before = out.read_bytes()
    r = nds("client", "score", "--experts", str(bundle_dir), "--data", str(data), "--out", str(out), cwd=tmp_path)
    assert_one_error_line(r, r"--out .*scores\.json already exists: choose a new file, or pass --overwrite")
    assert out.read_bytes() == before
    r = nds("client", "score", "--experts", str(bundle_dir), "--data", str(data), "--out", str(out), "--overwrite",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_scores(out)["index_version"] == "v-cli"


def test_write_scores_refuses_to_replace_a_file_unless_told(tmp_path):
    bundle = {"index_version": "v", "bundle_sha256": "a" * 64, "k": 1}
    path = tmp_path / "scores.json"
    write_scores(path, bundle=bundle, mode="rotation", scores=[0.5], seconds_per_expert=[0.1])
    first = path.read_bytes()
    with pytest.raises(InvalidInputError, match=r"already exists: write to a new file, or replace it with overwrite=True"):
        write_scores(path, bundle=bundle, mode="rotation", scores=[0.9], seconds_per_expert=[0.1])
    assert path.read_bytes() == first
    doc = write_scores(path, bundle=bundle, mode="rotation", scores=[0.9], seconds_per_expert=[0.1], overwrite=True)
    assert doc["scores"] == [0.9] and json.loads(path.read_text())["scores"] == [0.9]
    with pytest.raises(InvalidInputError, match="is a folder"):
        write_scores(tmp_path, bundle=bundle, mode="rotation", scores=[0.5], seconds_per_expert=[0.1])


# --------------------------------------------------------------------------- an unexpected failure


def test_unexpected_failure_is_one_line_exit_1_and_v_shows_the_traceback(bundle_dir, tmp_path):
    """A bundle whose checksums match but whose expert file is not a network (made so on purpose)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    doc = load_bundle(bundle_dir)
    for e in doc["experts"]:
        (bad / e["file"]).write_bytes((bundle_dir / e["file"]).read_bytes())
    (bad / "expert_000.pt").write_bytes(b"not a torch file at all")
    entries = [{**e, "sha256": file_sha256(bad / e["file"])} for e in doc["experts"]]
    write_bundle(bad, index_version="v-bad", network=experts.bundle_fields("rotnet_small"), experts=entries)
    data = _images(tmp_path / "task", 4, classes=["a", "b"])
    argv = ["client", "score", "--experts", str(bad), "--data", str(data), "--out", str(tmp_path / "s.json")]
    r = nds("-q", *argv, cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert r.returncode == 1 and len(errors) == 1 and errors == r.stderr.splitlines()[-1:], r.stderr
    assert UNEXPECTED.match(errors[0]) and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "s.json").exists()
    r = nds("-v", *argv, cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
    last = r.stderr.splitlines()[-1]
    assert re.match(r"^error: \w+: ", last) and "run with -v" not in last


# --------------------------------------------------------------------------- inspect_client_data


def test_inspect_describes_without_decoding(tmp_path):
    folder = _images(tmp_path / "folder", 6, classes=["cat", "dog", "emu"])
    (folder / "cat" / "corrupt.png").write_bytes(b"x")  # listed, not decoded
    layout = inspect_client_data(folder)
    assert (layout.kind, layout.n_images, layout.class_names) == ("imagefolder", 7, ["cat", "dog", "emu"])
    assert layout.describe() == "7 images in 3 classes (ImageFolder)"
    flat = inspect_client_data(_images(tmp_path / "flat", 3))
    assert (flat.kind, flat.labelled) == ("flat", False)
    assert flat.describe() == "3 unlabelled images (a flat folder: no class sub-folders)"
    assert len(load_client_images(tmp_path / "flat", progress=False)) == 3

    np.savez(tmp_path / "l.npz", images=np.zeros((5, 8, 8), np.uint8), labels=np.array(list("aabbc")))
    np.savez(tmp_path / "u.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    assert inspect_client_data(tmp_path / "l.npz").describe() == "5 images in 3 classes (.npz labels)"
    assert inspect_client_data(tmp_path / "u.npz").describe() == "4 unlabelled images (an .npz without 'labels')"


@pytest.mark.parametrize("make, error, match", [
    (lambda p: p / "missing", NotFoundError, r"missing does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", InvalidInputError, r"holds no image files"),
    (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", InvalidInputError, r"neither a folder nor an \.npz"),
    (lambda p: np.savez(p / "n.npz", pixels=np.zeros(3)) or p / "n.npz", InvalidInputError, r"no array named 'images'"),
    (lambda p: np.savez(p / "m.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(2)) or p / "m.npz",
     InvalidInputError, r"'labels' has shape \(2,\) but there are 3 images"),
    (lambda p: (p / "c" / "a").mkdir(parents=True) or (p / "c" / "top.png").write_bytes(b"x") and p / "c",
     InvalidInputError, r"has class sub-folders \(1\) but no image files inside them"),
])
def test_inspect_errors_name_the_input_and_the_fix(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        inspect_client_data(make(tmp_path))
