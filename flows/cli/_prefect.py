"""How the CLI runs a Prefect flow: is an API configured and reachable, and a failed run as one error.

Without a configured API (no PREFECT_API_URL in the environment, the active Prefect profile or
a settings context), calling a flow makes Prefect start a temporary server: 10-30 s and a
banner. Commands that need no orchestration (`nds select`) ask `prefect_api_url()` first and
run the library directly when there is none.
"""

from __future__ import annotations

import os

from nds.errors import NDSError


def prefect_api_url() -> str | None:
    """The Prefect API URL flows would report to, or None (a temporary server would start).

    $PREFECT_API_URL answers without importing Prefect; otherwise Prefect's own settings do
    (profile, .env, pyproject, an active settings context such as the test harness).
    """
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if url:
        return url
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def reachable_prefect_api() -> str | None:
    """`prefect_api_url()`, after checking that the server answers (an NDSError if it does not)."""
    url = prefect_api_url()
    if url is None:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise NDSError(f"cannot reach the Prefect API at {url} ({type(problem).__name__}): start it "
                       "(`nds server up`) or point PREFECT_API_URL at a running server")
    return url


def run_flow(flow, *args, **kwargs):
    """Call `flow(*args, **kwargs)` and return its result; a failed run raises its exception.

    The exception the flow raised comes back as it was (an NDSError is then one `error:` line
    in the CLI); a run that failed without one (a `Failed` state carrying only a message)
    becomes an NDSError with the run's message.
    """
    from prefect.exceptions import PrefectException

    state = flow(*args, return_state=True, **kwargs)
    if state.is_completed():
        return state.result()
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException) and not isinstance(outcome, PrefectException):
        raise outcome
    raise NDSError(state.message or f"the {flow.name} flow run ended {state.type.value.lower()}")
