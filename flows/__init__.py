"""Prefect flows: thin orchestration over `nds/` (one file per dvc.yaml stage, plus `index`).

Analytics off and a patient ephemeral-server start, for runs started outside the repository
root too (where pyproject's [tool.prefect] is not read). Set before Prefect is imported.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
