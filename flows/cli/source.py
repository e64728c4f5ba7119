"""Outside image collections indexed where they live: `nds source add|list|remove|check`."""

from __future__ import annotations

import json

from nds.config import Workspace

#: Skipped uris printed per reason after an add (source.json keeps a few more).
SHOWN_EXAMPLES = 3


def _cmd_source_add(args) -> int:
    from nds.corpus.registry import add_source

    ws = Workspace.from_env(args.root)
    info = add_source(ws, args.name, args.location, label_from=args.label_from, replace=args.replace,
                      progress=not args.quiet, workers=args.workers, track=not args.no_dvc)
    counts = info["counts"]
    skipped = {r: n for r, n in counts.items() if r != "registered" and n}
    print(f"source {info['name']} ({info['kind']}): {counts['registered']} images, {info['labels']} labels "
          f"(--label-from {info['label_from']}) in {info['seconds']:.1f}s -> {ws.data_dir / 'sources' / info['name']}")
    if skipped:
        print("skipped: " + ", ".join(f"{n} {r}" for r, n in skipped.items()))
        for reason, uris in info["skipped_examples"].items():
            for uri in uris[:SHOWN_EXAMPLES]:
                print(f"  {reason:26s} {uri}")
    if info["dvc_md5"]:
        print(f"tracked by DVC as data.dvc (md5 {info['dvc_md5']})")
    return 0


def _cmd_source_list(args) -> int:
    from nds.corpus.registry import list_sources

    sources = list_sources(Workspace.from_env(args.root).data_dir)
    if args.json:
        print(json.dumps(sources, indent=2, sort_keys=True))
        return 0
    if not sources:
        print("no registered sources: add one with `nds source add NAME --from LOCATION`")
        return 0
    print(f"{'name':20s} {'kind':12s} {'images':>8s} {'labels':>6s} {'skipped':>7s}  location")
    for s in sources:
        c = s["counts"]
        skipped = sum(n for r, n in c.items() if r != "registered")
        print(f"{s['name']:20s} {s['kind']:12s} {c['registered']:8d} {s['labels']:6d} {skipped:7d}  {s['location']}")
    return 0


def _cmd_source_remove(args) -> int:
    from nds.corpus.registry import remove_source

    ws = Workspace.from_env(args.root)
    info = remove_source(ws, args.name, track=not args.no_dvc)
    print(f"removed source {info['name']} ({info['counts']['registered']} images from {info['location']}); "
          "the objects themselves are untouched")
    if info["dvc_md5"]:
        print(f"tracked by DVC as data.dvc (md5 {info['dvc_md5']})")
    return 0


def _cmd_source_check(args) -> int:
    from nds.corpus.registry import check_source

    report = check_source(Workspace.from_env(args.root), args.name, progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(f"source {report['name']}: {report['checked']} checked, {report['unchanged']} unchanged, "
              f"{report['changed']} changed, {report['missing']} missing, {report['not_in_catalog']} listed but "
              "not in the catalog (added since, or skipped at registration)")
        for what in ("changed", "missing"):
            for uri in report["examples"][what]:
                print(f"  {what:8s} {uri}")
    drifted = report["changed"] or report["missing"]
    if drifted and not args.json:
        print(f"to register the current objects: {report['re_register']}")
    return 1 if drifted else 0


def add_commands(sub) -> None:
    from nds.corpus.locations import LABEL_FROM

    source = sub.add_parser("source", help="outside image collections (folders, S3, link tables, WebDataset)")
    ssub = source.add_subparsers(dest="source_command", required=True)
    add = ssub.add_parser("add", help="register the images at a location (they stay where they are)")
    add.add_argument("name", help="source name: lower-case letters, digits, '-' and '_' (e.g. my-photos)")
    add.add_argument("--from", dest="location", required=True,
                     help="a folder (class sub-folders = labels), s3://bucket/prefix/, a .csv/.parquet link table "
                          "with a `url` column, or .tar shards (a file, a glob or a folder of them)")
    add.add_argument("--label-from", choices=LABEL_FROM, default=None,
                     help="where labels come from (default: sub-folders, a `label` column or WebDataset .cls "
                          "members, when the location has them)")
    add.add_argument("--replace", action="store_true", help="re-register an existing source")
    add.add_argument("--workers", type=int, default=None, help="objects fetched and decoded at once")
    add.add_argument("--no-dvc", action="store_true", help="do not `dvc add data` afterwards")
    add.set_defaults(func=_cmd_source_add)
    ls = ssub.add_parser("list", help="the registered sources")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_source_list)
    rm = ssub.add_parser("remove", help="unregister a source (its objects are untouched)")
    rm.add_argument("name")
    rm.add_argument("--no-dvc", action="store_true", help="do not `dvc add data` afterwards")
    rm.set_defaults(func=_cmd_source_remove)
    check = ssub.add_parser("check", help="objects changed or gone since registration (exit 1 if any)")
    check.add_argument("name")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=_cmd_source_check)
