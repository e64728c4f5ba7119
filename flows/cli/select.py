"""The server's online phase: `nds select` turns a client's scores into a manifest."""

from __future__ import annotations

from pathlib import Path

from nds.config import Workspace
from nds.errors import NDSError


def _cmd_select(args) -> int:
    from pydantic import ValidationError

    from nds.select.service import SelectRequest

    exclude = []
    if args.exclude_file:
        path = Path(args.exclude_file)
        if not path.is_file():
            raise NDSError(f"--exclude-file {path} does not exist: give a text file of sample_ids / sha256, one per line")
        lines = path.read_text().splitlines()
        exclude = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    try:
        request = SelectRequest(
            scores_path=str(args.scores), budget=args.budget, temperature=args.temperature, seed=args.seed,
            datasets=args.dataset, exclude=exclude, method=args.method, presign_expiry_s=args.presign,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise NDSError(f"--{'.'.join(map(str, first['loc'])) or 'scores'}: {first['msg']}") from None
    from flows.select import select

    ws = Workspace.from_env(args.root)
    summary = select(request, str(ws.root), str(Path(args.out).resolve()))
    print(f"selection {summary['selection_id']}: {summary['rows']} of {summary['n_eligible']} eligible samples")
    for ds, n in sorted(summary["counts_per_dataset"].items(), key=lambda kv: -kv[1]):
        print(f"  {ds:10s} {n:6d}  {n / summary['rows']:.1%}")
    print(f"manifest {summary['manifest_location']} (sha256 {summary['manifest_sha256']})")
    if summary.get("presigned_urls"):
        info = summary["presigned_urls"]
        print(f"presigned URLs in {info['file']} beside the manifest, valid until {info['expires_at']}")
    return 0


def add_commands(sub) -> None:
    from nds._registry import SAMPLERS
    from nds.select.service import DEFAULT_TEMPERATURE

    sel = sub.add_parser("select", help="turn a client's scores.json into an export manifest")
    sel.add_argument("--scores", required=True, help="scores.json from `nds client score`")
    sel.add_argument("--budget", required=True, type=float, help="count (e.g. 2000) or fraction (e.g. 0.1)")
    sel.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="softmax temperature (default %(default)s)")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--dataset", action="append", help="only this source domain (repeatable)")
    sel.add_argument("--exclude-file", help="file of sample_ids / sha256 hashes to leave out, one per line")
    sel.add_argument("--method", default="auto", choices=["auto", *SAMPLERS.names()],
                     help="sampler, one law for all: auto (default: clustered, O(K+B), when the index has its "
                          "cluster layout, else es-keys), es-keys (O(N)), two-stage, clustered")
    sel.add_argument("--out", required=True, help="folder for manifest.parquet/.csv and summary.json")
    sel.add_argument("--presign", type=int, metavar="SECONDS",
                     help="also write urls.csv: presigned GET URLs of the selected corpus objects (corpus on an S3 DVC remote)")
    sel.set_defaults(func=_cmd_select)
