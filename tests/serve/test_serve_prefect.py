"""Operators see the service's selections in Prefect: one `nds.selection.created` event each."""

from __future__ import annotations

import time

import httpx
from servehelpers import ServeProcess, bearer, synth, synthetic_scores, tokens  # noqa: F401


def test_each_selection_is_an_event_in_prefect(synth, prefect_server):
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    ws, info = synth
    token = tokens(ws, "alice")["alice"]
    with ServeProcess(ws.root, "--rate-limit", "0", env={"PREFECT_API_URL": api}) as server:
        answer = httpx.post(f"{server.url}/v1/selections", headers=bearer(token), timeout=60,
                            json={"scores": synthetic_scores(info, favour=2), "budget": 30, "include_rows": False})
        assert answer.status_code == 200, answer.text
        sid = answer.json()["selection_id"]
        events, deadline = [], time.monotonic() + 90
        while time.monotonic() < deadline and not events:
            page = httpx.post(f"{api}/events/filter", timeout=30, json={
                "filter": {"event": {"prefix": ["nds.selection"]}, "resource": {"id": [f"nds.selection.{sid}"]}},
                "limit": 10})
            assert page.status_code == 200, page.text
            events = page.json()["events"]
            time.sleep(0.5)
    assert len(events) == 1, events
    event = events[0]
    assert event["event"] == "nds.selection.created" and event["resource"]["nds.requester"] == "alice"
    assert event["payload"]["rows"] == 30 and event["payload"]["index_version"] == info["index_version"]
    assert event["payload"]["manifest_sha256"] == answer.json()["manifest_sha256"]
    assert "scores" not in event["payload"] and token not in str(event)  # the client's numbers stay out of Prefect
    assert any(r["prefect.resource.role"] == "index" for r in event["related"])


def test_prefect_down_never_fails_a_request(synth):
    """PREFECT_API_URL names a port nobody listens on: selections still succeed."""
    from servehelpers import free_port

    ws, info = synth
    token = tokens(ws, "alice")["alice"]
    with ServeProcess(ws.root, "--rate-limit", "0",
                      env={"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}) as server:
        codes = [httpx.post(f"{server.url}/v1/selections", headers=bearer(token), timeout=60,
                            json={"scores": synthetic_scores(info), "budget": 5}).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
