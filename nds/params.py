"""Typed stage parameters, loaded once from `params.yaml` (one section per stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nds.errors import NDSError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExtractParams(_Section):
    extractor: str = "efficientnet_lite0"
    image_size: int = Field(64, ge=16, le=512)
    batch_size: int = Field(128, ge=1, le=8192)
    weights: str | None = None


class ClusterParams(_Section):
    method: Literal["kmeans", "dataset-kmeans", "kmeans-faiss", "dataset", "label"] = "dataset-kmeans"
    k: int = Field(24, ge=1)
    pca_dim: int = Field(64, ge=0)
    seed: int = 0


class TrainExpertsParams(_Section):
    arch: str = "rotnet_small"
    epochs: int = Field(4, ge=1)
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=4)
    lr: float = Field(0.003, gt=0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    workers: int = Field(2, ge=1)
    seed: int = 0


class ComputeWeightsParams(_Section):
    scheme: Literal["inverse_cluster_size"] = "inverse_cluster_size"


class ScheduleParams(_Section):
    """When the `index` deployment runs (`nds server up` deploys it with these values)."""

    index_cron: str = "0 3 * * 0"
    timezone: str = "UTC"
    active: bool = False

    @field_validator("index_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"{value!r} is not a 5-field cron expression (minute hour day month weekday), "
                             "e.g. '0 3 * * 0'")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}: use an IANA name such as 'UTC' or 'Europe/Berlin'") from None
        return value


class Params(_Section):
    extract: ExtractParams = ExtractParams()
    cluster: ClusterParams = ClusterParams()
    train_experts: TrainExpertsParams = TrainExpertsParams()
    compute_weights: ComputeWeightsParams = ComputeWeightsParams()
    schedule: ScheduleParams = ScheduleParams()


def load_params(path: Path) -> Params:
    """Read and validate `params.yaml`; a bad key or value is one clear NDSError."""
    if not path.exists():
        raise NDSError(f"{path} not found: run nds from the workspace root or set NDS_ROOT")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return Params.model_validate(raw)
    except yaml.YAMLError as exc:
        raise NDSError(f"{path} is not valid YAML: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise NDSError(f"{path}: {where}: {first['msg']} (fix the value in params.yaml)") from exc
