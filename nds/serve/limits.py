"""Per-token rate limit (a token bucket) and the request-size limit (an ASGI middleware)."""

from __future__ import annotations

import json
import threading
import time

from starlette.exceptions import HTTPException


class RateLimiter:
    """`rate` requests per second per key on average, bursts of up to `burst`; rate <= 0: no limit."""

    def __init__(self, rate: float, burst: int | None = None):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, 2 * self.rate))
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0 when the request may go ahead, else the seconds until it could (it is not counted)."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        size = f"{limit / 1024:g} KiB" if limit >= 1024 else f"{limit}-byte"
        super().__init__(413, f"request body over the {size} limit: send fewer exclusions "
                              "or ask the operator to raise --max-request-kb")


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` (413) before reading them where Content-Length says
    so, and while streaming otherwise (chunked uploads are counted as they arrive)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.max_bytes <= 0:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            exc = BodyTooLarge(self.max_bytes)
            body = json.dumps({"detail": exc.detail}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # the app's HTTPException handler answers 413
            return message

        await self.app(scope, counted, send)
