"""The embedded source corpus: `nds corpus build|publish|holdout`."""

from __future__ import annotations

import time
from pathlib import Path

from nds.config import Workspace


def _cmd_corpus_build(args) -> int:
    from nds.corpus.build import build_corpus
    from nds.platform import dvc

    ws = Workspace.from_env(args.root)
    t0 = time.perf_counter()
    info = build_corpus(ws, args.profile, progress=not args.quiet)
    md5 = None if args.no_dvc else dvc.track_corpus(ws)
    counts = info.get("counts", {})
    print(f"corpus {args.profile}: {info.get('total')} images in {time.perf_counter() - t0:.1f}s -> {ws.data_dir}")
    for ds, c in sorted(counts.items()):
        print(f"  {ds:10s} source {c.get('source', 0):6d}  holdout {c.get('holdout', 0):6d}")
    if md5:
        print(f"tracked by DVC as data.dvc (md5 {md5})")
    return 0


def _cmd_corpus_publish(args) -> int:
    from nds.corpus.publish import publish_corpus
    from nds.corpus.read import corpus_cache_dir
    from nds.platform import dvc

    ws = Workspace.from_env(args.root)
    t0 = time.perf_counter()
    info = publish_corpus(ws, args.url, keep_local=not args.drop_local)
    md5 = None if args.no_dvc else dvc.track_corpus(ws)
    print(f"corpus published: {info['rows']} catalog rows now point at {len(info['objects'])} objects under "
          f"{info['store']} ({time.perf_counter() - t0:.1f}s)")
    if info["local_removed"]:
        print(f"removed {info['local_removed']} local arrays: readers fetch them from S3 into {corpus_cache_dir(ws.data_dir)}")
    if md5:
        print(f"tracked by DVC as data.dvc (md5 {md5})")
    return 0


def _cmd_corpus_holdout(args) -> int:
    from nds.corpus.holdout import export_holdout

    info = export_holdout(Workspace.from_env(args.root), args.dataset, Path(args.out), per_class=args.per_class,
                          seed=args.seed)
    print(f"wrote {info['images']} held-out {args.dataset} images in {info['classes']} classes to {info['out_dir']}")
    return 0


def add_commands(sub) -> None:
    from nds._registry import PROFILES

    corpus = sub.add_parser("corpus", help="the embedded source corpus")
    csub = corpus.add_subparsers(dest="corpus_command", required=True)
    build = csub.add_parser("build", help="build data/ from packaged sources and track it with DVC")
    build.add_argument("--profile", default="small", choices=PROFILES.names())
    build.add_argument("--no-dvc", action="store_true", help="do not `dvc add data`")
    build.set_defaults(func=_cmd_corpus_build)
    pub = csub.add_parser("publish", help="upload the corpus images to S3 and point the catalog uris at them")
    pub.add_argument("url", help="s3://bucket/prefix (endpoint: $NDS_S3_ENDPOINT_URL; credentials: the environment)")
    pub.add_argument("--drop-local", action="store_true", help="delete the local arrays afterwards (S3 only)")
    pub.add_argument("--no-dvc", action="store_true", help="do not `dvc add data`")
    pub.set_defaults(func=_cmd_corpus_publish)
    hold = csub.add_parser("holdout", help="write held-out images of one domain as a client task (ImageFolder)")
    hold.add_argument("--dataset", required=True)
    hold.add_argument("--per-class", type=int, default=20)
    hold.add_argument("--seed", type=int, default=0)
    hold.add_argument("--out", required=True)
    hold.set_defaults(func=_cmd_corpus_holdout)
