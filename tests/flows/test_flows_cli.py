"""The `nds` command line as a user runs it (a subprocess): errors, `-v`, and `nds select` without Prefect.

- every command's bad input is exactly one `error:` line on stderr and exit code 2, before any
  long work (no temporary Prefect server, no corpus build);
- `-v` adds the traceback;
- `nds select` without PREFECT_API_URL runs the selection directly (no temporary server), with
  the same manifest bytes and the same audit row as the `select` flow; with PREFECT_API_URL set
  it runs as a flow on that server;
- `--overwrite` replaces an earlier selection, and only a selection, and only once the new one is done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nds.corpus.holdout import export_holdout
from nds.platform import warehouse

REPO = Path(__file__).resolve().parents[2]
NDS = [str(Path(sys.executable).with_name("nds"))] if Path(sys.executable).with_name("nds").exists() \
    else [sys.executable, "-m", "flows.cli"]
TEMPORARY_SERVER = re.compile(r"temporary server", re.I)


def nds(*argv: str, cwd: Path, prefect_home: Path | None = None, api_url: str | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """`nds ARGV` in a fresh process; PREFECT_API_URL only when `api_url` is given."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    return subprocess.run([*NDS, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(r: subprocess.CompletedProcess, pattern: str) -> str:
    lines = r.stderr.splitlines()
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{r.stderr}"
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- without an index


@pytest.fixture
def empty_ws(tmp_path) -> Path:
    """A workspace folder with a params.yaml that names an unknown clustering method."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump({"cluster": {"method": "nope", "k": 3}}))
    return ws


NO_INDEX_CASES = [
    ("no-command", [], r"^error: nds: the following arguments are required: command \(see `nds --help`\)$"),
    ("unknown-option", ["status", "--nope"], r"unrecognized arguments: --nope"),
    ("bad-choice", ["corpus", "build", "--profile", "huge"], r"nds corpus build: argument --profile: invalid choice"),
    ("not-a-number", ["select", "--scores", "s.json", "--budget", "ten", "--out", "o"],
     r"argument --budget: invalid float value: 'ten'"),
    ("corpus-publish-not-s3", ["corpus", "publish", "http://host/x"], r"must be an S3 location: s3://bucket/prefix"),
    ("index-bad-params", ["--root", "{ws}", "index", "--profile", "tiny"], r"params\.yaml: cluster\.method: .*'nope'"),
    ("index-no-params", ["--root", "{tmp}/none", "index"], r"params\.yaml not found: run nds from the workspace root"),
    ("stage-bad-params", ["--root", "{ws}", "stage", "cluster"], r"params\.yaml: cluster\.method"),
    ("status-no-warehouse", ["--root", "{ws}", "status"], r"warehouse .* does not exist yet; run `nds index` first"),
    ("select-no-index", ["--root", "{ws}", "select", "--scores", "s.json", "--budget", "5", "--out", "o"],
     r"no index in workspace .*ws \(no artifacts/experts/bundle\.json\): build it with `nds index`"),
    ("select-budget-zero", ["--root", "{ws}", "select", "--scores", "s.json", "--budget", "0", "--out", "o"],
     r"--budget: Input should be greater than 0"),
    ("select-exclude-file-missing", ["select", "--scores", "s.json", "--budget", "5", "--exclude-file", "ex.txt",
                                     "--out", "o"], r"--exclude-file ex\.txt does not exist"),
    ("fetch-no-source", ["client", "fetch-experts", "{tmp}/none", "--out", "{tmp}/e"], r"none is not a folder"),
    ("score-no-experts", ["client", "score", "--experts", "{tmp}/none", "--data", "{tmp}", "--out", "{tmp}/s.json"],
     r"bundle\.json not found: point --experts at an expert bundle folder"),
    ("download-no-manifest", ["client", "download", "--manifest", "{tmp}/none", "--out", "{tmp}/d"],
     r"no manifest at .*none"),
    ("evaluate-unknown-task", ["evaluate", "--quick", "--task", "cifar"], r"unknown target task\(s\) \['cifar'\]"),
    ("evaluate-from-without-target", ["evaluate", "--from", "{tmp}"], r"--from needs --target-accuracy"),
    ("server-up-no-prefect-yaml", ["server", "up", "--repo", "{ws}", "--home", "{tmp}/home"],
     r"has no prefect\.yaml: run from the repository root or pass --repo"),
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in NO_INDEX_CASES], ids=[c[0] for c in NO_INDEX_CASES])
def test_bad_input_is_one_error_line_and_exit_2(empty_ws, tmp_path, argv, pattern):
    home = tmp_path / "prefect-home"
    argv = [a.format(ws=empty_ws, tmp=tmp_path) for a in argv]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = nds(*argv, cwd=tmp_path, prefect_home=home)
    assert_one_error_line(r, pattern)
    assert not (home / "prefect.db").exists()  # no temporary Prefect server was started
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "prefect-home" not in p.parts) == before


def _leaf_commands() -> list[list[str]]:
    """Every `nds ...` command path in the parser (`select`, `client score`, ...), whoever added it."""
    import argparse

    from flows.cli import build_parser

    def walk(parser, path):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
        if not subs:
            return [path]
        return [leaf for name, child in subs[0].choices.items() for leaf in walk(child, [*path, name])]

    return walk(build_parser(), [])


@pytest.mark.parametrize("command", _leaf_commands(), ids=" ".join)
def test_every_command_reports_a_bad_option_on_one_line(command, tmp_path):
    r = nds(*command, "--no-such-option", cwd=tmp_path, prefect_home=tmp_path / "home")
    line = assert_one_error_line(r, r"^error: nds[\w -]*: .*\(see `nds[\w -]* --help`\)$")
    assert "--no-such-option" in line or "required" in line, line


def test_index_checks_its_inputs_before_prefect_and_the_corpus_build(empty_ws, tmp_path):
    home = tmp_path / "prefect-home"
    r = nds("--root", str(empty_ws), "index", "--profile", "tiny", cwd=tmp_path, prefect_home=home)
    assert_one_error_line(r, r"params\.yaml: cluster\.method")
    assert not (empty_ws / "data").exists() and not TEMPORARY_SERVER.search(r.stderr + r.stdout)
    # A configured Prefect API that does not answer: one line, before anything is built.
    (empty_ws / "params.yaml").write_text(yaml.safe_dump({"cluster": {"k": 3}}))
    dead = f"http://127.0.0.1:{_free_port()}/api"
    r = nds("--root", str(empty_ws), "index", "--profile", "tiny", cwd=tmp_path, prefect_home=home, api_url=dead)
    assert_one_error_line(r, rf"cannot reach the Prefect API at {re.escape(dead)} .*`nds server up`")
    assert not (empty_ws / "data").exists()


def test_verbose_shows_the_traceback_then_the_same_line(tmp_path):
    argv = ["client", "fetch-experts", str(tmp_path / "none"), "--out", str(tmp_path / "e")]
    quiet = nds(*argv, cwd=tmp_path)
    line = assert_one_error_line(quiet, r"none is not a folder")
    loud = nds("-v", *argv, cwd=tmp_path)
    assert loud.returncode == 2
    assert "Traceback (most recent call last)" in loud.stderr and "nds.errors.NotFoundError" in loud.stderr
    assert loud.stderr.splitlines()[-1] == line


# --------------------------------------------------------------------------- nds select on the tiny index


@pytest.fixture(scope="module")
def client_side(tiny_index, tmp_path_factory):
    """A client's scores.json for the tiny index, made with the CLI (held-out mnist images)."""
    ws, _ = tiny_index
    tmp = tmp_path_factory.mktemp("cli-client")
    export_holdout(ws, "mnist", tmp / "task", per_class=4)
    r = nds("-q", "client", "score", "--experts", str(ws.stage_dir("experts")), "--data", str(tmp / "task"),
            "--out", str(tmp / "scores.json"), cwd=tmp)
    assert r.returncode == 0, r.stderr
    return ws, tmp / "scores.json"


