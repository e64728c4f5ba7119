"""The `nds` command line, the composition root: it wires `nds/` and the Prefect flows together.

One module per command group; each adds its sub-commands with `add_commands(sub)`. Errors a
user can fix are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from flows.cli import client, corpus, evaluate, index, select, server
from nds.errors import NDSError

GROUPS = (corpus, index, select, client, evaluate, server)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nds", description="Neural Data Server: find the source data that helps your task.")
    p.add_argument("--root", help="workspace folder (default: $NDS_ROOT or the current directory)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
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
