"""Load on `nds serve`: many concurrent clients, throughput and latency, against the Prefect deployment path.

    .venv/bin/python benchmarks/service_load.py                                  # 64 clients, 60 s, small + 1e7
    .venv/bin/python benchmarks/service_load.py --duration 20 --indexes small --baseline-runs 2
    .venv/bin/python benchmarks/service_load.py --duration 2 --clients 4 --indexes small --no-baseline   # smoke

For each index (`small`: N = 22,402, K = 24, the size of the `small` profile; `large`: N = 1e7,
K = 1000, both synthetic: benchmarks/synthetic_index.py writes the files the index stages write,
once, under --work), the real `nds serve` runs on 127.0.0.1 (default options except --rate-limit 0, the clients share 4 tokens,
and --workers, default 2: one process per core) and --clients asyncio clients (aiohttp) each send
POST /v1/selections back to back for --duration seconds, with the body `nds client request`
sends (no rows inline; --rows puts the B manifest rows in every answer, as other API users may
ask). Two modes per index: closed loop (every client sends its next request when the last one is
answered: the most the server does, latency = queueing) and open loop at --rate selections/s in
all (the target's "50 selections/s", spread over the clients; latency counts from each request's
scheduled time, so a late start is not hidden). Reported: selections/s, latency p50/p95/p99
(send to last byte), errors (any non-200 or transport error), the server's peak RSS (sampled
every 0.5 s) and its private part (RSS less shared file pages: the memory-mapped index is
shared with the page cache and other workers), its CPU ms per selection (2000 / that = what two
idle cores could serve) and the 1-minute load average (other work on the machine).

Baseline in the same run: the Prefect deployment path an operator had before, `run_deployment`
of select/select on `nds server up` (Prefect server, `nds-process` work pool, a process worker),
--baseline-runs sequential runs per index (each run is a new process that loads the index:
at N = 1e7 it cannot overlap many). Its throughput is runs per wall second; the ratio column
is service throughput / baseline throughput and baseline p50 / service p50.
Prints a markdown table and writes benchmarks/results/service_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "service_load.json"
sys.path.insert(0, str(HERE))

from synthetic_index import synthetic_scores, write_synthetic_index  # noqa: E402

INDEXES = {"small": {"n": 22_402, "k": 24, "budget": 1000}, "large": {"n": 10_000_000, "k": 1000, "budget": 10_000}}
TOKENS = ("load-a", "load-b", "load-c", "load-d")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workspace(work: Path, name: str, n: int, k: int) -> tuple[Path, dict]:
    """The synthetic index for (n, k) under `work`, written once and reused."""
    root = work / f"{name}-{n}-{k}"
    marker = root / "synthetic.json"
    if marker.exists():
        return root, json.loads(marker.read_text())
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    info = write_synthetic_index(root, n=n, k=k)
    info["write_s"] = round(time.perf_counter() - t0, 1)
    marker.write_text(json.dumps(info))
    print(f"wrote synthetic index {name} (N={n:,}, K={k}) in {info['write_s']}s", flush=True)
    return root, info


def _clean(root: Path) -> None:
    """Manifests and audit rows of the last run (thousands of folders); the index and its snapshot stay."""
    shutil.rmtree(root / "manifests", ignore_errors=True)
    shutil.rmtree(root / "warehouse" / "selections", ignore_errors=True)
    shutil.rmtree(root / "warehouse" / "serve" / "clients", ignore_errors=True)


class Sampler(threading.Thread):
    """Peak RSS and CPU time of a process tree, sampled every 0.5 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.peak_private = 0  # RSS less file-backed shared pages (the memory-mapped index is shared)
        self.halt = threading.Event()

    def tree(self):
        return [self.proc, *self.proc.children(recursive=True)]

    def cpu(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.tree())

    def run(self) -> None:
        while not self.halt.wait(0.5):
            try:
                info = [p.memory_info() for p in self.tree()]
                self.peak = max(self.peak, sum(m.rss for m in info))
                self.peak_private = max(self.peak_private, sum(m.rss - m.shared for m in info))
            except Exception:  # noqa: BLE001 - a worker exiting between the listing and the read
                pass


