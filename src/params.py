"""Strict, typed view of params.yaml: the one place the pipeline's configuration is defined.

Every section parses into a frozen pydantic model that refuses unknown keys, wrong types and
out-of-range values. `load_params()` turns any problem into a `ParamsError` whose message is one
line naming the key and the value given, e.g.
`params.yaml: train.epochs: Input should be a valid integer, unable to parse string as an integer
(got 'ten')`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML, YAMLError

import atomic
from cli import UserError

PositiveInt = Annotated[int, Field(gt=0)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]


class ParamsError(UserError, ValueError):
    """params.yaml is missing, malformed or out of range; the message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Paths(_Section):
    archive: str
    processed: str
    data_summary: str
    model: str
    checkpoint: str
    history: str
    train_run: str
    metrics: str
    per_class: str
    confusion: str
    figures: str
    best_params: str


PIPELINE = Path(__file__).resolve().parents[1] / "dvc.yaml"


def pipeline_paths() -> Paths:
    """The paths that dvc.yaml's `vars` name (not params: they never vary, and DVC would show
    every param in `dvc exp show`)."""
    try:
        found = [item["paths"] for item in read_yaml(PIPELINE).get("vars", [])
                 if isinstance(item, dict) and "paths" in item]
        return Paths.model_validate(found[0])
    except (AttributeError, IndexError, TypeError, ValidationError) as error:
        raise ParamsError(f"{PIPELINE.name}: vars: paths: missing or not the pipeline's paths "
                          f"({type(error).__name__})") from None


class Data(_Section):
    source: Annotated[str, Field(min_length=1)]
    md5: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    val_size: PositiveInt
    train_limit: PositiveInt | None = None


class Model(_Section):
    filters: Annotated[list[PositiveInt], Field(min_length=1, max_length=5)]
    dense_units: Annotated[list[PositiveInt], Field(min_length=1)]
    dropout: Rate
    l2: Annotated[float, Field(ge=0.0, le=1.0)]


class Augment(_Section):
    flip: bool
    crop: Annotated[int, Field(ge=0, le=16)]
    shift: Annotated[float, Field(ge=0.0, le=0.5)]
    cutout: Annotated[int, Field(ge=0, le=32)]
    mixup: Annotated[float, Field(ge=0.0, le=10.0)]
    cutmix: Annotated[float, Field(ge=0.0, le=10.0)]


class Train(_Section):
    backend: Literal["tensorflow", "jax"]
    epochs: PositiveInt
    batch_size: PositiveInt
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0)]
    momentum: Rate
    nesterov: bool
    weight_decay: Annotated[float, Field(ge=0.0, lt=1.0)]
    lr_schedule: Literal["constant", "cosine"]
    label_smoothing: Rate
    early_stopping_patience: Annotated[int, Field(ge=0)]
    deterministic: bool
    mixed_precision: Literal["auto", "on", "off"]
    distribute: Literal["auto", "none", "data_parallel"]


class Evaluate(_Section):
    batch_size: PositiveInt


class Mlflow(_Section):
    experiment: Annotated[str, Field(min_length=1)]


class Params(_Section):
    seed: Annotated[int, Field(ge=0, lt=2**31)]
    paths: Paths = Field(default_factory=pipeline_paths)  # from dvc.yaml
    data: Data
    model: Model
    augment: Augment
    train: Train
    evaluate: Evaluate
    mlflow: Mlflow
    tune: dict[str, Any] | None = None  # validated by tune.py's own schema, not needed elsewhere


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "missing key"
    elif isinstance(first.get("input"), str | int | float | bool | None):
        message = f"{message} (got {first['input']!r})"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{key}: {message}{more}"


def read_yaml(path: str | Path) -> Any:
    """The YAML document at `path` as plain Python data (YAML 1.2, as DVC reads it)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ParamsError(f"{path}: cannot read: {error.strerror}") from None
    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ParamsError(f"{path}: YAML syntax error{where}: {problem}") from None


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate already-loaded data; raise ParamsError naming the first bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"{source}: {_one_line(error)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    return parse_params(read_yaml(path), source=str(path))


def with_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """A copy of loaded params with dotted keys replaced, e.g. {"train.epochs": 2}."""
    result = copy.deepcopy(raw)
    with_overrides_in_place(result, overrides)
    return result


def update_yaml(path: str | Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys in the YAML file at `path` in place, keeping its comments and layout."""
    yaml = YAML()  # round-trip mode
    yaml.preserve_quotes = True
    document = yaml.load(Path(path))
    with_overrides_in_place(document, overrides)
    with atomic.atomic_path(path) as tmp, open(tmp, "w") as out:
        yaml.dump(document, out)


def with_overrides_in_place(document: Any, overrides: dict[str, Any]) -> None:
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = document
        for section in sections:
            node = node[section]
        if key not in node:
            raise ParamsError(f"{dotted}: unknown key")
        node[key] = value
