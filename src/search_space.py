"""The search space of the `tune` section of params.yaml: sampling it, and a point as params.

Every space entry is a dotted key of the `model`, `augment` or `train` section, so any sampled
point is a set of `dvc exp run -S key=value` overrides. What the section may hold, the space
included, is params.py's schema (`parse_tune`); this module turns its space into Optuna's
suggestions and a sampled point into a trial's params.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from params import Choice, Params, Range, Tune, param_type, parse_params, with_overrides


def _is_int(key: str) -> bool:
    return param_type(key) is int


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


# how a run trains, not what: runs (and a study's invocations) may differ in these
HOW = {"train.backend", "train.deterministic", "train.mixed_precision", "train.distribute"}


def fixed_params(raw: dict, tune: Tune) -> dict[str, Any]:
    """What every trial of a study trains with besides its point and its epochs: the seed, the
    data and the params outside the space (how it runs, `HOW`, left out)."""
    params = parse_params(raw)
    flat = {"seed": params.seed, "data.md5": params.data.md5,
            "data.val_size": params.data.val_size}
    for section in ("model", "augment", "train"):
        flat |= {f"{section}.{key}": value for key, value
                 in getattr(params, section).model_dump(mode="json").items()}
    return {key: value for key, value in flat.items()
            if key not in tune.space and key not in HOW and key != "train.epochs"}


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
