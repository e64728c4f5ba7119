"""The HTTP API of the online phase: index facts, the expert bundle, selections per client.

    GET  /v1/index                         current index version, K, scorer modes, bundle checksum and link
    GET  /v1/bundle[/bundle.json|/<file>]  the expert bundle of that version (`nds client fetch-experts URL`)
    POST /v1/selections                    scores + budget -> a selection (Bearer token), synchronously
    GET  /v1/selections                    the caller's selections
    GET  /v1/selections/{id}[/<file>]      one of them: summary, manifest.parquet|csv|json, summary.json, urls.csv
    GET  /v1/health, /docs                 liveness; OpenAPI docs

Every selection goes through nds.select.service.run_selection (origin "service", requester =
the token's name): the same validation, manifest and audit row as `nds select`. A client sees
only its own selections (404 for any other id). A `request_id` makes retries idempotent: the
id promised to the first attempt is reused, and a finished selection is answered again, not
drawn twice. Errors are JSON `{"detail": "<one line>"}`; a 5xx never carries a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import anyio
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nds._registry import SCORERS
from nds.config import Workspace
from nds.errors import InvalidInputError, NDSError, NotFoundError, StorageError
from nds.formats import manifest
from nds.formats.bundle import default_mode
from nds.select.request import DEFAULT_TEMPERATURE, SelectRequest
from nds.select.service import manifests_root, new_selection_id, run_selection, selections_dir
from nds.serve.holder import IndexHolder, IndexInTransition, LoadedIndex
from nds.serve.limits import BodySizeLimit, RateLimiter
from nds.serve.state import SelectionBook, default_state_dir
from nds.serve.tokens import Client, TokenStore

log = logging.getLogger(__name__)

FILES = {"manifest.parquet": manifest.PARQUET_NAME, "manifest.csv": manifest.CSV_NAME,
         "summary.json": manifest.SUMMARY_NAME, "urls.csv": manifest.URLS_NAME}
MEDIA = {".parquet": "application/vnd.apache.parquet", ".csv": "text/csv", ".json": "application/json"}


@dataclass
class ServeConfig:
    """Limits and places of one service (the `nds serve` options)."""

    state_dir: Path | None = None  # default: serve/ beside the warehouse
    rate_limit: float = 5.0  # selections per second per token (0: no limit)
    burst: int | None = None  # default: 4 x rate_limit, at least 1
    max_request_bytes: int = 4 * 2**20
    max_inline_rows: int = 100_000  # manifest rows in the POST answer; larger: fetch the files
    threads: int = 2  # selections computed at once per process (more only thrash the GIL on 2 cores)
    poll_s: float = 2.0  # how often to look for a new index version (0: never)


class SelectionBody(BaseModel):
    """One selection: the client's scores.json and what to select."""

    model_config = ConfigDict(extra="forbid")

    scores: dict = Field(..., description="The content of the client's scores.json (`nds client score`).")
    budget: float = Field(..., gt=0, allow_inf_nan=False,
                          description="Samples to select: a whole count (e.g. 2000) or a fraction of the eligible samples below 1 (e.g. 0.05).")
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0, allow_inf_nan=False,
                               description="Softmax temperature over the expert scores; lower = more concentrated.")
    seed: int = Field(0, ge=0, description="Same scores, budget, temperature and seed -> the same manifest.")
    fill: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                        description="Reserve rows for dead links, as a share of the budget: ceil(budget x (1 + fill)) rows "
                        "in rank order; the first `budget` are the selection without reserve.")
    datasets: list[str] | None = Field(None, description="Only select from these source datasets (GET /v1/index lists them).")
    exclude: list[str] = Field(default_factory=list, description="sample_ids or sha256 content hashes to leave out.")
    request_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[!-~]+$",
                                   description="Any string unique per intended selection: a retry with the same id and "
                                   "the same body returns the same selection instead of drawing again.")
    include_rows: bool = Field(True, description="Put the manifest rows in the answer (up to the server's limit).")

    def fingerprint(self) -> str:
        # fill 0 is left out: a request id promised before `fill` existed keeps its fingerprint
        doc = self.model_dump(exclude={"request_id", "include_rows"} | ({"fill"} if not self.fill else set()))
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg'].removeprefix('Value error, ')}{more}"


def _encode(payload) -> bytes:
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def _json(payload, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_encode(payload), status_code=status, media_type="application/json", headers=headers)


