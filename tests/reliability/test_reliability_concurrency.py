"""20 selection runs at once against one index: every manifest and warehouse row present, nothing corrupt.

The runs go through `nds.select.service.run_selection`, the body of the select flow's only task
(what the Prefect UI triggers): 16 in threads of this process and 4 in their own processes,
all started together behind a barrier, publishing to one shared store.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from nds.formats import manifest
from nds.platform import storage
from nds.platform import warehouse
from nds.select import service as selections
from relhelpers import copy_workspace, write_valid_scores

N_THREADS = 16
N_PROCESSES = 4
BUDGET = 30

_CHILD = """
import json, sys, time
from pathlib import Path
from nds.select import service as selections
from nds.config import Workspace
root, scores, seed, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
request = selections.SelectRequest(scores_path=scores, budget={budget}, seed=seed)
time.sleep(max(0.0, start_at - time.time()))
print(json.dumps(selections.run_selection(Workspace(Path(root)), request)))
"""


def test_twenty_concurrent_selections(tiny_index, tmp_path, monkeypatch):
    src, _ = tiny_index
    ws = copy_workspace(src.root, tmp_path / "ws")
    scores = write_valid_scores(ws, tmp_path / "scores.json", favour=1)
    monkeypatch.setenv("NDS_MANIFESTS", str(tmp_path / "manifests"))
    monkeypatch.setenv("NDS_STORAGE_URL", (tmp_path / "store").as_uri())
    db_before = hashlib.sha256(ws.warehouse_path.read_bytes()).hexdigest()
    rows_before = warehouse.query(ws.warehouse_path, "SELECT count(*) AS n FROM selections")[0]["n"]

    seeds = [i % 4 for i in range(N_THREADS + N_PROCESSES)]  # 5 runs per seed: their manifests must agree
    start_at = time.time() + 6.0  # the child processes need a few seconds to import
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD.format(budget=BUDGET), str(ws.root), str(scores),
                          str(seed), str(start_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in seeds[N_THREADS:]
    ]
    barrier = threading.Barrier(N_THREADS)

    def one(seed: int) -> dict:
        request = selections.SelectRequest(scores_path=str(scores), budget=BUDGET, seed=seed)
        barrier.wait()
        time.sleep(max(0.0, start_at - time.time()))
        return selections.run_selection(ws, request)

    with ThreadPoolExecutor(N_THREADS) as pool:
        summaries = list(pool.map(one, seeds[:N_THREADS]))
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))

    # Every run made its own manifest, complete and verifiable, locally and in the store.
    ids = [s["selection_id"] for s in summaries]
    assert len(set(ids)) == len(summaries) == 20
    store = storage.open_storage()
    for s in summaries:
        table = manifest.load_manifest(s["local_manifest"])  # verifies both checksums
        assert table.num_rows == s["rows"] == BUDGET
        assert len(set(table.column("sample_id").to_pylist())) == BUDGET
        assert store.list(f"manifests/{s['selection_id']}") == [
            f"manifests/{s['selection_id']}/{n}" for n in ("manifest.csv", "manifest.parquet", "summary.json")]
        assert json.loads(store.get_bytes(f"manifests/{s['selection_id']}/summary.json"))["manifest_sha256"] \
            == s["manifest_sha256"]

    # Same seed and inputs -> the same manifest checksum; different seeds -> different ones.
    by_seed: dict[int, set[str]] = {}
    for seed, s in zip(seeds, summaries):
        by_seed.setdefault(seed, set()).add(s["manifest_sha256"])
    assert all(len(v) == 1 for v in by_seed.values()), by_seed
    assert len({next(iter(v)) for v in by_seed.values()}) == 4

    # Every audit row is there, readable, and matches its run; the DuckDB file was never written.
    folder = selections.selections_dir(ws)
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name]
    rows = warehouse.query(ws.warehouse_path, "SELECT selection_id, manifest_sha256, n_selected FROM selections")
    assert len(rows) == rows_before + 20
    got = {r["selection_id"]: (r["manifest_sha256"], r["n_selected"]) for r in rows}
    assert all(got[s["selection_id"]] == (s["manifest_sha256"], BUDGET) for s in summaries)
    for s in summaries:
        assert pq.read_table(folder / f"{s['selection_id']}.parquet").num_rows == 1
    assert hashlib.sha256(ws.warehouse_path.read_bytes()).hexdigest() == db_before
    print(f"20 concurrent selections ({N_THREADS} threads + {N_PROCESSES} processes): "
          f"{len(rows) - rows_before} rows, {len(by_seed)} seeds, 0 lost")
