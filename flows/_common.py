"""What every stage flow shares: resolving the workspace and its params."""

from __future__ import annotations

from nds.config import Workspace
from nds.params import Params, load_params


def workspace_and_params(root: str | None) -> tuple[Workspace, Params]:
    ws = Workspace.from_env(root)
    return ws, load_params(ws.params_path)
