"""Typed stage parameters, loaded once from `params.yaml` (one section per stage).

Strategy names (extractor, clustering method, expert architecture, weight scheme) are checked
against their registries in nds._registry, so adding a strategy is one registration.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nds._registry import CLUSTERERS, EXPERT_ARCHS, EXTRACTORS, WEIGHT_SCHEMES
from nds.errors import InvalidInputError, NotFoundError
from nds.models.device import check_device_spec, check_precision
from nds.models.experts import EXPERT_INPUT_SIZE, MAX_INPUT_SIZE, MIN_INPUT_SIZE


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _checked(check, value: str) -> str:
    try:
        return check(value, where=None)
    except InvalidInputError as exc:  # pydantic reports a ValueError under the key's name
        raise ValueError(str(exc)) from None


#: Fields that choose where a stage runs, not what it computes on the CPU: left out of the resume
#: cache keys and of bundle.json, so CPU outputs stay byte-identical to before they existed.
RUNTIME_FIELDS = frozenset({"device", "precision", "loader_workers"})


class ExtractParams(_Section):
    extractor: str = "efficientnet_lite0"
    image_size: int = Field(64, ge=16, le=512)
    batch_size: int = Field(128, ge=1, le=8192)
    weights: str | None = None
    #: auto | cpu | cuda | cuda:N ($NDS_DEVICE and --device override it).
    device: str = "auto"
    #: Inference precision on the device: auto (bf16/fp16 autocast on a GPU, fp32 on the CPU) | fp32 | bf16 | fp16.
    precision: str = "auto"
    #: DataLoader reader processes fetching and decoding the originals (at most one per CPU).
    loader_workers: int = Field(4, ge=0, le=64)

    @field_validator("extractor")
    @classmethod
    def _registered(cls, value: str) -> str:
        return EXTRACTORS.check(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _checked(check_device_spec, value)

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        return _checked(check_precision, value)


class ClusterParams(_Section):
    method: str = "dataset-kmeans"
    k: int = Field(24, ge=1)
    #: source-kmeans: about this many samples per cluster, in each source on its own (K = sum of
    #: round(n_source / target_size), at least 1 each), so adding a source leaves the others' clusters.
    target_size: int | None = Field(None, ge=1)
    pca_dim: int = Field(64, ge=0)
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str) -> str:
        return CLUSTERERS.check(value)


class TrainExpertsParams(_Section):
    arch: str = "rotnet_small"
    epochs: int = Field(4, ge=1)
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=4)
    lr: float = Field(0.003, gt=0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    workers: int = Field(2, ge=1)
    seed: int = 0
    #: auto | cpu | cuda | cuda:N ($NDS_DEVICE and --device override it).
    device: str = "auto"
    #: Side of the square images the experts train on (bundle.json ``input_size``; clients score at it).
    #: 32 is the corpus format: the extract stage's pixels. Any other size decodes the originals again.
    image_size: int = Field(EXPERT_INPUT_SIZE, ge=MIN_INPUT_SIZE, le=MAX_INPUT_SIZE)
    #: DataLoader reader processes decoding the originals at a non-default ``image_size`` (at most one per CPU).
    loader_workers: int = Field(4, ge=0, le=64)

    @field_validator("arch")
    @classmethod
    def _registered(cls, value: str) -> str:
        return EXPERT_ARCHS.check(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _checked(check_device_spec, value)


class ComputeWeightsParams(_Section):
    scheme: str = "inverse_cluster_size"

    @field_validator("scheme")
    @classmethod
    def _registered(cls, value: str) -> str:
        return WEIGHT_SCHEMES.check(value)


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
    """Read and validate `params.yaml`; a bad key or value is one clear InvalidInputError."""
    if not path.exists():
        raise NotFoundError(f"{path} not found: run nds from the workspace root or set NDS_ROOT")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return Params.model_validate(raw)
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path} is not valid YAML: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInputError(f"{path}: {where}: {first['msg']} (fix the value in params.yaml)") from exc