def _start_server(root: Path, port: int, extra: list[str]) -> subprocess.Popen:
    import httpx

    log = open(root / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "--root", str(root), "serve", "--port", str(port),
                             "--rate-limit", "0", *extra], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")})
    deadline = time.monotonic() + 900  # the first start of a large index takes its snapshot
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nds serve exited: {(root / 'serve.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("nds serve did not start")


async def _load(url: str, bodies: list[bytes], tokens: list[str], clients: int, duration: float,
                rate: float = 0.0) -> dict:
    """Closed loop (rate 0: each client sends its next request when the last is answered) or open
    loop (`rate` requests/s in all, slot j at start + j/rate, handed round-robin to the clients;
    latency counts from the slot's time, so a late start is not hidden).

    The clients are aiohttp (asyncio, one process): on the same 2 cores as the server, the load
    generator must be light (httpx took ~3x its CPU per request here)."""
    import aiohttp

    latencies, errors, statuses = [], 0, {}
    start = time.perf_counter()
    deadline = start + duration

    async def one_client(i: int, http) -> None:
        nonlocal errors
        headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}", "content-type": "application/json"}
        j = i
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            if rate > 0:
                t0 = start + j / rate
                if t0 >= deadline:
                    break
                await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
            try:
                async with http.post(f"{url}/v1/selections", data=bodies[j % len(bodies)], headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
                    statuses[r.status] = statuses.get(r.status, 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                ok = False
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            j += clients

    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=clients, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        await asyncio.gather(*(one_client(i, http) for i in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    pct = (lambda q: round(float(np.percentile(lat, q)), 1)) if lat.size else (lambda q: None)
    return {"selections": int(lat.size), "wall_s": round(wall, 2), "per_s": round(lat.size / wall, 1),
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "errors": errors, "statuses": statuses}


def run_service(name: str, root: Path, info: dict, budget: int, args) -> list[dict]:
    import httpx

    from nds.config import Workspace
    from nds.serve.state import default_state_dir
    from nds.serve.tokens import TokenStore

    _clean(root)
    store = TokenStore(default_state_dir(Workspace(root)))
    for t in TOKENS:
        if t in {row["name"] for row in store.list()}:
            store.revoke(t)
    tokens = [store.create(t) for t in TOKENS]
    rng = random.Random(0)
    bodies = [json.dumps({"scores": synthetic_scores(info, favour=rng.randrange(info["k"])), "budget": budget,
                          "seed": i, "include_rows": args.rows}).encode() for i in range(256)]
    port = _free_port()
    t0 = time.perf_counter()
    proc = _start_server(root, port, ["--workers", str(args.workers), *args.serve_args])
    start_s = time.perf_counter() - t0
    url = f"http://127.0.0.1:{port}"
    sampler = Sampler(proc.pid)
    sampler.start()
    try:
        for body in bodies[:8]:  # warm-up: first touches of the memory-mapped index
            r = httpx.post(f"{url}/v1/selections", content=body, timeout=300,
                           headers={"Authorization": f"Bearer {tokens[0]}", "content-type": "application/json"})
            assert r.status_code == 200, r.text
        results = []
        for rate in ([0.0] if args.rate <= 0 else [0.0, args.rate]):
            cpu0, own0 = sampler.cpu(), time.process_time()
            result = asyncio.run(_load(url, bodies, tokens, args.clients, args.duration, rate))
            result["offered_per_s"] = rate or None
            result["server_cpu_s_per_selection"] = round((sampler.cpu() - cpu0) / max(1, result["selections"]), 4)
            # the load generator's own CPU (it shares the machine's cores with the server)
            result["client_cpu_s_per_selection"] = round((time.process_time() - own0) / max(1, result["selections"]), 4)
            result["load_average_1m"] = round(os.getloadavg()[0], 1)  # other work on the machine meanwhile
            results.append(result)
    finally:
        sampler.halt.set()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for result in results:
        mode = f"{result['offered_per_s']:g}/s offered" if result["offered_per_s"] else "closed loop"
        result.update(index=name, path=f"nds serve, {mode}", n=info["n"], k=info["k"], budget=budget,
                      clients=args.clients, workers=args.workers, rows_inline=args.rows, start_s=round(start_s, 1),
                      server_rss_mb=round(sampler.peak / 2**20), server_private_mb=round(sampler.peak_private / 2**20))
    _clean(root)
    return results


def run_baseline(name: str, root: Path, info: dict, budget: int, runs: int) -> dict:
    """`run_deployment("select/select")` on `nds server up` (process worker), `runs` times in a row."""
    home = Path(tempfile.mkdtemp(prefix="nds-load-prefect-"))
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}, "NDS_PREFECT_HOME": str(home)}
    cmd = [sys.executable, "-m", "flows.cli", "--root", str(root), "server"]
    row = {"index": name, "path": "prefect run_deployment", "n": info["n"], "k": info["k"], "budget": budget,
           "clients": 1, "rows_inline": False}
    t0 = time.perf_counter()
    up = subprocess.run([*cmd, "up", "--port", str(port), "--home", str(home), "--repo", str(REPO),
                         "--deployment", "select"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    row["start_s"] = round(time.perf_counter() - t0, 1)
    try:
        if up.returncode != 0:
            row["error"] = (up.stderr.strip().splitlines() or ["server up failed"])[-1]
            return row
        code = (
            "import json, sys, time\n"
            "from prefect.deployments import run_deployment\n"
            "req, runs = json.loads(sys.argv[1]), int(sys.argv[2])\n"
            "out = []\n"
            "for i in range(runs):\n"
            "    t0 = time.perf_counter()\n"
            "    fr = run_deployment('select/select', parameters={'request': {**req, 'seed': i}}, timeout=1800)\n"
            "    out.append([time.perf_counter() - t0, fr.state.type.value])\n"
            "print(json.dumps(out))\n"
        )
        request = {"scores": synthetic_scores(info, favour=1), "budget": budget}
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code, json.dumps(request), str(runs)], cwd=REPO, timeout=3600,
                           env={**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            row["error"] = (r.stderr.strip().splitlines() or ["run_deployment failed"])[-1]
            return row
        done = json.loads(r.stdout.strip().splitlines()[-1])
        lat = np.asarray([s for s, state in done if state == "COMPLETED"]) * 1000
        row.update(selections=int(lat.size), wall_s=round(wall, 1), per_s=round(lat.size / wall, 3),
                   p50_ms=round(float(np.percentile(lat, 50))) if lat.size else None,
                   p95_ms=round(float(np.percentile(lat, 95))) if lat.size else None,
                   p99_ms=round(float(np.percentile(lat, 99))) if lat.size else None,
                   errors=len(done) - int(lat.size))
        return row
    finally:
        subprocess.run([*cmd, "down", "--home", str(home)], cwd=REPO, env=env, capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)
        _clean(root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--indexes", nargs="+", default=["small", "large"], choices=sorted(INDEXES))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per index and mode")
    ap.add_argument("--rate", type=float, default=50.0,
                    help="also an open-loop run at this many selections/s in all (0: closed loop only)")
    ap.add_argument("--rows", action="store_true", help="ask for the manifest rows in every answer")
    ap.add_argument("--workers", type=int, default=2, help="`nds serve --workers` (default %(default)s: one per core)")
    ap.add_argument("--baseline-runs", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `nds serve` options (last)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "nds-service-load"),
                    help="where the synthetic indexes are kept between runs")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.indexes:
        spec = INDEXES[name]
        root, info = _workspace(work, name, spec["n"], spec["k"])
        for row in run_service(name, root, info, spec["budget"], args):
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.no_baseline:
            rows.append(run_baseline(name, root, info, spec["budget"], args.baseline_runs))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print("| index | N | K | B | path | clients | workers | selections | per s | p50 ms | p95 ms | p99 ms | errors "
          "| server RSS (private) MB | server / client CPU ms/sel | load avg | vs Prefect |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next((b for b in rows if b["index"] == row["index"] and b["path"].startswith("prefect") and b.get("per_s")),
                    None)
        ratio = ""
        if row["path"].startswith("nds serve") and base and row.get("p50_ms"):
            ratio = (f"{base['p50_ms'] / row['p50_ms']:.0f}x lower p50" if row.get("offered_per_s")
                     else f"{row['per_s'] / base['per_s']:.0f}x throughput")
        shown = {k: ("-" if row.get(k) is None else row.get(k)) for k in
                 ("selections", "per_s", "p50_ms", "p95_ms", "p99_ms", "errors", "server_rss_mb", "load_average_1m")}
        rss = f"{shown['server_rss_mb']} ({row['server_private_mb']})" if row.get("server_private_mb") else "-"
        cpu = (f"{1000 * row['server_cpu_s_per_selection']:.1f} / {1000 * row['client_cpu_s_per_selection']:.1f}"
               if row.get("server_cpu_s_per_selection") else "-")
        note = f" ({row['error']})" if row.get("error") else ""
        print(f"| {row['index']} | {row['n']:,} | {row['k']} | {row['budget']:,} | {row['path']}{note} | {row['clients']} | "
              f"{row.get('workers', '-')} | "
              f"{shown['selections']} | {shown['per_s']} | {shown['p50_ms']} | {shown['p95_ms']} | {shown['p99_ms']} | "
              f"{shown['errors']} | {rss} | {cpu} | {shown['load_average_1m']} | {ratio} |")
    doc = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
