"""`nds source add|list|check|remove` as a user runs them (subprocesses), on real PNGs from oxygen-icon-theme.

Bad input is exactly one `error:` line (exit 2) and writes nothing; `check` exits 1 when objects changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_flows_cli import assert_one_error_line, nds

OXYGEN = Path("/usr/share/icons/oxygen/base/32x32")


@pytest.fixture
def icons(tmp_path) -> Path:
    if not OXYGEN.is_dir():
        pytest.fail("the Debian package oxygen-icon-theme is missing: run scripts/setup.sh (or apt-get install it)")
    root = tmp_path / "my photos"  # a space in the path, as users have
    for category in ("places", "emblems"):
        (root / category).mkdir(parents=True)
        for p in sorted(p for p in (OXYGEN / category).glob("*.png") if not p.is_symlink())[:6]:
            shutil.copyfile(p, root / category / p.name)
    return root


def test_add_list_check_remove(tmp_path, icons):
    ws = tmp_path / "ws"
    ws.mkdir()
    r = nds("-q", "source", "add", "photos", "--from", str(icons), cwd=ws)
    assert r.returncode == 0, r.stderr
    assert "source photos (imagefolder): 12 images, 2 labels (--label-from dirs)" in r.stdout
    assert (ws / "data/sources/photos/catalog.parquet").exists()

    r = nds("source", "list", cwd=ws)
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:5] == ["photos", "imagefolder", "12", "2", "0"]

    assert nds("-q", "source", "check", "photos", cwd=ws).returncode == 0
    next((icons / "places").glob("*.png")).write_bytes(next((icons / "emblems").glob("*.png")).read_bytes())
    r = nds("-q", "source", "check", "photos", cwd=ws)
    assert r.returncode == 1 and "1 changed" in r.stdout
    assert f"nds source add photos --from '{icons}' --label-from dirs --replace" in r.stdout

    r = nds("source", "remove", "photos", cwd=ws)
    assert r.returncode == 0 and "removed source photos (12 images" in r.stdout
    assert "no registered sources" in nds("source", "list", cwd=ws).stdout


def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, icons):
    ws = tmp_path / "ws"
    ws.mkdir()
    table = tmp_path / "links.csv"
    table.write_text("link,label\nhttp://127.0.0.1:9/x.png,a\n")
    assert_one_error_line(nds("source", "add", "../up", "--from", str(icons), cwd=ws), r"source name '\.\./up' must match")
    assert_one_error_line(nds("source", "add", "fashion", "--from", str(icons), cwd=ws), "packaged dataset")
    assert_one_error_line(nds("source", "add", "t", "--from", str(table), cwd=ws), r"no `url` column \(columns: link, label\)")
    assert_one_error_line(nds("source", "add", "e", "--from", str(tmp_path / "none"), cwd=ws), "does not exist")
    assert_one_error_line(nds("source", "remove", "ghost", cwd=ws), r"no registered source 'ghost' \(registered: none\)")
    assert_one_error_line(nds("source", "add", "x", "--from", str(icons), "--label-from", "col", cwd=ws), "invalid choice")
    assert not (ws / "data").exists()
