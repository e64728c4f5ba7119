"""The wheel ships the warehouse DDL: built offline, installed outside the repository, it creates
every table and view from its own copy of `warehouse/*.sql` (nds/platform/sql/)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

#: What setuptools needs to build the wheel (a copy, so the build leaves nothing in the checkout).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "nds", "flows")

#: Run by a python whose sys.path has the installed wheel first and not the repository.
PROBE = """
import json, sys
import nds, nds.platform.warehouse as w
db = sys.argv[1]
with w.connect(db):
    pass
import duckdb
con = duckdb.connect(db, read_only=True)
objects = con.execute(
    "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'main'"
).fetchall()
print(json.dumps({"nds": nds.__file__, "sql_dir": str(w.sql_dir()), "path": sys.path,
                  "objects": sorted([name, kind] for name, kind in objects)}))
"""


def _objects(db) -> list[list[str]]:
    from nds.platform import warehouse

    with warehouse.connect(db) as con:
        rows = con.execute(
            "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()
    return sorted([name, kind] for name, kind in rows)


def _pip(*args: str, cwd) -> None:
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_wheel_ships_the_warehouse_sql(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    (src / "warehouse").mkdir()
    sql = sorted(p.name for p in (REPO / "warehouse").glob("*.sql"))
    assert sql, "no warehouse/*.sql in the repository"
    for name in sql:
        shutil.copy2(REPO / "warehouse" / name, src / "warehouse" / name)

    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if re.fullmatch(r"nds/platform/sql/[^/]+", n)) == [
        f"nds/platform/sql/{n}" for n in sql]
    assert not any(n.startswith("warehouse/") for n in names)  # inside the package, not beside it

    site = tmp_path / "site"
    # --target, never --prefix: pip would uninstall the environment's own (editable) install first.
    _pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    still = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; m.distribution('neural-data-server')"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert still.returncode == 0, "the wheel install removed the environment's own install: " + still.stderr[-500:]
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run([sys.executable, "-c", PROBE, str(run / "w.duckdb")], cwd=run, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["nds"].startswith(str(site) + os.sep), got["nds"]
    assert got["sql_dir"] == str(site / "nds" / "platform" / "sql")
    # The repository is not on the path (its venv's site-packages may be: it holds the dependencies).
    others = [Path(p or run).resolve() for p in got["path"] if p != str(site)]
    assert REPO not in others and not any((p / "nds").exists() or (p / "warehouse").exists() for p in others)
    assert got["path"].index(str(site)) < min(
        (i for i, p in enumerate(got["path"]) if "site-packages" in p), default=len(got["path"]))
    # The same tables and views as the repository's DDL creates, and the ones the views name.
    assert got["objects"] == _objects(tmp_path / "repo.duckdb")
    kinds = dict(map(tuple, got["objects"]))
    for table in ("index_versions", "samples", "clusters", "sample_weights", "evaluations"):
        assert kinds[table] == "BASE TABLE"
    for view in ("current_index", "cluster_summary", "weights_by_dataset", "selections"):
        assert kinds[view] == "VIEW"


@pytest.mark.parametrize("packaged", [True, False])
def test_sql_dir_prefers_the_packaged_copy(tmp_path, monkeypatch, packaged):
    """An installed wheel reads nds/platform/sql/; a checkout (editable install) reads warehouse/."""
    from importlib import resources

    from nds.platform import warehouse

    pkg = tmp_path / "pkg"
    (pkg / "sql").mkdir(parents=True)
    if packaged:
        (pkg / "sql" / "001_x.sql").write_text("CREATE TABLE IF NOT EXISTS x (a INTEGER);")
    else:
        (pkg / "sql").rmdir()
    monkeypatch.setattr(resources, "files", lambda name: pkg)
    assert warehouse.sql_dir() == (pkg / "sql" if packaged else warehouse.REPO_SQL_DIR)
    assert [f.name for f in warehouse.sql_files()][:1] == (["001_x.sql"] if packaged else ["001_tables.sql"])
