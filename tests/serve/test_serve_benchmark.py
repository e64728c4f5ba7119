"""Smoke run of benchmarks/service_load.py at a toy size, so it cannot rot (the Prefect baseline is
left out here: it starts a Prefect server and runs deployments, minutes on 2 cores)."""

import json
import subprocess
import sys

from servehelpers import REPO


def test_service_load_smoke(tmp_path):
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/service_load.py"), "--indexes", "small", "--clients", "4",
                        "--duration", "2", "--rate", "5", "--no-baseline", "--work", str(tmp_path / "work"),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["path"] for row in rows] == ["nds serve, closed loop", "nds serve, 5/s offered"]
    assert all(row["errors"] == 0 and row["selections"] > 0 and row["p50_ms"] > 0 for row in rows)
    assert "| small | 22,402 | 24 | 1,000 | nds serve, closed loop | 4 | 2 |" in r.stdout
