"""The client's commands: `nds client fetch-experts|score|download` (images stay on this machine)."""

from __future__ import annotations

import sys
from pathlib import Path

from nds.config import Workspace


def _cmd_client_fetch(args) -> int:
    from nds.client.fetch import fetch_experts

    bundle = fetch_experts(args.source, Path(args.out))
    print(f"fetched {bundle['k']} experts of index {bundle['index_version']} into {args.out} (checksums verified)")
    return 0


def _cmd_client_score(args) -> int:
    from nds.client.images import compute_image_hashes, load_client_images
    from nds.client.scoring import score_experts
    from nds.formats.scores import write_scores

    data = load_client_images(Path(args.data), progress=not args.quiet)
    if data.n_skipped:
        print(f"skipped {data.n_skipped} unreadable images (first: {data.skipped[0][0]}: {data.skipped[0][1]})", file=sys.stderr)
    result = score_experts(Path(args.experts), data, mode=args.mode, seed=args.seed, progress=not args.quiet,
                           threads=args.threads)
    hashes = compute_image_hashes(data.images) if args.emit_hashes else None
    write_scores(Path(args.out), bundle=result.bundle, mode=args.mode, scores=result.scores,
                 seconds_per_expert=result.seconds_per_expert, hashes=hashes)
    best = sorted(range(len(result.scores)), key=lambda k: -result.scores[k])[:5]
    print(f"scored {len(result.scores)} experts ({args.mode}) on {len(data.images)} images in "
          f"{sum(result.seconds_per_expert):.1f}s -> {args.out}")
    print("top experts: " + ", ".join(f"{k} ({result.scores[k]:.3f})" for k in best))
    return 0


def _cmd_client_download(args) -> int:
    from nds.client.download import download_manifest

    info = download_manifest(Path(args.manifest), Path(args.out), ws=Workspace.from_env(args.root),
                             progress=not args.quiet)
    print(f"downloaded {info['images']} images from {info['source']} into {info['out_dir']} "
          "(ImageFolder: dataset/label/sample.png)")
    return 0


def add_commands(sub) -> None:
    from nds._registry import SCORERS

    client = sub.add_parser("client", help="client side: fetch experts, score your data, download a selection")
    csub2 = client.add_subparsers(dest="client_command", required=True)
    fetch = csub2.add_parser("fetch-experts", help="download and verify the expert bundle")
    fetch.add_argument("source", help="a local bundle folder or s3://bucket/prefix")
    fetch.add_argument("--out", required=True)
    fetch.set_defaults(func=_cmd_client_fetch)
    score = csub2.add_parser("score", help="fast adaptation: one score per expert (images stay local)")
    score.add_argument("--experts", required=True, help="expert bundle folder")
    score.add_argument("--data", required=True, help="ImageFolder (class sub-folders) or .npz with images+labels")
    score.add_argument("--out", required=True, help="scores.json to write")
    score.add_argument("--mode", default="rotation", choices=SCORERS.names(),
                       help="scorer (default: rotation, the most domain-selective on the embedded tasks)")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--threads", type=int, default=1,
                       help="torch threads while scoring (default 1: fastest for these small experts on shared cores)")
    score.add_argument("--emit-hashes", action="store_true",
                       help="add content hashes of your images so the server excludes exact duplicates")
    score.set_defaults(func=_cmd_client_score)
    dl = csub2.add_parser("download", help="materialise a manifest's images as an ImageFolder")
    dl.add_argument("--manifest", required=True, help="manifest folder or manifest.parquet/.csv")
    dl.add_argument("--out", required=True)
    dl.set_defaults(func=_cmd_client_download)
