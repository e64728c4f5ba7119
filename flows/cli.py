"""The `nds` command line. Errors a user can fix are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from nds.config import Workspace
from nds.errors import NDSError

log = logging.getLogger("nds")


def _cmd_corpus_build(args) -> int:
    from nds.corpus import build as corpus
    from nds.platform import dvc as versioning
    ws = Workspace.from_env(args.root)
    t0 = time.perf_counter()
    info = corpus.build_corpus(ws, args.profile, progress=not args.quiet)
    md5 = None if args.no_dvc else versioning.track_corpus(ws)
    counts = info.get("counts", {})
    print(f"corpus {args.profile}: {info.get('total')} images in {time.perf_counter() - t0:.1f}s -> {ws.data_dir}")
    for ds, c in sorted(counts.items()):
        print(f"  {ds:10s} source {c.get('source', 0):6d}  holdout {c.get('holdout', 0):6d}")
    if md5:
        print(f"tracked by DVC as data.dvc (md5 {md5})")
    return 0


def _cmd_corpus_publish(args) -> int:
    from nds.corpus import build as corpus
    from nds.platform import dvc as versioning
    ws = Workspace.from_env(args.root)
    t0 = time.perf_counter()
    info = corpus.publish_corpus(ws, args.url, keep_local=not args.drop_local)
    md5 = None if args.no_dvc else versioning.track_corpus(ws)
    print(f"corpus published: {info['rows']} catalog rows now point at {len(info['objects'])} objects under "
          f"{info['store']} ({time.perf_counter() - t0:.1f}s)")
    if info["local_removed"]:
        print(f"removed {info['local_removed']} local arrays: readers fetch them from S3 into {corpus.corpus_cache_dir(ws.data_dir)}")
    if md5:
        print(f"tracked by DVC as data.dvc (md5 {md5})")
    return 0


def _cmd_corpus_holdout(args) -> int:
    from nds.corpus.holdout import export_holdout

    info = export_holdout(Workspace.from_env(args.root), args.dataset, Path(args.out), per_class=args.per_class,
                          seed=args.seed)
    print(f"wrote {info['images']} held-out {args.dataset} images in {info['classes']} classes to {info['out_dir']}")
    return 0


def _corpus_profile(ws: Workspace) -> str | None:
    path = ws.data_dir / "corpus.json"
    return json.loads(path.read_text()).get("profile") if path.exists() else None


def _cmd_index(args) -> int:
    from nds import report
    from nds.corpus import build as corpus
    from nds.platform import dvc as versioning
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
    from nds.index import stages as pipeline
    summary = pipeline.run_stage(args.name, Workspace.from_env(args.root), progress=not args.quiet)
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


def _cmd_client_fetch(args) -> int:
    from nds.client.images import fetch_experts

    bundle = fetch_experts(args.source, Path(args.out))
    print(f"fetched {bundle['k']} experts of index {bundle['index_version']} into {args.out} (checksums verified)")
    return 0


def _cmd_client_score(args) -> int:
    from nds.client.images import compute_image_hashes, load_client_images, write_scores
    from nds.client.scoring import score_experts

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


def _cmd_evaluate(args) -> int:
    from pydantic import ValidationError

    from nds.evaluate import runner as evaluation
    if args.from_dir:
        if args.target_accuracy is None:
            raise NDSError("--from needs --target-accuracy (what budget reaches accuracy X?)")
        doc = json.loads((Path(args.from_dir) / "fits.json").read_text()) if (Path(args.from_dir) / "fits.json").exists() else None
        if doc is None:
            raise NDSError(f"{args.from_dir}/fits.json not found: run `nds evaluate --out {args.from_dir}` first")
        fits = evaluation.fits_from_dict(doc["fits"])
        for line in evaluation.budget_answer_lines(fits, args.target_accuracy, n_source=int(doc["meta"]["n_source"])):
            print(line)
        return 0
    fields = {k: v for k, v in {
        "tasks": args.task, "budgets": args.budget, "strategies": args.strategy, "shots": args.shots,
        "seeds": list(range(args.seeds)) if args.seeds is not None else None, "temperature": args.temperature,
        "train_dir": args.train, "test_dir": args.test, "out_dir": str(Path(args.out).resolve()) if args.out else None,
    }.items() if v is not None}
    if args.train:
        fields.setdefault("tasks", [])
    try:
        request = evaluation.quick_request(**fields) if args.quick else evaluation.EvaluateRequest(**fields)
        if args.pretrain_steps or args.finetune_steps or args.finetune_mode:
            request.train = request.train.model_copy(update={k: v for k, v in {
                "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
                "finetune_mode": args.finetune_mode}.items() if v})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise NDSError(f"--{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    from flows.evaluate import evaluate

    ws = Workspace.from_env(args.root)
    summary = evaluate(request, str(ws.root), progress=not args.quiet)
    print(summary["markdown"])
    print(f"evaluation {summary['evaluation_id']}: {summary['rows']} runs -> {summary['out_dir']}")
    print(f"plot {summary['paths']['plot']}")
    if args.target_accuracy is not None:
        fits = evaluation.fits_from_dict(summary["fits"])
        if not fits:
            print("no log-linear fit: measure nds or uniform at >= 2 budgets to predict a budget")
        for line in evaluation.budget_answer_lines(fits, args.target_accuracy, n_source=summary["n_source"]):
            print(line)
    return 0


def _cmd_server_up(args) -> int:
    from nds.platform import prefect_server as server
    state = server.server_up(repo_root=Path(args.repo), home=Path(args.home) if args.home else None,
                             host=args.host, port=args.port, deployments=args.deployment,
                             worker=not args.no_worker)
    print(f"prefect server {state['ui_url']} up in {state['seconds']}s (pids {state['pids']})")
    print(f"work pool {server.WORK_POOL}, deployments: {state['deployments']}; state {state['home']}/{server.STATE_NAME}")
    print(f"export PREFECT_API_URL={state['api_url']}   # then e.g. `prefect deployment run select/select`")
    return 0


def _cmd_server_down(args) -> int:
    from nds.platform import prefect_server as server
    result = server.server_down(Path(args.home) if args.home else None)
    print("stopped " + (", ".join(f"{k} ({v})" for k, v in result.items()) if result else "nothing (no state file)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nds.corpus.build import PROFILES
    from nds.index.stages import STAGES
    from nds.select.service import DEFAULT_TEMPERATURE

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

    idx = sub.add_parser("index", help="build the corpus if needed and run the whole index pipeline")
    idx.add_argument("--profile", default="small", choices=sorted(PROFILES))
    idx.add_argument("--rebuild-corpus", action="store_true")
    idx.add_argument("--dvc-init", action="store_true", help="`dvc init` the workspace first if needed")
    idx.set_defaults(func=_cmd_index)

    st = sub.add_parser("stage", help="run one index stage without Prefect (what dvc.yaml calls)")
    st.add_argument("name", choices=STAGES)
    st.set_defaults(func=_cmd_stage)

    sel = sub.add_parser("select", help="turn a client's scores.json into an export manifest")
    sel.add_argument("--scores", required=True, help="scores.json from `nds client score`")
    sel.add_argument("--budget", required=True, type=float, help="count (e.g. 2000) or fraction (e.g. 0.1)")
    sel.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="softmax temperature (default %(default)s)")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--dataset", action="append", help="only this source domain (repeatable)")
    sel.add_argument("--exclude-file", help="file of sample_ids / sha256 hashes to leave out, one per line")
    sel.add_argument("--method", default="auto", choices=["auto", "es-keys", "two-stage", "clustered"],
                     help="sampler, one law for all: auto (default: clustered, O(K+B), when the index has its "
                          "cluster layout, else es-keys), es-keys (O(N)), two-stage, clustered")
    sel.add_argument("--out", required=True, help="folder for manifest.parquet/.csv and summary.json")
    sel.add_argument("--presign", type=int, metavar="SECONDS",
                     help="also write urls.csv: presigned GET URLs of the selected corpus objects (corpus on an S3 DVC remote)")
    sel.set_defaults(func=_cmd_select)

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
    score.add_argument("--mode", default="rotation", choices=["rotation", "linear", "logme"],
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

    ev = sub.add_parser("evaluate", help="pre-train on each strategy's selection, fine-tune on a target, compare")
    ev.add_argument("--task", action="append", help="built-in target task (repeatable): digits, clothing, letters, animals, emoji")
    ev.add_argument("--train", help="your own labelled train ImageFolder (with --test) instead of --task")
    ev.add_argument("--test", help="your own labelled test ImageFolder")
    ev.add_argument("--budget", action="append", type=float, help="count or fraction of the source (repeatable)")
    ev.add_argument("--strategy", action="append", choices=["nds", "uniform", "all", "none"], help="(repeatable; default all four)")
    ev.add_argument("--seeds", type=int, help="number of seeds (0..N-1; default 3)")
    ev.add_argument("--shots", type=int, help="train images per class of a built-in task (default 10)")
    ev.add_argument("--temperature", type=float, help="selection temperature (default: the server's)")
    ev.add_argument("--pretrain-steps", type=int,
                    help="cap of pre-training steps (each selection trains 30 epochs within [300, cap] steps)")
    ev.add_argument("--finetune-steps", type=int)
    ev.add_argument("--finetune-mode", choices=["all", "last"], help="fine-tune every layer or head + last block")
    ev.add_argument("--quick", action="store_true", help="tiny smoke profile: 1 task, 1 seed, 2 budgets, short training")
    ev.add_argument("--out", help="output folder (default: evaluations/<evaluation id>)")
    ev.add_argument("--target-accuracy", type=float, help="also print the budget predicted to reach this accuracy")
    ev.add_argument("--from", dest="from_dir", help="answer --target-accuracy from a finished evaluation folder")
    ev.set_defaults(func=_cmd_evaluate)

    srv = sub.add_parser("server", help="a local Prefect server with the NDS deployments and a worker")
    ssub = srv.add_subparsers(dest="server_command", required=True)
    up = ssub.add_parser("up", help="start server, work pool nds-process, `prefect deploy`, a worker")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=4200)
    up.add_argument("--repo", default=".", help="repository root with prefect.yaml (default: current directory)")
    up.add_argument("--deployment", action="append", help="deploy only this one (repeatable; default: all)")
    up.add_argument("--no-worker", action="store_true", help="do not start a worker")
    up.add_argument("--home", help="PREFECT_HOME and state folder (default: $NDS_PREFECT_HOME or ~/.nds/prefect)")
    up.set_defaults(func=_cmd_server_up)
    down = ssub.add_parser("down", help="stop the processes `nds server up` started")
    down.add_argument("--home", help="as given to `nds server up`")
    down.set_defaults(func=_cmd_server_down)

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
