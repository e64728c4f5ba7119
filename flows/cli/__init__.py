"""The `nds` command line, the composition root: it wires `nds/` and the Prefect flows together.

One module per command group; each adds its sub-commands with `add_commands(sub)`.

What a failing command prints (stderr), decided here once for every command:

- an error the user can fix (`NDSError`, or a bad argument): one line `error: <message>`,
  exit code 2; the message names the input and the fix;
- anything else (a bug, or a failure NDS did not anticipate): one line
  `error: <type>: <message> (run with -v for the traceback)`, exit code 1;
- with `-v`, the traceback first, then the same line.

Commands check their inputs before any long work starts (decoding images, a Prefect run).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from flows.cli import client, corpus, evaluate, index, select, serve, server, source
from nds.errors import NDSError

GROUPS = (corpus, source, index, select, client, evaluate, server, serve)

#: Exit codes: 2 = input the user can fix (argparse uses 2 too), 1 = unexpected failure.
EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): `error: nds select: argument ...`."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(EXIT_USAGE, f"error: {self.prog}: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nds", description="Neural Data Server: find the source data that helps your task.")
    p.add_argument("--root", help="workspace folder (default: $NDS_ROOT or the current directory)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return p


def one_line(text: str) -> str:
    """A message on one line: its non-empty lines joined with ' | '."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def error_line(exc: BaseException, *, verbose: bool = False) -> str:
    """The one stderr line for an exception (see the module doc)."""
    if isinstance(exc, NDSError):
        return f"error: {one_line(exc)}"
    detail = one_line(exc) or "(no message)"
    hint = "" if verbose else " (run with -v for the traceback)"
    return f"error: {type(exc).__name__}: {detail}{hint}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Keep the console about our work: Prefect's client logs every API request at INFO, and
    # faiss says at INFO which CPU build it loaded (on any command that reads the clusterers),
    # botocore where it found the credentials (on any command that touches S3).
    for noisy in ("httpx", "faiss", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; finished artifacts are kept, rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place every command's failure is reported
        if args.verbose:
            traceback.print_exc()
        print(error_line(exc, verbose=args.verbose), file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, NDSError) else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
