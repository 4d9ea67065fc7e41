"""The `tune` section of params.yaml: study settings and a search space over params keys.

Every space entry is a dotted key of the `model` or `train` section, so any sampled point is a
set of `dvc exp run -S key=value` overrides; sampled values are validated by the params schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from params import Augment, Model, Params, ParamsError, Train, parse_params, with_overrides

SECTIONS = {"model": Model, "augment": Augment, "train": Train}
Value = bool | int | float | str


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Range(_Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError("needs low < high (and low > 0 with log)")
        return self


class Choice(_Strict):
    choices: Annotated[list[bool | int | float | str], Field(min_length=1)]


class Tune(_Strict):
    study_name: Annotated[str, Field(min_length=1)]
    storage: str | None
    n_trials: Annotated[int, Field(gt=0)]
    timeout: Annotated[float, Field(gt=0)] | None
    epochs: Annotated[int, Field(gt=0)]
    train_limit: Annotated[int, Field(gt=0)] | None
    multi_objective: bool
    sampler: Literal["tpe", "random"]
    pruner: Literal["hyperband", "median", "none"]
    min_epochs: Annotated[int, Field(gt=0)]
    heartbeat_interval: Annotated[int, Field(gt=0)]
    grace_period: Annotated[int, Field(gt=0)]
    max_retry: Annotated[int, Field(ge=0)]
    max_gap: Annotated[float, Field(gt=0.0, le=1.0)] | None
    lr_reference_batch: Annotated[int, Field(gt=0)] | None
    space: dict[str, Range | Choice]
    recipe: dict[str, Value] | None  # the first trial of a new study (None: none enqueued)

    @model_validator(mode="after")
    def _keys_exist(self) -> Tune:
        for key in self.space:
            section, _, name = key.partition(".")
            if section not in SECTIONS or name not in SECTIONS[section].model_fields:
                raise ValueError(f"space key {key!r} is not a model.*, augment.* or train.* "
                                 "param")
        if self.recipe is None:
            return self
        missing = set(self.recipe) ^ set(self.space)
        if missing:
            raise ValueError(f"recipe and space must name the same keys; differ in "
                             f"{sorted(missing)}")
        for key, value in self.recipe.items():
            spec = self.space[key]
            inside = (value in spec.choices if isinstance(spec, Choice)
                      else spec.low <= value <= spec.high)
            if not inside:
                raise ValueError(f"recipe value {key}: {value!r} is outside the space")
        return self


def parse_tune(raw: dict) -> Tune:
    section = raw.get("tune")
    if not isinstance(section, dict):
        raise ParamsError("params.yaml: tune: missing section")
    try:
        return Tune.model_validate(section)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in ("Range", "Choice"))
        raise ParamsError(f"params.yaml: tune.{where}: {first['msg']}") from None


def _is_int(key: str) -> bool:
    section, _, name = key.partition(".")
    return SECTIONS[section].model_fields[name].annotation is int


def sample(trial: optuna.Trial, space: dict[str, Range | Choice]) -> dict[str, Any]:
    """One point of the space: {dotted key: value}."""
    point = {}
    for key, spec in space.items():
        if isinstance(spec, Choice):
            point[key] = trial.suggest_categorical(key, spec.choices)
        elif _is_int(key):
            point[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
        else:
            point[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
    return point


def overrides(point: dict[str, Any], tune: Tune) -> dict[str, Any]:
    """The params values of a sampled point: with `tune.lr_reference_batch`, the sampled rate is
    the one for that batch size, and the trial's rate scales linearly with its batch size."""
    values = dict(point)
    batch = values.get("train.batch_size")
    if tune.lr_reference_batch and batch and "train.learning_rate" in values:
        values["train.learning_rate"] = (values["train.learning_rate"] * batch
                                         / tune.lr_reference_batch)
    return values


def trial_params(raw: dict, point: dict[str, Any], tune: Tune) -> Params:
    """The full, validated params of a trial: params.yaml + the point + the trial budget."""
    return parse_params(with_overrides(raw, {**overrides(point, tune),
                                             "train.epochs": tune.epochs}))


def as_nested(point: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{"model.dropout": 0.3} -> {"model": {"dropout": 0.3}}: the params.yaml layout."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in point.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    return nested


def exp_run_command(point: dict[str, Any]) -> str:
    def show(value):
        return str(value).lower() if isinstance(value, bool) else repr(value).strip("'")

    return "dvc exp run " + " ".join(f"-S {key}={show(v)}" for key, v in point.items())
