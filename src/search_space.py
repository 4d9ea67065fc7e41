"""The `tune` section of params.yaml: study settings and a search space over params keys.

Every space entry is a dotted key of the `model` or `train` section, so any sampled point is a
set of `dvc exp run -S key=value` overrides. The space is checked against the params schema before
any trial runs: a range needs a numeric param, and both ends, a few points between them and every
choice must pass the schema (a mistyped entry is a one-line error naming its key, not a failed
trial).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
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
    # the next trials of a new study: the recipe, each with these changes
    variants: list[Annotated[dict[str, Value], Field(min_length=1)]]

    @model_validator(mode="after")
    def _keys_exist(self) -> Tune:
        for key in self.space:
            section, _, name = key.partition(".")
            if section not in SECTIONS or name not in SECTIONS[section].model_fields:
                raise ValueError(f"space key {key!r} is not a model.*, augment.* or train.* "
                                 "param")
        if self.recipe is None:
            if self.variants:
                raise ValueError("variants change the recipe: they need a recipe")
            return self
        missing = set(self.recipe) ^ set(self.space)
        if missing:
            raise ValueError(f"recipe and space must name the same keys; differ in "
                             f"{sorted(missing)}")
        self._inside("recipe", self.recipe)
        for number, variant in enumerate(self.variants):
            self._inside(f"variant {number}", variant)
        return self

    def contains(self, key: str, value: Value) -> bool:
        """Whether `value` is one of the space's values for `key`."""
        spec = self.space[key]
        return (value in spec.choices if isinstance(spec, Choice)
                else spec.low <= value <= spec.high)

    def _inside(self, what: str, point: dict[str, Value]) -> None:
        for key, value in point.items():
            if key not in self.space:
                raise ValueError(f"{what}: {key!r} is not a key of the space")
            if not self.contains(key, value):
                raise ValueError(f"{what} value {key}: {value!r} is outside the space")

    def starting_points(self) -> list[dict[str, Value]]:
        """What a new study runs first, in order: the recipe, then each variant of it."""
        if self.recipe is None:
            return []
        return [self.recipe, *({**self.recipe, **variant} for variant in self.variants)]


def parse_tune(raw: dict, overrides: dict[str, Any] | None = None) -> Tune:
    """The `tune` section of loaded params.yaml with `overrides` of its keys (the command-line
    flags `--key-name` of tune.py), space checked. An error names the flag when the bad value
    came from one, otherwise the params.yaml key; with the value given."""
    section = raw.get("tune")
    if not isinstance(section, dict):
        raise ParamsError("params.yaml: tune: missing section (see the project's params.yaml)")
    overrides = overrides or {}
    try:
        tune = Tune.model_validate({**section, **overrides})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in ("Range", "Choice"))
        given = first.get("input")
        got = f" (got {given!r})" if isinstance(given, str | int | float | bool | None) else ""
        if first["loc"] and first["loc"][0] in overrides:
            flag = "--" + str(first["loc"][0]).replace("_", "-")
            raise ParamsError(f"{flag}: {first['msg']}{got}") from None
        raise ParamsError(f"params.yaml: tune.{where}: {first['msg']}{got}") from None
    check_space(raw, tune)
    return tune


def _annotation(key: str) -> Any:
    section, _, name = key.partition(".")
    return SECTIONS[section].model_fields[name].annotation


def _is_int(key: str) -> bool:
    return _annotation(key) is int


def _probes(key: str, spec: Range | Choice) -> list:
    """The values of an entry that must validate: every choice; a range's ends and inside."""
    if isinstance(spec, Choice):
        return list(spec.choices)
    if _annotation(key) not in (int, float):
        raise ParamsError(f"params.yaml: tune.space.{key}: a range needs a numeric param; "
                          "list the values as choices")
    if _is_int(key) and not (float(spec.low).is_integer() and float(spec.high).is_integer()):
        raise ParamsError(f"params.yaml: tune.space.{key}: an integer param needs whole "
                          "numbers for low and high")
    if spec.log:
        low, high = math.log(spec.low), math.log(spec.high)
        points = [math.exp(low + (high - low) * i / 4) for i in range(5)]
    else:
        points = [spec.low + (spec.high - spec.low) * i / 4 for i in range(5)]
    points = [spec.low, spec.high, *points[1:-1]]  # exactly the ends (no rounding), first
    return [round(p) for p in points] if _is_int(key) else points


def check_space(raw: dict, tune: Tune) -> None:
    """Refuse a space entry whose values the params schema would refuse inside a trial."""
    parse_params(raw)  # a broken params.yaml is reported as itself, not blamed on the space
    for key, spec in tune.space.items():
        for value in _probes(key, spec):
            try:
                parse_params(with_overrides(raw, {key: value, "train.epochs": tune.epochs}))
            except ParamsError as error:
                reason = str(error).removeprefix("params.yaml: ")
                raise ParamsError(f"params.yaml: tune.space.{key}: value {value!r} is refused "
                                  f"({reason})") from None


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


def distributions(space: dict[str, Range | Choice]) -> dict[str, BaseDistribution]:
    """What `sample` suggests from, per key (what a trial added from outside must carry)."""
    return {key: CategoricalDistribution(spec.choices) if isinstance(spec, Choice)
            else IntDistribution(int(spec.low), int(spec.high), log=spec.log) if _is_int(key)
            else FloatDistribution(spec.low, spec.high, log=spec.log)
            for key, spec in space.items()}


def overrides(point: dict[str, Any], tune: Tune) -> dict[str, Any]:
    """The params values of a sampled point: with `tune.lr_reference_batch`, the sampled rate is
    the one for that batch size, and the trial's rate scales linearly with its batch size."""
    values = dict(point)
    batch = values.get("train.batch_size")
    if tune.lr_reference_batch and batch and "train.learning_rate" in values:
        values["train.learning_rate"] = (values["train.learning_rate"] * batch
                                         / tune.lr_reference_batch)
    return values


def as_sampled(values: dict[str, Any], tune: Tune) -> dict[str, Any]:
    """The inverse of `overrides`: the point a trial samples to train with these values."""
    point = dict(values)
    batch = point.get("train.batch_size")
    if tune.lr_reference_batch and batch and "train.learning_rate" in point:
        point["train.learning_rate"] = (point["train.learning_rate"] * tune.lr_reference_batch
                                        / batch)
    return point


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
