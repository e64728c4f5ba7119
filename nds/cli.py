"""The `nds` command line. Errors a user can fix are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from nds.config import Workspace
from nds.errors import NDSError

log = logging.getLogger("nds")


def _cmd_corpus_build(args) -> int:
    from nds import corpus, versioning

    ws = Workspace.from_env(args.root)
    t0 = time.perf_counter()
    info = corpus.build_corpus(ws, args.profile, progress=not args.quiet)
    md5 = None if args.no_dvc else versioning.track_corpus(ws)
    counts = info.get("counts", {})
    print(f"corpus {args.profile}: {info.get('total')} images in {time.perf_counter() - t0:.1f}s -> {ws.data_dir}")
    for ds, c in sorted(counts.items()):
        print(f"  {ds:10s} {c}")
    if md5:
        print(f"tracked by DVC as data.dvc (md5 {md5})")
    return 0


def _corpus_profile(ws: Workspace) -> str | None:
    path = ws.data_dir / "corpus.json"
    return json.loads(path.read_text()).get("profile") if path.exists() else None


def _cmd_index(args) -> int:
    from nds import corpus, report, versioning

    ws = Workspace.from_env(args.root)
    t0 = time.perf_counter()
    if args.rebuild_corpus or _corpus_profile(ws) != args.profile:
        info = corpus.build_corpus(ws, args.profile, progress=not args.quiet)
        print(f"corpus {args.profile}: {info.get('total')} images built in {time.perf_counter() - t0:.1f}s")
    if args.dvc_init:
        versioning.init_repo(ws)
    versioning.track_corpus(ws)
    corpus_s = time.perf_counter() - t0
    from flows.index import index

    summary = index(str(ws.root), progress=not args.quiet)
    summary["stage_seconds"] = {"corpus": round(corpus_s, 2), **summary["stage_seconds"]}
    print(report.index_summary_text(summary))
    print(f"total             {time.perf_counter() - t0:.1f}s")
    return 0


def _cmd_stage(args) -> int:
    from nds import pipeline

    summary = pipeline.run_stage(args.name, Workspace.from_env(args.root), progress=not args.quiet)
    log.info("%s done: %s", args.name, {k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
    return 0


def _cmd_status(args) -> int:
    from nds import warehouse

    ws = Workspace.from_env(args.root)
    status = warehouse.read_status(ws.warehouse_path)
    if args.json:
        print(json.dumps(status, default=str, indent=2))
        return 0
    print(f"warehouse {ws.warehouse_path}")
    if not status["versions"]:
        print("no index versions yet: run `nds index`")
        return 0
    for i, v in enumerate(status["versions"]):
        mark = "*" if i == 0 else " "
        print(
            f"{mark} {v['index_version']}  {v['created_at']:%Y-%m-%d %H:%M}  profile={v['corpus_profile']}  "
            f"samples={v['n_samples']}  domains={v['n_datasets']}  k={v['k']}  NMI={v['nmi_dataset']:.3f}"
        )
    print("clusters of the current version (* above):")
    for c in status["current_clusters"]:
        print(
            f"  expert {c['expert']:3d}  size {c['size']:6d}  top {c['top_dataset']:8s} "
            f"{c['top_dataset_share']:.0%}  rotation acc {c['rotation_accuracy']:.3f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nds.corpus import PROFILES
    from nds.pipeline import STAGES

    p = argparse.ArgumentParser(prog="nds", description="Neural Data Server: find the source data that helps your task.")
    p.add_argument("--root", help="workspace folder (default: $NDS_ROOT or the current directory)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    corpus = sub.add_parser("corpus", help="the embedded source corpus")
    csub = corpus.add_subparsers(dest="corpus_command", required=True)
    build = csub.add_parser("build", help="build data/ from packaged sources and track it with DVC")
    build.add_argument("--profile", default="small", choices=sorted(PROFILES))
    build.add_argument("--no-dvc", action="store_true", help="do not `dvc add data`")
    build.set_defaults(func=_cmd_corpus_build)

    idx = sub.add_parser("index", help="build the corpus if needed and run the whole index pipeline")
    idx.add_argument("--profile", default="small", choices=sorted(PROFILES))
    idx.add_argument("--rebuild-corpus", action="store_true")
    idx.add_argument("--dvc-init", action="store_true", help="`dvc init` the workspace first if needed")
    idx.set_defaults(func=_cmd_index)

    st = sub.add_parser("stage", help="run one index stage without Prefect (what dvc.yaml calls)")
    st.add_argument("name", choices=STAGES)
    st.set_defaults(func=_cmd_stage)

    status = sub.add_parser("status", help="what the warehouse holds")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Prefect's client logs every API request at INFO; keep the console about our work.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except NDSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished artifacts are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
