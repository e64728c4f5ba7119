"""An HTTP server on 127.0.0.1 that serves scripted answers per path (and fails some on purpose).

Test modules import it (`from linkserver import LinkServer, link_server`; tests/client adds
tests/corpus to sys.path). Each path has a list of answers given in turn, the last one repeating:
``server.add("/a.png", (500, b""), (200, data))`` fails once, then serves `data`.
GET, HEAD, POST and PATCH take the same answers (a request's body is read and dropped).
An answer is ``(status, body)`` or ``(status, body, delay_s)``; status ``"cut"`` announces the
body's length but closes the connection after half of it (a truncated transfer).
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest


class LinkServer:
    def __init__(self):
        self.routes: dict[str, list[tuple]] = {}
        self.hits: Counter = Counter()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True  # a deliberately slow answer must not hold up shutdown
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, path: str, *answers: tuple) -> str:
        """Script `path`'s answers; returns its URL."""
        with self._lock:
            self.routes[path] = [a if len(a) == 3 else (*a, 0.0) for a in answers]
            self.hits.pop(path, None)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def _next(self, path: str) -> tuple | None:
        with self._lock:
            answers = self.routes.get(path)
            self.hits[path] += 1
            if not answers:
                return None
            return answers[min(self.hits[path], len(answers)) - 1]

    def __enter__(self) -> "LinkServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler(server: LinkServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

        def log_message(self, *args):  # one line per request otherwise
            pass

        def _answer(self, with_body: bool) -> None:
            import time

            answer = server._next(urlsplit(self.path).path)
            status, body, delay = answer if answer else (404, b"no such object", 0.0)
            if delay:
                time.sleep(delay)
            code = 200 if status == "cut" else status
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            if code == 200:
                self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
            self.end_headers()
            if not with_body:
                return
            if status == "cut":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_GET(self):
            self._answer(True)

        def do_HEAD(self):
            self._answer(False)

        def _answer_request_with_body(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(True)

        do_POST = do_PATCH = _answer_request_with_body

    return Handler


@pytest.fixture
def link_server():
    with LinkServer() as server:
        yield server