def _audit_row(ws, selection_id: str) -> tuple:
    rows = warehouse.query(ws.warehouse_path, "SELECT selection_id, manifest_sha256, n_selected FROM selections "
                           "WHERE selection_id = ?", [selection_id])
    assert len(rows) == 1, rows
    return tuple(rows[0].values())


def test_select_without_prefect_api_runs_directly_with_the_flows_manifest(client_side, tmp_path):
    from flows.select import select
    from nds.select.request import SelectRequest

    ws, scores = client_side
    home = tmp_path / "prefect-home"
    t0 = time.perf_counter()
    r = nds("--root", str(ws.root), "-q", "select", "--scores", str(scores), "--budget", "60", "--seed", "2",
            "--out", str(tmp_path / "direct"), cwd=tmp_path, prefect_home=home)
    wall = time.perf_counter() - t0
    print(f"nds select without PREFECT_API_URL: {wall:.1f}s wall")
    assert r.returncode == 0, r.stderr
    assert not TEMPORARY_SERVER.search(r.stderr + r.stdout) and not (home / "prefect.db").exists()
    assert "Beginning flow run" not in r.stderr
    direct = json.loads((tmp_path / "direct" / "summary.json").read_text())
    assert direct["rows"] == 60 and f"selection {direct['selection_id']}: 60 of" in r.stdout
    # The audit row, as the flow writes it.
    assert _audit_row(ws, direct["selection_id"]) == (direct["selection_id"], direct["manifest_sha256"], 60)
    # The same request through the `select` flow (the session's Prefect test server): the same bytes.
    request = SelectRequest(scores_path=str(scores), budget=60, seed=2)
    flow = select(request, str(ws.root), str(tmp_path / "flow"))
    assert flow["manifest_sha256"] == direct["manifest_sha256"]
    for name in ("manifest.csv", "manifest.parquet"):
        assert (tmp_path / "flow" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


def test_select_with_prefect_api_runs_the_flow_there(client_side, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL

    def completed_select_runs() -> set:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["select"])))
        return {run.id for run in runs if run.state and run.state.is_completed()}

    ws, scores = client_side
    api = PREFECT_API_URL.value()  # the session's Prefect test server (tiny_index started it)
    out = tmp_path / "via-prefect"
    before = completed_select_runs()
    r = nds("--root", str(ws.root), "-q", "select", "--scores", str(scores), "--budget", "30",
            "--out", str(out), cwd=tmp_path, api_url=api)
    assert r.returncode == 0, r.stderr
    assert "Beginning flow run" in r.stderr and not TEMPORARY_SERVER.search(r.stderr)
    assert len(completed_select_runs() - before) == 1  # the run is on the server operators watch
    summary = json.loads((out / "summary.json").read_text())
    assert _audit_row(ws, summary["selection_id"])[1] == summary["manifest_sha256"]
    # Bad scores with an API: still one line, and before a flow run starts.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(scores.read_text()), "index_version": "other"}))
    r = nds("--root", str(ws.root), "-q", "select", "--scores", str(bad), "--budget", "30",
            "--out", str(tmp_path / "never"), cwd=tmp_path, api_url=api)
    assert_one_error_line(r, r"scores are for index other but the server holds .*score again")
    # A configured API that does not answer: one line, nothing written.
    dead = f"http://127.0.0.1:{_free_port()}/api"
    r = nds("--root", str(ws.root), "-q", "select", "--scores", str(scores), "--budget", "30",
            "--out", str(tmp_path / "never"), cwd=tmp_path, api_url=dead)
    assert_one_error_line(r, r"cannot reach the Prefect API at .*: start it \(`nds server up`\)")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("argv, pattern", [
    (["--budget", "100000"], r"budget 100000 exceeds the \d+ eligible samples"),
    (["--budget", "5", "--dataset", "nope"], r"unknown dataset filter \['nope'\]: choose from"),
    (["--budget", "5", "--exclude-file", "{tmp}/binary.txt"], r"--exclude-file .*binary\.txt is not UTF-8 text"),
], ids=["budget-too-large", "unknown-dataset", "exclude-file-not-text"])
def test_select_bad_input_on_an_index_is_one_line(client_side, tmp_path, argv, pattern):
    ws, scores = client_side
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00sha")
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = nds("--root", str(ws.root), "select", "--scores", str(scores), *argv, "--out", str(tmp_path / "o"),
            cwd=tmp_path, prefect_home=tmp_path / "home")
    assert_one_error_line(r, pattern)
    assert not (tmp_path / "o").exists() and not (tmp_path / "home" / "prefect.db").exists()


