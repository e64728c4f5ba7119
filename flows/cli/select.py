"""The server's online phase: `nds select` turns a client's scores into a manifest.

Every input is checked before any work starts. Without a configured Prefect API the
selection runs here, directly (`nds.select.service.run_selection`: the same manifest bytes
and audit row as the `select` flow, and no temporary Prefect server); with PREFECT_API_URL
set it runs as the `select` flow on that server, so operators see it there.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

from nds.config import Workspace
from nds.errors import InvalidInputError, NDSError, NotFoundError


def _request(args):
    from pydantic import ValidationError

    from nds.select.request import SelectRequest

    exclude = []
    if args.exclude_file:
        path = Path(args.exclude_file)
        if not path.is_file():
            raise NDSError(f"--exclude-file {path} does not exist: give a text file of sample_ids / sha256, one per line")
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            raise InvalidInputError(f"--exclude-file {path} is not UTF-8 text: give a text file of sample_ids / "
                                    "sha256, one per line") from None
        exclude = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    try:
        return SelectRequest(
            scores_path=str(args.scores), budget=args.budget, temperature=args.temperature, seed=args.seed,
            datasets=args.dataset, exclude=exclude, method=args.method, presign_expiry_s=args.presign, fill=args.fill,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise NDSError(f"--{'.'.join(map(str, first['loc'])) or 'scores'}: {first['msg']}") from None


def _check_out(out: Path, overwrite: bool) -> bool:
    """Refuse an --out that is a file, or holds something, unless --overwrite names a selection.

    Returns True when an earlier selection is there to be replaced.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise InvalidInputError(f"--out {out} exists and is not a folder: choose another output folder")
    if not any(out.iterdir()):
        return False
    if not overwrite:
        raise InvalidInputError(f"--out {out} already holds a selection: choose a new output folder, "
                                "or pass --overwrite to replace it")
    if not (out / "summary.json").is_file():
        raise InvalidInputError(f"--out {out} is not empty and holds no selection (no summary.json): --overwrite "
                                "only replaces an earlier selection; choose another output folder")
    return True


def _check_scores(ws: Workspace, scores_path: str) -> None:
    """The scores file and the index it was made for, checked cheaply (bundle.json only)."""
    from types import SimpleNamespace

    from nds.formats.bundle import load_bundle
    from nds.formats.scores import load_scores
    from nds.select.service import check_scores

    scores = load_scores(Path(scores_path))
    bundle = load_bundle(ws.stage_dir("experts"), verify=False)
    check_scores(scores, SimpleNamespace(version=bundle["index_version"], bundle_sha256=bundle["bundle_sha256"],
                                         k=int(bundle["k"])))


def _run(ws: Workspace, request, out: Path) -> dict:
    from flows.cli._prefect import reachable_prefect_api

    if reachable_prefect_api() is None:
        from nds.select.service import run_selection

        return run_selection(ws, request, out_dir=out)
    _check_scores(ws, request.scores_path)  # before the flow run: a bad input is one line, not a failed run
    from flows.cli._prefect import run_flow
    from flows.select import select

    return run_flow(select, request, str(ws.root), str(out))


def _cmd_select(args) -> int:
    request = _request(args)
    out = Path(args.out).resolve()
    replace = _check_out(out, args.overwrite)
    ws = Workspace.from_env(args.root)
    if not (ws.stage_dir("experts") / "bundle.json").is_file():
        raise NotFoundError(f"no index in workspace {ws.root} (no artifacts/experts/bundle.json): build it with "
                            "`nds index`, or pass --root (or set NDS_ROOT) to the server's workspace")
    # The earlier selection waits beside --out until the new one is complete, and comes back if it fails.
    aside = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}") if replace else None
    if aside is not None:
        out.rename(aside)
    try:
        summary = _run(ws, request, out)
    except BaseException:
        if aside is not None:
            shutil.rmtree(out, ignore_errors=True)
            aside.rename(out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    reserve = summary.get("reserve") or 0
    print(f"selection {summary['selection_id']}: {summary['rows']} of {summary['n_eligible']} eligible samples"
          + (f" ({summary['budget']} + {reserve} reserve rows, rank >= {summary['budget']})" if reserve else "")
          + (" (replaced the earlier selection in --out)" if replace else ""))
    for ds, n in sorted(summary["counts_per_dataset"].items(), key=lambda kv: -kv[1]):
        print(f"  {ds:10s} {n:6d}  {n / summary['rows']:.1%}")
    print(f"manifest {summary['manifest_location']} (sha256 {summary['manifest_sha256']})")
    if summary.get("presigned_urls"):
        info = summary["presigned_urls"]
        print(f"presigned URLs in {info['file']} beside the manifest, valid until {info['expires_at']}")
    return 0


def add_commands(sub) -> None:
    from nds._registry import SAMPLERS
    from nds.select.request import DEFAULT_TEMPERATURE

    sel = sub.add_parser("select", help="turn a client's scores.json into an export manifest (server side)",
                         description="Turn a client's scores.json into an export manifest. Runs here directly, or "
                                     "as the `select` flow on the Prefect server PREFECT_API_URL names.")
    sel.add_argument("--scores", required=True, help="scores.json from `nds client score`")
    sel.add_argument("--budget", required=True, type=float, help="count (e.g. 2000) or fraction (e.g. 0.1)")
    sel.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="softmax temperature (default %(default)s)")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--fill", type=float, default=0.0, metavar="F",
                     help="also select F x budget reserve rows after the budget's (0-1, default 0): replacements for "
                          "dead links, in rank order; the first rows are the selection without --fill")
    sel.add_argument("--dataset", action="append", help="only this source domain (repeatable)")
    sel.add_argument("--exclude-file", help="file of sample_ids / sha256 hashes to leave out, one per line")
    sel.add_argument("--method", default="auto", choices=["auto", *SAMPLERS.names()],
                     help="sampler, one law for all: auto (default: clustered, O(K+B), when the index has its "
                          "cluster layout, else es-keys), es-keys (O(N)), two-stage, clustered")
    sel.add_argument("--out", required=True, help="folder for manifest.parquet/.csv and summary.json")
    sel.add_argument("--overwrite", action="store_true",
                     help="replace the earlier selection in --out (only once the new one is complete; "
                          "the earlier one's audit row stays in the warehouse)")
    sel.add_argument("--presign", type=int, metavar="SECONDS",
                     help="also write urls.csv: presigned GET URLs of the selected corpus objects (corpus on an S3 DVC remote)")
    sel.set_defaults(func=_cmd_select)