class _InternalErrors:
    """Anything unexpected becomes a JSON 500 with a reference; the traceback goes to the log only."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - the boundary to the network
            ref = secrets.token_hex(6)
            log.exception("internal error %s on %s %s", ref, scope.get("method"), scope.get("path"))
            if started:
                return
            body = orjson.dumps({"detail": f"internal server error (reference {ref}); the operator's log has the details"})
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


class Service:
    """What the routes share: the workspace, the index in service, tokens, limits, the selection book."""

    def __init__(self, ws: Workspace, config: ServeConfig, *, on_selection: Callable[[dict], None] | None = None,
                 holder: IndexHolder | None = None):
        self.ws = ws
        self.config = config
        self.state_dir = default_state_dir(ws, config.state_dir)
        self.tokens = TokenStore(self.state_dir)
        self.book = SelectionBook(self.state_dir)
        self.holder = holder or IndexHolder(ws, self.state_dir, poll_s=config.poll_s)
        burst = config.burst if config.burst is not None else max(1, int(4 * config.rate_limit))
        self.rates = RateLimiter(config.rate_limit, burst)
        self.on_selection = on_selection
        self.threads: anyio.CapacityLimiter | None = None

    # ------------------------------------------------------------- selections

    def select(self, client: Client, body: SelectionBody) -> tuple[dict, bool]:
        """(summary, replayed): run the selection, or answer a retried request id again."""
        loaded = self.holder.current()
        wanted = body.scores.get("index_version")
        if wanted not in (None, loaded.version):  # a new version may have been published just now
            loaded = self.holder.refresh(wait=False) or loaded
            if wanted != loaded.version and self.holder.loading:
                raise IndexInTransition(f"a new index is being loaded (now serving {loaded.version}): "
                                        "retry in a few seconds")
        try:
            request = SelectRequest(scores=body.scores, budget=body.budget, temperature=body.temperature,
                                    seed=body.seed, datasets=body.datasets, exclude=body.exclude, fill=body.fill)
        except ValidationError as exc:
            raise InvalidInputError(one_line(exc)) from None
        if body.request_id is None:
            return self._run(client, request, new_selection_id(), loaded), False
        fingerprint = body.fingerprint()
        with self.book.request_lock(client.id, body.request_id):
            promised = self.book.find_request(client.id, body.request_id)
            if promised is None:
                selection_id = new_selection_id()
                self.book.promise(client.id, body.request_id, selection_id, fingerprint)
            else:
                if promised["fingerprint"] != fingerprint:
                    raise HTTPException(409, f"request_id {body.request_id!r} was used for a different request: "
                                             "use a new request_id for new parameters")
                selection_id = promised["selection_id"]
                done = self._finished(selection_id)
                if done is not None:
                    if not self.book.owns(client.id, selection_id):  # cut between its audit row and this record
                        self.book.record(client.id, client.name, done)
                    return done, True
                # An attempt that died before its audit row: its manifest was never handed out.
                shutil.rmtree(manifests_root(self.ws) / selection_id, ignore_errors=True)
            return self._run(client, request, selection_id, loaded), False

    def _run(self, client: Client, request: SelectRequest, selection_id: str, loaded: LoadedIndex) -> dict:
        summary = run_selection(self.ws, request, selection_id=selection_id, origin="service",
                                requester=client.name, index=loaded.index, defer_parquet=True)
        self.book.record(client.id, client.name, summary)
        log.info("selection %s for %s: %d rows of index %s in %.3fs", selection_id, client.name, summary["rows"],
                 summary["index_version"], summary.get("seconds", 0.0))
        if self.on_selection is not None:
            event = {"selection_id": selection_id, "requester": client.name, "index_version": summary["index_version"],
                     "rows": summary["rows"], "budget": summary.get("budget"), "mode": summary.get("mode"),
                     "counts_per_dataset": summary["counts_per_dataset"], "manifest_sha256": summary["manifest_sha256"],
                     "manifest_location": summary.get("manifest_location"), "seconds": summary.get("seconds")}
            try:
                self.on_selection(event)
            except Exception as exc:  # noqa: BLE001 - best effort: never fails the request
                log.warning("on_selection hook failed for %s: %s: %s", selection_id, type(exc).__name__, exc)
        return self._summary(selection_id)

    def _finished(self, selection_id: str) -> dict | None:
        """The summary of a selection whose audit row exists, else None."""
        if not (selections_dir(self.ws) / f"{selection_id}.parquet").is_file():
            return None
        try:
            return self._summary(selection_id)
        except NotFoundError:
            return None

    def folder(self, selection_id: str) -> Path:
        return manifests_root(self.ws) / selection_id

    def _summary(self, selection_id: str) -> dict:
        path = self.folder(selection_id) / manifest.SUMMARY_NAME
        if not path.is_file():
            raise NotFoundError(f"selection {selection_id} has no manifest on this server")
        return orjson.loads(path.read_bytes())

    def answer(self, summary: dict, *, rows: bool) -> dict:
        sid = summary["selection_id"]
        base = f"/v1/selections/{sid}"
        has_urls = (self.folder(sid) / manifest.URLS_NAME).is_file()
        links = {"self": base, "parquet": f"{base}/manifest.parquet", "csv": f"{base}/manifest.csv",
                 "json": f"{base}/manifest.json", "summary": f"{base}/summary.json",
                 **({"urls": f"{base}/urls.csv"} if has_urls else {})}
        out = {"selection_id": sid, "index_version": summary.get("index_version"), "rows": summary.get("rows"),
               "budget": summary.get("budget"), "reserve": summary.get("reserve", 0), "n_eligible": summary.get("n_eligible"),
               "counts_per_dataset": summary.get("counts_per_dataset"), "manifest_sha256": summary.get("manifest_sha256"),
               "summary": summary, "links": links}
        if rows:
            if summary.get("rows", 0) > self.config.max_inline_rows:
                out["manifest"] = None
                out["manifest_note"] = (f"{summary['rows']} rows exceed the {self.config.max_inline_rows} this server "
                                        f"puts in an answer: GET {links['parquet']}")
            else:
                out["manifest"] = self.rows(sid)
        return out

    def rows(self, selection_id: str) -> list[dict]:
        folder = self.folder(selection_id)
        try:
            table = manifest.read_table(folder)
        except NotFoundError:
            raise NotFoundError(f"selection {selection_id} has no manifest on this server") from None
        urls = folder / manifest.URLS_NAME
        if urls.is_file():
            extra = pacsv.read_csv(urls, convert_options=pacsv.ConvertOptions(column_types={"sample_id": "string", "url": "string"}))
            by_id = dict(zip(extra.column("sample_id").to_pylist(), extra.column("url").to_pylist()))
            table = table.append_column("url", pa.array([by_id.get(i) for i in table.column("sample_id").to_pylist()],
                                                        pa.string()))
        return manifest.json_rows(table)


def _status_of(exc: NDSError) -> tuple[int, dict]:
    """HTTP status (and headers) for an NDS error raised while answering a request."""
    if isinstance(exc, (StorageError, IndexInTransition)):
        return 503, {"Retry-After": "5"}
    if isinstance(exc, (InvalidInputError, NotFoundError)):
        return 400, {}
    return 503, {"Retry-After": "30"}


def create_app(ws: Workspace, config: ServeConfig | None = None, *,
               on_selection: Callable[[dict], None] | None = None) -> FastAPI:
    """The API over `ws`: loads the current index now (an NDSError if there is none)."""
    config = config or ServeConfig()
    svc = Service(ws, config, on_selection=on_selection)
    svc.holder.start()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.threads = anyio.CapacityLimiter(max(1, config.threads))
        yield
        svc.holder.stop()

    app = FastAPI(title="Neural Data Server", version="1",
                  description="Select source data for transfer learning from K expert scores. "
                              "POST /v1/selections with a Bearer token (`nds tokens create NAME` on the server).",
                  lifespan=lifespan)
    app.state.service = svc
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(_InternalErrors)
    bearer = HTTPBearer(auto_error=False, description="A token from `nds tokens create NAME`")

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return JSONResponse({"detail": f"{where}: {first['msg']}{more}"}, status_code=422)

    @app.exception_handler(NDSError)
    async def _nds_error(request: Request, exc: NDSError):
        status, headers = _status_of(exc)
        return JSONResponse({"detail": str(exc).splitlines()[0]}, status_code=status, headers=headers)

    async def client_of(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Client:
        # async: a stat and a hash, cheaper on the event loop than a hop to the thread pool
        client = svc.tokens.authenticate(credentials.credentials if credentials else None)
        if client is None:
            raise HTTPException(401, "missing, unknown or revoked token: send `Authorization: Bearer <token>` "
                                     "(the server's operator creates one with `nds tokens create NAME`)",
                                headers={"WWW-Authenticate": "Bearer"})
        return client

    @app.get("/v1/health", summary="Liveness and the index version in service")
    def health():
        return {"status": "ok", "index_version": svc.holder.current().version}

    @app.get("/v1/index", summary="The index in service: version, K, scorer modes, bundle checksum and link")
    def index_info():
        loaded = svc.holder.current()
        return {"index_version": loaded.version, "k": loaded.index.k, "n_samples": loaded.index.catalog.num_rows,
                "datasets": loaded.datasets, "scorer_modes": SCORERS.names(), "default_mode": default_mode(loaded.bundle),
                "default_temperature": DEFAULT_TEMPERATURE, "bundle_sha256": loaded.index.bundle_sha256,
                "bundle_url": "/v1/bundle", "fetch": "nds client fetch-experts <server>/v1/bundle --out DIR"}

    @app.get("/v1/bundle", summary="bundle.json of the index in service (its files: /v1/bundle/<file>)")
    @app.get("/v1/bundle/bundle.json", include_in_schema=False)
    def bundle_json():
        return svc.holder.current().bundle

    @app.get("/v1/bundle/{name}", summary="One file of the expert bundle")
    def bundle_file(name: str):
        loaded = svc.holder.current()
        if name not in {e["file"] for e in loaded.bundle["experts"]}:
            raise HTTPException(404, f"{name!r} is not a file of bundle {loaded.version}: GET /v1/bundle lists them")
        return FileResponse(loaded.bundle_dir / name, media_type="application/octet-stream",
                            headers={"Cache-Control": "public, max-age=86400"})

    @app.post("/v1/selections", summary="Select source samples for the caller's scores (synchronous)")
    async def create_selection(body: SelectionBody, client: Client = Depends(client_of)):
        wait = svc.rates.acquire(client.id)
        if wait > 0:
            raise HTTPException(429, f"rate limit of {config.rate_limit:g} selections/s for this token: retry in "
                                     f"{wait:.1f}s", headers={"Retry-After": str(max(1, round(wait + 0.5)))})
        def work() -> tuple[bytes, bool]:  # one hop to a worker thread: draw, write, record, encode
            summary, replayed = svc.select(client, body)
            return _encode(svc.answer(summary, rows=body.include_rows)), replayed

        content, replayed = await anyio.to_thread.run_sync(work, limiter=svc.threads)
        return Response(content, media_type="application/json",
                        headers={"Idempotent-Replayed": "true"} if replayed else None)

    @app.get("/v1/selections", summary="The caller's selections, oldest first")
    def list_selections(client: Client = Depends(client_of)):
        return {"selections": svc.book.list(client.id)}

    def owned(selection_id: str, client: Client) -> dict:
        """The summary of one of the caller's selections; 404 for any other id (or a deleted manifest)."""
        try:
            if svc.book.owns(client.id, selection_id):
                return svc._summary(selection_id)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        raise HTTPException(404, f"no selection {selection_id!r} for this token")

    @app.get("/v1/selections/{selection_id}", summary="One of the caller's selections: summary and links")
    def get_selection(selection_id: str, client: Client = Depends(client_of)):
        return _json(svc.answer(owned(selection_id, client), rows=False))

    @app.get("/v1/selections/{selection_id}/{name}",
             summary="A file of the selection: manifest.parquet, manifest.csv, manifest.json, summary.json, urls.csv")
    def get_selection_file(selection_id: str, name: str, client: Client = Depends(client_of)):
        owned(selection_id, client)
        if name == "manifest.json":
            try:
                return _json(svc.rows(selection_id))
            except NotFoundError as exc:
                raise HTTPException(404, str(exc)) from None
        path = svc.folder(selection_id) / FILES.get(name, "-")
        if name == "manifest.parquet" and not path.is_file():
            try:  # deferred when the selection was made (manifest.write_parquet_form): made once, here
                manifest.write_parquet_form(path.parent)
            except NotFoundError:
                pass
        if name not in FILES or not path.is_file():
            raise HTTPException(404, f"selection {selection_id} has no file {name!r}: "
                                     f"choose one of manifest.parquet, manifest.csv, manifest.json, summary.json")
        return FileResponse(path, media_type=MEDIA[path.suffix])

    return app