def test_select_overwrite(client_side, tmp_path):
    ws, scores = client_side
    out = tmp_path / "sel"
    base = ["--root", str(ws.root), "-q", "select", "--scores", str(scores), "--out", str(out)]
    assert nds(*base, "--budget", "40", cwd=tmp_path).returncode == 0
    first = (out / "summary.json").read_bytes()
    # Reusing --out: the message names the flag that exists, and nothing changes.
    r = nds(*base, "--budget", "20", cwd=tmp_path)
    assert_one_error_line(r, r"--out .*sel already holds a selection: choose a new output folder, or pass --overwrite")
    assert (out / "summary.json").read_bytes() == first
    # --overwrite with a request that fails: the earlier selection stays, byte for byte.
    r = nds(*base, "--budget", "100000", "--overwrite", cwd=tmp_path)
    assert_one_error_line(r, r"budget 100000 exceeds")
    assert (out / "summary.json").read_bytes() == first
    # --overwrite that succeeds: the new selection replaces it, no leftovers beside it.
    r = nds(*base, "--budget", "20", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 20 and summary["selection_id"] != json.loads(first)["selection_id"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # --overwrite never empties a folder that is not a selection.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.png").write_bytes(b"precious")
    r = nds("--root", str(ws.root), "select", "--scores", str(scores), "--budget", "5", "--out", str(other),
            "--overwrite", cwd=tmp_path)
    assert_one_error_line(r, r"not empty and holds no selection \(no summary\.json\): --overwrite only replaces")
    assert (other / "holiday.png").read_bytes() == b"precious"
    shutil.rmtree(out)
