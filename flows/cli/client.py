"""The client's commands: `nds client fetch-experts|score|download` (images stay on this machine)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nds.config import Workspace
from nds.errors import InvalidInputError, NDSError
from nds.models.device import DEVICE_HELP, device_argument


def _cmd_client_fetch(args) -> int:
    from nds.client.fetch import fetch_experts

    bundle = fetch_experts(args.source, Path(args.out))
    print(f"fetched {bundle['k']} experts of index {bundle['index_version']} into {args.out} (checksums verified)")
    return 0


def _check_score_inputs(args):
    """--out, --experts and --data, checked before any image is decoded; returns the data layout."""
    from nds.client.images import inspect_client_data
    from nds.client.scoring import needs_labels
    from nds.formats.bundle import load_bundle

    out = Path(args.out)
    if out.is_dir():
        raise InvalidInputError(f"--out {out} is a folder: give a file name for scores.json (e.g. {out / 'scores.json'})")
    if out.exists() and not args.overwrite:
        raise InvalidInputError(f"--out {out} already exists: choose a new file, or pass --overwrite to replace it")
    bundle = load_bundle(Path(args.experts), verify=False)  # present and intact; checksums are verified when scoring
    if args.mode is None:
        from nds.formats.bundle import default_mode

        args.mode = default_mode(bundle)
    try:
        layout = inspect_client_data(Path(args.data))
    except NDSError as exc:
        raise type(exc)(f"--data {exc}") from exc
    if needs_labels(args.mode) and len(layout.class_names) < 2:
        raise InvalidInputError(
            f"--mode {args.mode} needs labelled images in >= 2 classes, but --data {args.data} holds "
            f"{layout.describe()}: put them in one subfolder per class (or give an .npz with 'labels'), "
            "or use --mode rotation, which needs no labels"
        )
    return layout


def _cmd_client_score(args) -> int:
    from nds.models.device import pick_device

    pick_device(args.device)  # --device / $NDS_DEVICE: a missing GPU fails here, before any other work
    layout = _check_score_inputs(args)
    from nds.client.images import compute_image_hashes, load_client_images
    import numpy as np

    from nds.client.scoring import LOG_SCORE_MODES, SHARPNESS, score_experts
    from nds.formats.scores import write_scores
    from nds.select.request import DEFAULT_TEMPERATURE

    data = load_client_images(Path(args.data), progress=not args.quiet)  # logs skipped files itself
    result = score_experts(Path(args.experts), data, mode=args.mode, seed=args.seed, progress=not args.quiet,
                           threads=args.threads, device=args.device)
    hashes = compute_image_hashes(data.images) if args.emit_hashes else None
    write_scores(Path(args.out), bundle=result.bundle, mode=args.mode, scores=result.scores,
                 seconds_per_expert=result.seconds_per_expert, hashes=hashes, overwrite=args.overwrite)
    best = sorted(range(len(result.scores)), key=lambda k: -result.scores[k])[:5]
    print(f"wrote {args.out}: {len(result.scores)} {args.mode} scores of index {result.bundle['index_version']} "
          f"({len(data.images)} {'' if layout.labelled else 'unlabelled '}images"
          f"{', their hashes' if hashes else ''}; nothing else about them)")
    if args.mode in LOG_SCORE_MODES:  # T0 * SHARPNESS * log p: show p, the share of the evidence
        p = np.exp((result.scores - result.scores.max()) / (SHARPNESS * DEFAULT_TEMPERATURE))
        shown = {k: f"p {v:.2f}" for k, v in enumerate(p / p.sum())}
    else:
        shown = {k: f"{v:.3f}" for k, v in enumerate(result.scores)}
    print("top experts: " + ", ".join(f"{k} ({shown[k]})" for k in best))
    return 0


def _cmd_client_download(args) -> int:
    from nds.client.download import download_manifest, summary_line

    manifest = args.manifest or args.manifest_option
    if not manifest or (args.manifest and args.manifest_option):
        raise InvalidInputError("give the manifest once: `nds client download MANIFEST --out DIR`")
    report = download_manifest(Path(manifest), Path(args.out), ws=Workspace.from_env(args.root),
                               workers=args.workers, retries=args.retries, timeout_s=args.timeout,
                               fill=args.fill, resume=args.resume, progress=not args.quiet)
    print(summary_line(report))
    return 0


def add_commands(sub) -> None:
    from nds._registry import SCORERS

    client = sub.add_parser("client", help="client side: fetch experts, score your data, download a selection")
    csub2 = client.add_subparsers(dest="client_command", required=True)
    fetch = csub2.add_parser("fetch-experts", help="download and verify the expert bundle")
    fetch.add_argument("source", help="a local bundle folder, s3://bucket/prefix or http(s)://HOST:8600/v1/bundle (nds serve)")
    fetch.add_argument("--out", required=True)
    fetch.set_defaults(func=_cmd_client_fetch)
    score = csub2.add_parser("score", help="fast adaptation: one score per expert (images stay local)")
    score.add_argument("--experts", required=True, help="expert bundle folder")
    score.add_argument("--data", required=True, help="ImageFolder (class sub-folders), a flat folder of images "
                       "(unlabelled: rotation only) or .npz with images (+ labels)")
    score.add_argument("--out", required=True, help="scores.json to write (an existing file needs --overwrite)")
    score.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    score.add_argument("--mode", default=None, choices=SCORERS.names(),
                       help="scorer (default: combined where the bundle ships cluster statistics, else rotation; "
                       "features: the index's public extractor and the bundle's per-cluster "
                       "reference sample, for images from collections the index has never seen; rotation-prob: the "
                       "mean probability of the right rotation; combined: the features' votes weighted by how far "
                       "each expert's rotation-prob stands out of noise)")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--threads", type=int, default=1,
                       help="torch threads while scoring (default 1: fastest for these small experts on shared cores)")
    score.add_argument("--device", type=device_argument, help=DEVICE_HELP)
    score.add_argument("--emit-hashes", action="store_true",
                       help="add content hashes of your images so the server excludes exact duplicates")
    score.set_defaults(func=_cmd_client_score)
    dl = csub2.add_parser("download", help="fetch a manifest's images, one by one, into an ImageFolder "
                          "(dataset/label/sample.ext), verified against their sha256")
    dl.add_argument("manifest", nargs="?", help="manifest folder or manifest.parquet/.csv (urls.csv beside it "
                    "holds the presigned links of `nds select --presign`)")
    dl.add_argument("--manifest", dest="manifest_option", metavar="MANIFEST", help="the same, as an option")
    dl.add_argument("--out", required=True, help="a new or empty folder (or one to --resume)")
    dl.add_argument("--workers", type=int, default=8, help="concurrent fetches (default 8)")
    dl.add_argument("--retries", type=int, default=3,
                    help="retries per image on timeouts, 5xx and lost connections, with backoff (default 3; "
                    "404/403 are not retried)")
    dl.add_argument("--timeout", type=float, default=30.0, help="seconds per attempt (default 30)")
    dl.add_argument("--fill", action=argparse.BooleanOptionalAction, default=None,
                    help="replace dead, changed or corrupt images with the manifest's reserve rows, in rank order "
                    "(default: on when the manifest has reserve rows)")
    dl.add_argument("--resume", action="store_true",
                    help="continue an interrupted download in --out: verified files are kept, the rest fetched")
    dl.set_defaults(func=_cmd_client_download)
    from flows.cli.serve import add_client_request

    add_client_request(csub2)  # `nds client request` (the HTTP service)
