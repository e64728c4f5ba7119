"""The server's index: `nds index`, `nds stage NAME` (what dvc.yaml runs), `nds status`."""

from __future__ import annotations

import json
import logging
import time

from nds.config import Workspace
from nds.models.device import DEVICE_HELP, apply_device_option, device_argument

log = logging.getLogger("nds")


def _corpus_profile(ws: Workspace) -> str | None:
    path = ws.data_dir / "corpus.json"
    return json.loads(path.read_text()).get("profile") if path.exists() else None


def _cmd_index(args) -> int:
    from flows.cli._prefect import reachable_prefect_api
    from nds import report
    from nds.corpus.build import build_corpus
    from nds.params import load_params
    from nds.platform import dvc

    ws = Workspace.from_env(args.root)
    apply_device_option(args.device)
    # Inputs first: a bad params.yaml or an unreachable PREFECT_API_URL is one line now, not a
    # failed flow run after the corpus build. (No API configured: Prefect starts a temporary one.)
    load_params(ws.params_path)
    reachable_prefect_api()
    t0 = time.perf_counter()
    if args.rebuild_corpus or _corpus_profile(ws) != args.profile:
        info = build_corpus(ws, args.profile, progress=not args.quiet)
        print(f"corpus {args.profile}: {info.get('total')} images built in {time.perf_counter() - t0:.1f}s")
    if args.dvc_init:
        dvc.init_repo(ws)
    dvc.track_corpus(ws)
    corpus_s = time.perf_counter() - t0
    from flows.index import index

    summary = index(str(ws.root), progress=not args.quiet)
    summary["stage_seconds"] = {"corpus": round(corpus_s, 2), **summary["stage_seconds"]}
    print(report.index_summary_text(summary))
    print(f"total             {time.perf_counter() - t0:.1f}s")
    return 0


def _cmd_stage(args) -> int:
    from nds.index.stages import run_stage

    apply_device_option(args.device)
    summary = run_stage(args.name, Workspace.from_env(args.root), progress=not args.quiet)
    log.info("%s done: %s", args.name, {k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
    return 0


def _cmd_status(args) -> int:
    from nds.platform import warehouse
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


def add_commands(sub) -> None:
    from nds._registry import PROFILES
    from nds.index.stages import STAGES

    idx = sub.add_parser("index", help="build the corpus if needed and run the whole index pipeline")
    idx.add_argument("--profile", default="small", choices=PROFILES.names())
    idx.add_argument("--rebuild-corpus", action="store_true")
    idx.add_argument("--dvc-init", action="store_true", help="`dvc init` the workspace first if needed")
    idx.add_argument("--device", type=device_argument, help=DEVICE_HELP)
    idx.set_defaults(func=_cmd_index)

    st = sub.add_parser("stage", help="run one index stage without Prefect (what dvc.yaml calls)")
    st.add_argument("name", choices=STAGES)
    st.add_argument("--device", type=device_argument, help=DEVICE_HELP)
    st.set_defaults(func=_cmd_stage)

    status = sub.add_parser("status", help="what the warehouse holds")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
