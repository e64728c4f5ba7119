"""Every deployment in prefect.yaml points at a flow that imports."""

import importlib.util

import yaml
from prefect import Flow

from conftest import REPO


def test_every_entrypoint_imports():
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert doc["deployments"]
    for dep in doc["deployments"]:
        path, func = dep["entrypoint"].split(":")
        spec = importlib.util.spec_from_file_location(f"entry_{func}", REPO / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert isinstance(getattr(module, func), Flow), dep["name"]


def test_index_schedule_comes_from_params_and_ships_inactive():
    from nds.params import load_params
    from nds.platform.prefect_server import schedule_env

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    index = next(d for d in doc["deployments"] if d["name"] == "index")
    assert index["schedules"] == [{"cron": "{{ $NDS_INDEX_CRON }}", "timezone": "{{ $NDS_INDEX_TIMEZONE }}",
                                   "active": "{{ $NDS_INDEX_SCHEDULE_ACTIVE }}"}]
    sched = load_params(REPO / "params.yaml").schedule
    assert sched.active is False
    assert schedule_env(REPO) == {"NDS_INDEX_CRON": sched.index_cron, "NDS_INDEX_TIMEZONE": sched.timezone,
                                  "NDS_INDEX_SCHEDULE_ACTIVE": "false"}
