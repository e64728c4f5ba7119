"""`nds server up|down`: a local Prefect server with the NDS deployments and a worker."""

from __future__ import annotations

from pathlib import Path


def _cmd_server_up(args) -> int:
    from nds.platform import prefect_server

    state = prefect_server.server_up(repo_root=Path(args.repo), home=Path(args.home) if args.home else None,
                                     host=args.host, port=args.port, deployments=args.deployment,
                                     worker=not args.no_worker, workspace=Path(args.root) if args.root else None,
                                     ui_api=args.ui_api_url)
    ui = state["ui_url"]
    print(f"prefect server {ui} up in {state['seconds']}s (pids {state['pids']})")
    print(f"work pool {prefect_server.WORK_POOL}, deployments: {state['deployments']}; workspace {state['workspace']}; "
          f"state {state['home']}/{prefect_server.STATE_NAME}")
    view = state.get("operator_view") or {}
    if view.get("select_form"):
        datasets = view["select_form"]["datasets"]
        print(f"select form: {len(datasets)} source datasets to choose from ({', '.join(datasets)})" if datasets
              else "select form: source datasets as free text (no index yet)")
    if view.get("index_report"):
        report = view["index_report"]
        print(f"index {report['index_version']}: summary {ui}/v2/artifacts/artifact/{report['artifacts']['index-summary']}"
              f" , what each expert covers {ui}/v2/artifacts/artifact/{report['artifacts']['cluster-montage']}")
    for note in view.get("notes", []):
        print(f"note: {note}")
    print(f"export PREFECT_API_URL={state['api_url']}   # then e.g. `prefect deployment run select/select`")
    return 0


def _cmd_server_down(args) -> int:
    from nds.platform import prefect_server

    result = prefect_server.server_down(Path(args.home) if args.home else None)
    print("stopped " + (", ".join(f"{k} ({v})" for k, v in result.items()) if result else "nothing (no state file)"))
    return 0


def add_commands(sub) -> None:
    srv = sub.add_parser("server", help="a local Prefect server with the NDS deployments and a worker")
    ssub = srv.add_subparsers(dest="server_command", required=True)
    up = ssub.add_parser("up", help="start server, work pool nds-process, `prefect deploy`, a worker",
                         description="Flow runs use the workspace given by the global --root (default: the "
                                     "repository, --repo); the select form offers that index's datasets.")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=4200)
    up.add_argument("--repo", default=".", help="repository root with prefect.yaml (default: current directory)")
    up.add_argument("--deployment", action="append", help="deploy only this one (repeatable; default: all)")
    up.add_argument("--no-worker", action="store_true", help="do not start a worker")
    up.add_argument("--home", help="PREFECT_HOME and state folder (default: $NDS_PREFECT_HOME or ~/.nds/prefect)")
    up.add_argument("--ui-api-url", metavar="URL",
                    help="API URL the UI's pages call from the browser (default: http://HOST:PORT/api; "
                         "behind a proxy, its public URL)")
    up.set_defaults(func=_cmd_server_up)
    down = ssub.add_parser("down", help="stop the processes `nds server up` started")
    down.add_argument("--home", help="as given to `nds server up`")
    down.set_defaults(func=_cmd_server_down)
