"""200 concurrent selections with 4 tokens: every client sees exactly its own, nothing is lost."""

from __future__ import annotations

import asyncio
import random

import httpx
from servehelpers import ServeProcess, audit_rows, bearer, synth, synthetic_scores, tokens  # noqa: F401

N_REQUESTS = 200
NAMES = ("ann", "ben", "cat", "dan")


def test_200_concurrent_requests_with_4_tokens(synth):
    ws, info = synth
    toks = tokens(ws, *NAMES)
    rng = random.Random(0)
    plan = [(NAMES[i % 4], {"scores": synthetic_scores(info, favour=rng.randrange(8)), "budget": rng.choice([5, 20, 0.01]),
                             "seed": i, "include_rows": i % 2 == 0, **({"request_id": f"r{i}"} if i % 3 == 0 else {})})
            for i in range(N_REQUESTS)]

    async def run(url):
        limits = httpx.Limits(max_connections=N_REQUESTS)
        async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as http:
            answers = await asyncio.gather(*(http.post("/v1/selections", json=body, headers=bearer(toks[name]))
                                             for name, body in plan))
            lists = {name: (await http.get("/v1/selections", headers=bearer(toks[name]))).json()["selections"]
                     for name in NAMES}
            made = {name: [a.json()["selection_id"] for (n, _), a in zip(plan, answers) if n == name] for name in NAMES}
            # every other token's ids are 404 for each client, files included
            crossed = await asyncio.gather(*(http.get(f"/v1/selections/{sid}{suffix}", headers=bearer(toks[name]))
                                             for name in NAMES for other in NAMES if other != name
                                             for sid in made[other][:5] for suffix in ("", "/manifest.csv")))
            own = await asyncio.gather(*(http.get(f"/v1/selections/{sid}", headers=bearer(toks[name]))
                                         for name in NAMES for sid in made[name]))
        return answers, lists, made, crossed, own

    with ServeProcess(ws.root, "--rate-limit", "0", "--threads", "4") as server:
        answers, lists, made, crossed, own = asyncio.run(run(server.url))
        assert "Traceback" not in server.log()
    assert [a.status_code for a in answers] == [200] * N_REQUESTS, {a.status_code: a.text for a in answers}
    for name in NAMES:
        assert sorted(s["selection_id"] for s in lists[name]) == sorted(made[name]) and len(made[name]) == 50
    assert all(r.status_code == 404 for r in crossed) and len(crossed) == 4 * 3 * 5 * 2
    assert all(r.status_code == 200 for r in own)
    ids = [sid for name in NAMES for sid in made[name]]
    assert len(set(ids)) == N_REQUESTS
    rows = {r["selection_id"]: r for r in audit_rows(ws)}
    assert len(rows) == N_REQUESTS
    for name in NAMES:
        assert {rows[sid]["requester"] for sid in made[name]} == {name}
    for (name, body), answer in zip(plan, answers):
        doc = answer.json()
        assert ("manifest" in doc) == body["include_rows"] and rows[doc["selection_id"]]["n_selected"] == doc["rows"]


def test_two_workers_share_tokens_ownership_and_request_ids(synth):
    """`--workers 2`: the state is on disk and request ids are locked across processes."""
    ws, info = synth
    toks = tokens(ws, "ann", "ben")
    body = {"scores": synthetic_scores(info, favour=6), "budget": 40, "request_id": "same", "include_rows": False}

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            same = await asyncio.gather(*(http.post("/v1/selections", json=body, headers=bearer(toks["ann"]))
                                          for _ in range(12)))
            mine = [(await http.get("/v1/selections", headers=bearer(toks[n]))).json()["selections"]
                    for n in ("ann", "ben") for _ in range(4)]
        return same, mine

    with ServeProcess(ws.root, "--rate-limit", "0", "--workers", "2") as server:
        same, lists = asyncio.run(run(server.url))
        assert server.log().count("Started server process") == 2
    assert [r.status_code for r in same] == [200] * 12
    ids = {r.json()["selection_id"] for r in same}
    assert len(ids) == 1 and sum(r.headers.get("idempotent-replayed") == "true" for r in same) == 11
    assert [r["selection_id"] for r in audit_rows(ws)] == list(ids)
    assert all([s["selection_id"] for s in lst] == list(ids) for lst in lists[:4]) and lists[4:] == [[]] * 4
