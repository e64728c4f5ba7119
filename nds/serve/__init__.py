"""The HTTP service (`nds serve`): many clients reach the online phase over the network.

    tokens.py   per-client API tokens, stored hashed (sha256) in the service's state folder
    limits.py   per-token rate limit and request-size limit
    holder.py   the current index, loaded once and memory-mapped, swapped atomically on a new version
    state.py    the service's state folder: which client made which selection, request ids answered
    app.py      the FastAPI application: /v1/index, /v1/bundle, /v1/selections

Selections go through nds.select.service.run_selection, the one selection path (same
manifest, same audit row as `nds select`). No Prefect here: flows/serve.py wires the
Prefect event emitter in through the app's `on_selection` callback.
"""
