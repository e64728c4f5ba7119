"""The client's side of the HTTP service: request a selection, fetch the expert bundle over HTTP.

`request_selection` uploads the K scores (scores.json, validated here first) and a budget to
`nds serve`, then downloads the manifest files into a folder laid out as `nds select` writes
it (manifest.parquet, manifest.csv, summary.json, urls.csv when presigned), verified against
the checksums in summary.json, so `nds client download --manifest DIR` works next. Every
attempt carries the same request id: a retry after a dropped connection, a restarted server
or a 429/503 answer gets the selection the first attempt made, never a second one.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from nds._io import atomic_dir
from nds.errors import InvalidInputError, NDSError, NotFoundError, StorageError
from nds.formats.bundle import BUNDLE_FILE, expert_files, parse_bundle
from nds.formats.manifest import CSV_NAME, PARQUET_NAME, SUMMARY_NAME, URLS_NAME, load_manifest
from nds.formats.scores import load_scores

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 502, 503, 504)
CONNECT_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 30.0


def _client(timeout_s: float, cacert: str | None):
    import ssl

    import httpx

    verify: ssl.SSLContext | bool = True
    if cacert:
        if not Path(cacert).is_file():
            raise InvalidInputError(f"--cacert {cacert} does not exist: give the PEM file of the CA that signed the server")
        verify = ssl.create_default_context(cafile=cacert)
    return httpx.Client(timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S), verify=verify,
                        follow_redirects=True)


def _detail(response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return str(detail or response.text[:200] or response.reason_phrase).splitlines()[0]


def _fail(response, server: str) -> NDSError:
    detail = _detail(response)
    if response.status_code == 401:
        return InvalidInputError(f"{server} refused the token ({detail}): check --token / NDS_TOKEN")
    if response.status_code == 404:
        return NotFoundError(f"{server}: {detail}")
    if response.status_code < 500:
        return InvalidInputError(f"{server} refused the request (HTTP {response.status_code}): {detail}")
    return StorageError(f"{server} failed (HTTP {response.status_code}): {detail}")


def _with_retries(send, *, server: str, retries: int, request_id: str | None = None):
    """send() until an answer that is not a transient failure; bounded, honours Retry-After."""
    import httpx

    last = ""
    for attempt in range(retries + 1):
        try:
            response = send()
        except httpx.TransportError as exc:  # refused, reset, timed out: the server may have restarted
            if "CERTIFICATE" in str(exc) or "SSL" in str(exc):  # retrying cannot fix trust
                raise StorageError(f"{server}: TLS failed ({exc}): give --cacert with the CA that signed the "
                                   "server's certificate (SSL_CERT_FILE for fetch-experts)") from exc
            last = f"{type(exc).__name__}: {exc}"
            wait = min(MAX_BACKOFF_S, 0.5 * 2**attempt)
        else:
            if response.status_code not in RETRY_STATUS:
                return response
            last = f"HTTP {response.status_code}: {_detail(response)}"
            header = response.headers.get("Retry-After", "")
            wait = min(MAX_BACKOFF_S, float(header) if header.isdigit() else 0.5 * 2**attempt)
        if attempt < retries:
            log.info("%s: %s; retrying in %.1fs (attempt %d of %d)", server, last, wait, attempt + 2, retries + 1)
            time.sleep(wait)
    again = f" with --request-id {request_id}" if request_id else ""
    raise StorageError(f"{server} did not answer after {retries + 1} attempts ({last}): try again later{again}")


def request_selection(server: str, token: str, scores_path: Path, out_dir: Path, *, budget: float,
                      temperature: float | None = None, seed: int = 0, datasets: list[str] | None = None,
                      exclude: list[str] | None = None, fill: float = 0.0, request_id: str | None = None,
                      retries: int = 5,
                      timeout_s: float = 300.0, cacert: str | None = None) -> dict:
    """Ask `server` for a selection and write its manifest folder to `out_dir`; returns summary.json.

    out_dir must not exist or be empty; it appears only complete and verified. request_id:
    default a new random one (reuse it to retry a request that failed).
    """
    if not token:
        raise InvalidInputError("no token: pass --token or set NDS_TOKEN (the server's operator runs `nds tokens create NAME`)")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidInputError(f"{out_dir} already exists and is not empty: choose a new folder or delete it")
    scores = load_scores(Path(scores_path))
    server = server.rstrip("/")
    if not server.startswith(("http://", "https://")):
        raise InvalidInputError(f"--server {server!r} is not an http(s):// URL (e.g. http://127.0.0.1:8600)")
    request_id = request_id or f"req-{uuid.uuid4().hex}"
    body = {"scores": scores, "budget": budget, "seed": seed, "exclude": list(exclude or []),
            "request_id": request_id, "include_rows": False}
    if temperature is not None:
        body["temperature"] = temperature
    if fill:
        body["fill"] = fill  # reserve rows for dead links (nds client download fills from them)
    if datasets:
        body["datasets"] = list(datasets)
    headers = {"Authorization": f"Bearer {token}"}
    t0 = time.perf_counter()
    with _client(timeout_s, cacert) as http:
        response = _with_retries(lambda: http.post(f"{server}/v1/selections", json=body, headers=headers),
                                 server=server, retries=retries, request_id=request_id)
        if response.status_code != 200:
            raise _fail(response, server)
        answer = response.json()
        links = answer["links"]
        with atomic_dir(out_dir) as tmp:
            for key, name in (("parquet", PARQUET_NAME), ("csv", CSV_NAME), ("summary", SUMMARY_NAME), ("urls", URLS_NAME)):
                if key not in links:
                    continue
                got = _with_retries(lambda: http.get(f"{server}{links[key]}", headers=headers), server=server,
                                    retries=retries, request_id=request_id)
                if got.status_code != 200:
                    raise _fail(got, server)
                (tmp / name).write_bytes(got.content)
            load_manifest(tmp)  # checksums against summary.json: a damaged transfer is refused
    summary = answer["summary"]
    log.debug("selection %s: %d rows from %s in %.2fs -> %s", summary["selection_id"], summary["rows"], server,
             time.perf_counter() - t0, out_dir)
    return {**summary, "request_id": request_id, "replayed": response.headers.get("Idempotent-Replayed") == "true"}


def fetch_bundle_http(url: str, dest: Path, *, timeout_s: float = 300.0, cacert: str | None = None) -> int:
    """Download bundle.json and its expert files from `url` (`<server>/v1/bundle`, or any HTTP folder
    holding a bundle) into `dest`; returns the bytes fetched. The caller verifies the checksums."""
    import httpx

    base = url.rstrip("/")
    if base.endswith("/" + BUNDLE_FILE):
        base = base[: -len(BUNDLE_FILE) - 1]
    total = 0
    with _client(timeout_s, cacert) as http:

        def get(name: str, target: Path) -> int:
            try:
                response = _with_retries(lambda: http.get(f"{base}/{name}"), server=base, retries=3)
            except StorageError as exc:
                raise StorageError(f"cannot fetch {base}/{name}: {exc}; check the URL and that the server runs") from exc
            if response.status_code == 404:
                raise NotFoundError(f"{base}/{name} not found: give the bundle URL (e.g. http://HOST:8600/v1/bundle)")
            if response.status_code != 200:
                raise _fail(response, base)
            target.write_bytes(response.content)
            return len(response.content)

        try:
            total += get(BUNDLE_FILE, dest / BUNDLE_FILE)
        except httpx.InvalidURL as exc:
            raise InvalidInputError(f"{url} is not a valid URL ({exc})") from exc
        bundle = parse_bundle((dest / BUNDLE_FILE).read_bytes(), f"{base}/{BUNDLE_FILE}")
        for name in expert_files(bundle, f"{base}/{BUNDLE_FILE}"):
            total += get(name, dest / name)
    return total
