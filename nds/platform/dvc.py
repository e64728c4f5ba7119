"""DVC: the corpus (`data.dvc`) and every stage output (`dvc.lock`) are versioned artifacts.

We drive the `dvc` command line (the stable interface) in the workspace, with analytics and
update checks off. Storage-agnostic: the remote is whatever `.dvc/config` names (a local
folder by default, S3 in a team setup).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from nds.config import Workspace
from nds.errors import NDSError

log = logging.getLogger(__name__)

#: dvc commands touch only local files here; a push to a slow remote gets longer.
DVC_TIMEOUT_S = 1800


def dvc_env() -> dict:
    env = dict(os.environ)
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_NO_UPDATE_CHECK"] = "1"
    # Stage commands call `nds`; make the interpreter's scripts folder win on PATH.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def is_dvc_repo(ws: Workspace) -> bool:
    return (ws.root / ".dvc").is_dir()


def dvc(ws: Workspace, *args: str, timeout: float = DVC_TIMEOUT_S) -> str:
    """Run `dvc ARGS` in the workspace; a failure is an NDSError with dvc's own message."""
    cmd = [sys.executable, "-m", "dvc", *args]
    try:
        r = subprocess.run(cmd, cwd=ws.root, env=dvc_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise NDSError(f"`dvc {' '.join(args)}` took longer than {timeout:.0f}s") from exc
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise NDSError(f"`dvc {' '.join(args)}` failed: {' | '.join(tail)}")
    return r.stdout


def init_repo(ws: Workspace) -> None:
    """`dvc init` (with or without git) and the offline settings, if not a DVC repo yet."""
    if is_dvc_repo(ws):
        return
    dvc(ws, "init", "--no-scm" if not (ws.root / ".git").exists() else "--quiet")
    dvc(ws, "config", "core.analytics", "false")
    dvc(ws, "config", "core.check_update", "false")


def track_corpus(ws: Workspace) -> str | None:
    """`dvc add data` -> data.dvc; returns the corpus md5 (None outside a DVC repo)."""
    if not is_dvc_repo(ws):
        log.info("%s is not a DVC repo; corpus not versioned (run `dvc init`)", ws.root)
        return None
    dvc(ws, "add", "data")
    import yaml

    return (yaml.safe_load((ws.root / "data.dvc").read_text())["outs"][0]).get("md5")


def commit_outputs(ws: Workspace) -> bool:
    """Record the stage outputs a Prefect run produced in dvc.lock (so `dvc repro` is a no-op)."""
    if not is_dvc_repo(ws) or not (ws.root / "dvc.yaml").exists():
        return False
    dvc(ws, "commit", "--force", "--quiet")
    return True


def push(ws: Workspace, *, remote: str | None = None) -> None:
    args = ["push"] + (["--remote", remote] if remote else [])
    dvc(ws, *args)
