"""The parameters of one transfer evaluation: the ``evaluate`` flow's form and the CLI's request."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nds._registry import EVAL_STRATEGIES, SCORERS
from nds.errors import InvalidInputError
from nds.evaluate.runner import resolve_budgets
from nds.evaluate.tasks import TASKS, TargetTask, load_target_task
from nds.evaluate.training import TrainConfig


class EvaluateRequest(BaseModel):
    """Parameters of one transfer evaluation (the Prefect UI renders this as a form)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: ["digits"],
                             description=f"Built-in target tasks: {', '.join(TASKS)}.")
    train_dir: str | None = Field(None, description="Or: your own labelled train ImageFolder (with test_dir).")
    test_dir: str | None = Field(None, description="Your own labelled test ImageFolder.")
    budgets: list[float] = Field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2],
                                 description="Counts (>= 1) or fractions (< 1) of the indexed source.")
    strategies: list[str] = Field(default_factory=EVAL_STRATEGIES.names)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    shots: int = Field(10, ge=1, description="Labelled train images per class of a built-in task.")
    test_per_class: int = Field(50, ge=1)
    temperature: float | None = Field(None, gt=0, description="Selection temperature (default: the server's).")
    scorer: str | None = Field(None, description="How the nds strategy scores the experts on the train images: "
                               "rotation, features, combined, linear or logme (nds client score --mode); "
                               "default: what `nds client score` uses for the index's bundle.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    out_dir: str | None = Field(None, description="Output folder (default: evaluations/<evaluation id>).")

    @field_validator("budgets")
    @classmethod
    def _valid_budgets(cls, value: list[float]) -> list[float]:
        # Checked when the form is submitted, by the run's own parser against an unbounded
        # source (the index size is checked when the run starts). Its InvalidInputError is a
        # ValueError, which pydantic reports as a validation error of this field.
        resolve_budgets(value, sys.maxsize)
        return value

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown target task(s) {unknown}; choose from: {', '.join(TASKS)}")
        return value

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, value: str | None) -> str | None:
        if value is not None and value not in SCORERS:
            raise ValueError(f"unknown scorer {value!r}; choose from: {', '.join(SCORERS.names())}")
        return value

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, value: list[str]) -> list[str]:
        if not value or set(value) - set(EVAL_STRATEGIES.names()):
            raise ValueError(f"strategies must be some of: {', '.join(EVAL_STRATEGIES.names())}")
        return value

    def target_tasks(self) -> list[str | TargetTask]:
        if (self.train_dir is None) != (self.test_dir is None):
            raise InvalidInputError("give both train_dir and test_dir for your own target, or neither")
        if self.train_dir is not None:
            return [load_target_task(Path(self.train_dir), Path(self.test_dir),
                                     name=Path(self.train_dir).resolve().parent.name or "custom")]
        return list(self.tasks)


#: The `--quick` profile: one task, one seed, two budgets and short training (tests, smoke runs).
QUICK = {
    "tasks": ["digits"], "budgets": [0.1, 0.3], "seeds": [0], "shots": 2, "test_per_class": 10,
    "train": TrainConfig(pretrain_epochs=None, pretrain_steps=30, pretrain_batch=64, finetune_steps=25,
                         finetune_batch=32),
}


def quick_request(**overrides) -> EvaluateRequest:
    return EvaluateRequest(**{**QUICK, **overrides})
