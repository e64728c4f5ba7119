"""The HTTP service: `nds serve`, `nds tokens create|revoke|list` and the client's `nds client request`."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

from nds.config import Workspace
from nds.errors import InvalidInputError

log = logging.getLogger(__name__)

TOKEN_ENV = "NDS_TOKEN"


def _state(args) -> Path:
    from nds.serve.state import default_state_dir

    return default_state_dir(Workspace.from_env(args.root), getattr(args, "state", None))


def _cmd_serve(args) -> int:
    from nds.serve.app import ServeConfig

    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise InvalidInputError("give both --ssl-keyfile and --ssl-certfile for TLS (or neither)")
    for flag, path in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile)):
        if path and not Path(path).is_file():
            raise InvalidInputError(f"{flag} {path} does not exist: give the PEM file")
    if not (1 <= args.port <= 65535):
        raise InvalidInputError(f"--port {args.port} is out of range: use 1-65535 (default 8600)")
    if not args.ssl_certfile and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without TLS: tokens cross the network in clear; "
              "give --ssl-keyfile/--ssl-certfile or put a TLS proxy in front", file=sys.stderr)
    if not args.verbose:  # one line per selection (nds.serve.app), not one per step
        for name in ("nds.select", "nds.formats"):
            logging.getLogger(name).setLevel(logging.WARNING)
    config = ServeConfig(state_dir=args.state, rate_limit=args.rate_limit, burst=args.burst,
                         max_request_bytes=args.max_request_kb * 1024, max_inline_rows=args.max_inline_rows,
                         threads=args.threads, poll_s=args.poll)
    from flows.serve import serve

    scheme = "https" if args.ssl_certfile else "http"
    banner = (f"serving {Workspace.from_env(args.root).root} at {scheme}://{args.host}:{args.port} "
              f"(API docs: {scheme}://{args.host}:{args.port}/docs); Ctrl-C stops")
    serve(args.root, config, host=args.host, port=args.port, workers=args.workers, ssl_keyfile=args.ssl_keyfile,
          ssl_certfile=args.ssl_certfile, ssl_keyfile_password=os.environ.get("NDS_SSL_KEYFILE_PASSWORD"),
          access_log=not args.no_access_log, banner=banner)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_tokens_create(args) -> int:
    from nds.serve.tokens import TokenStore

    token = TokenStore(_state(args)).create(args.name)
    print(f"token for {args.name} (shown once; the server keeps only its sha256 in {_state(args)}):", file=sys.stderr)
    print(token)
    return 0


def _cmd_tokens_revoke(args) -> int:
    from nds.serve.tokens import TokenStore

    TokenStore(_state(args)).revoke(args.name)
    print(f"revoked the token of {args.name}: a running server refuses it from its next request")
    return 0


def _cmd_tokens_list(args) -> int:
    from nds.serve.tokens import TokenStore

    rows = TokenStore(_state(args)).list()
    for row in rows:
        print(f"{row['name']:24s} created {row['created_at']}")
    if not rows:
        print("no tokens: `nds tokens create NAME`")
    return 0


def _cmd_client_request(args) -> int:
    from nds.client.request import request_selection

    exclude = []
    if args.exclude_file:
        path = Path(args.exclude_file)
        if not path.is_file():
            raise InvalidInputError(f"--exclude-file {path} does not exist: give a text file of sample_ids / sha256, one per line")
        exclude = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    summary = request_selection(
        args.server, args.token or os.environ.get(TOKEN_ENV, ""), Path(args.scores), Path(args.out),
        budget=args.budget, temperature=args.temperature, seed=args.seed, datasets=args.dataset, exclude=exclude,
        fill=args.fill, request_id=args.request_id, retries=args.retries, timeout_s=args.timeout, cacert=args.cacert,
    )
    again = " (answered again: this request id was already served)" if summary["replayed"] else ""
    print(f"selection {summary['selection_id']}: {summary['rows']} of {summary['n_eligible']} eligible samples{again}")
    for ds, n in sorted(summary["counts_per_dataset"].items(), key=lambda kv: -kv[1]):
        print(f"  {ds:10s} {n:6d}  {n / summary['rows']:.1%}")
    print(f"manifest {args.out} (sha256 {summary['manifest_sha256']}); next: nds client download --manifest {args.out} --out DIR")
    return 0


def add_client_request(csub) -> None:
    """`nds client request`, added to the `client` group (flows/cli/client.py calls this)."""
    req = csub.add_parser("request", help="upload your scores to `nds serve` and download the selection's manifest")
    req.add_argument("--server", required=True, help="the service URL, e.g. http://HOST:8600")
    req.add_argument("--token", help=f"your API token (default: ${TOKEN_ENV}; the environment keeps it out of `ps`)")
    req.add_argument("--scores", required=True, help="scores.json from `nds client score`")
    req.add_argument("--budget", required=True, type=float, help="count (e.g. 2000) or fraction (e.g. 0.05)")
    req.add_argument("--temperature", type=float, help="softmax temperature (default: the server's, 0.02)")
    req.add_argument("--seed", type=int, default=0)
    req.add_argument("--fill", type=float, default=0.0,
                     help="also draw this fraction of the budget as reserve rows (same law, ranked after the budget): "
                     "`nds client download` replaces dead links from them (default 0)")
    req.add_argument("--dataset", action="append", help="only this source dataset (repeatable)")
    req.add_argument("--exclude-file", help="file of sample_ids / sha256 hashes to leave out, one per line")
    req.add_argument("--request-id", help="reuse the id a failed attempt printed, to get its selection (default: new)")
    req.add_argument("--retries", type=int, default=5, help="attempts after a dropped connection or 429/503 (default 5)")
    req.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer (default 300)")
    req.add_argument("--cacert", help="CA bundle (PEM) to verify a server with a private certificate")
    req.add_argument("--out", required=True, help="folder for manifest.parquet/.csv and summary.json")
    req.set_defaults(func=_cmd_client_request)


def add_commands(sub) -> None:
    srv = sub.add_parser("serve", help="serve clients over HTTP: index, expert bundle, selections per token")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8600, help="port (default %(default)s)")
    srv.add_argument("--workers", type=int, default=1, help="server processes (default 1); they share the index pages")
    srv.add_argument("--threads", type=int, default=2, help="selections computed at once per process (default %(default)s)")
    srv.add_argument("--rate-limit", type=float, default=5.0,
                     help="selections per second per token, on average (default %(default)s; 0: no limit)")
    srv.add_argument("--burst", type=int, help="selections a token may make at once (default: 4 x --rate-limit)")
    srv.add_argument("--max-request-kb", type=int, default=4096, help="largest request body (default %(default)s KiB)")
    srv.add_argument("--max-inline-rows", type=int, default=100_000,
                     help="manifest rows put in a selection's answer (default %(default)s; larger: fetch the files)")
    srv.add_argument("--poll", type=float, default=2.0, help="seconds between checks for a new index version (0: never)")
    srv.add_argument("--state", help="service state folder: tokens, ownership (default: serve/ beside the warehouse)")
    srv.add_argument("--ssl-keyfile", help="TLS private key (PEM); its password, if any, from $NDS_SSL_KEYFILE_PASSWORD")
    srv.add_argument("--ssl-certfile", help="TLS certificate chain (PEM)")
    srv.add_argument("--no-access-log", action="store_true", help="no line per HTTP request")
    srv.set_defaults(func=_cmd_serve)

    tok = sub.add_parser("tokens", help="API tokens of `nds serve`: create, revoke, list")
    tsub = tok.add_subparsers(dest="tokens_command", required=True)
    create = tsub.add_parser("create", help="a new token for a client; printed once, on the last line")
    create.add_argument("name", help="client name (letters, digits, . _ -); it appears in the audit rows")
    create.set_defaults(func=_cmd_tokens_create)
    revoke = tsub.add_parser("revoke", help="refuse a client's token from now on")
    revoke.add_argument("name")
    revoke.set_defaults(func=_cmd_tokens_revoke)
    lst = tsub.add_parser("list", help="token names and when they were made (never the tokens)")
    lst.set_defaults(func=_cmd_tokens_list)
    for p in (create, revoke, lst):
        p.add_argument("--state", help="service state folder (default: serve/ beside the warehouse)")
