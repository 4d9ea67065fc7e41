"""Strict, typed view of params.yaml: the one place the pipeline's configuration is defined.

Every section, `tune` among them, parses into a frozen pydantic model that refuses unknown keys,
wrong types and out-of-range values. `load_params()` turns any problem into a `ParamsError` whose
message is one line naming the key and the value given, e.g.
`params.yaml: train.epochs: Input should be a valid integer, unable to parse string as an integer
(got 'ten')`.

The `tune` section's search space is checked against the other sections' schemas: every space key
is a `model`, `augment` or `train` param, a range needs a numeric one, and both ends, a few points
between them and every choice must be values that param accepts (a mistyped entry is a one-line
error naming its key, not a failed trial). `parse_tune` reads the section with `tune.py`'s flags
over it; an error names the flag when the bad value came from one.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
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


# the sections a study may search: a space key is `section.name` of one of them
TUNABLE = {"model": Model, "augment": Augment, "train": Train}
Value = bool | int | float | str


class Range(_Section):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError("needs low < high (and low > 0 with log)")
        return self


class Choice(_Section):
    choices: Annotated[list[Value], Field(min_length=1)]


# a study's companion, which confirms its best trials (confirmation.py)
CONFIRM_SUFFIX = "-confirm"


class Tune(_Section):
    study_name: Annotated[str, Field(min_length=1)]
    storage: str | None
    n_trials: PositiveInt
    timeout: Annotated[float, Field(gt=0)] | None
    epochs: PositiveInt
    train_limit: PositiveInt | None
    multi_objective: bool
    front_end: Literal["accuracy", "gap"]  # the Pareto front's end confirmed (or the winner)
    sampler: Literal["tpe", "random"]
    pruner: Literal["hyperband", "median", "none"]
    min_epochs: PositiveInt
    heartbeat_interval: PositiveInt
    grace_period: PositiveInt
    max_retry: Annotated[int, Field(ge=0)]
    max_gap: Annotated[float, Field(gt=0.0, le=1.0)] | None
    # how much an honest gap grows from a short trial to the pipeline's length: a short trial is
    # held to max_gap / gap_growth (a trial of the pipeline's length, a confirmation, to max_gap)
    gap_growth: Annotated[float, Field(gt=0.0)]
    confirm: Annotated[int, Field(ge=0)]  # best trials trained again at the pipeline's length
    lr_reference_batch: PositiveInt | None
    space: dict[str, Range | Choice]
    recipe: dict[str, Value] | None  # the first trial of a new study (None: none enqueued)
    # the next trials of a new study: the recipe, each with these changes
    variants: list[Annotated[dict[str, Value], Field(min_length=1)]]

    @property
    def trial_max_gap(self) -> float | None:
        """The honest-gap limit this study's trials are held to (None: no limit)."""
        return None if self.max_gap is None else round(self.max_gap / self.gap_growth, 4)

    @property
    def gap_limit(self) -> str:
        """That limit as reports say it: where it comes from."""
        if self.gap_growth == 1.0 or self.max_gap is None:
            return f"tune.max_gap {self.max_gap}"
        return (f"{self.trial_max_gap} (tune.max_gap {self.max_gap} / tune.gap_growth "
                f"{self.gap_growth})")

    @field_validator("study_name")
    @classmethod
    def _not_a_companion(cls, name: str) -> str:
        if name.endswith(CONFIRM_SUFFIX):
            raise ValueError(f"{name!r} ends in {CONFIRM_SUFFIX!r}, which names the companion "
                             "study that confirms a study's best trials")
        return name

    @model_validator(mode="after")
    def _keys_exist(self) -> Tune:
        for key in self.space:
            section, _, name = key.partition(".")
            if section not in TUNABLE or name not in TUNABLE[section].model_fields:
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


class Params(_Section):
    seed: Annotated[int, Field(ge=0, lt=2**31)]
    paths: Paths = Field(default_factory=pipeline_paths)  # from dvc.yaml
    data: Data
    model: Model
    augment: Augment
    train: Train
    evaluate: Evaluate
    mlflow: Mlflow
    tune: Tune | None = None  # read by tune.py only; the pipeline runs without it


def param_type(key: str) -> Any:
    """The type a tunable param's schema declares, e.g. `int` for "train.batch_size"."""
    section, _, name = key.partition(".")
    return TUNABLE[section].model_fields[name].annotation


def _where(error: ValidationError) -> tuple[tuple[str, ...], str]:
    """(the key's path, the message) of the first error, the message with the value given."""
    first = error.errors()[0]
    path = tuple(str(part) for part in first["loc"] if part not in ("Range", "Choice"))
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "missing key"
    elif first["type"] == "value_error":  # our validators' own messages name the value
        message = str(first["ctx"]["error"])
    elif isinstance(first.get("input"), str | int | float | bool | None):
        message = f"{message} (got {first['input']!r})"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return path, message + more


def _one_line(error: ValidationError) -> str:
    path, message = _where(error)
    return f"{'.'.join(path) or '(top level)'}: {message}"


def _probes(key: str, spec: Range | Choice, source: str) -> list:
    """The values of a space entry that must validate: every choice; a range's ends and inside."""
    if isinstance(spec, Choice):
        return list(spec.choices)
    kind = param_type(key)
    if kind not in (int, float):
        raise ParamsError(f"{source}: tune.space.{key}: a range needs a numeric param; list the "
                          "values as choices")
    if kind is int and not (float(spec.low).is_integer() and float(spec.high).is_integer()):
        raise ParamsError(f"{source}: tune.space.{key}: an integer param needs whole numbers "
                          "for low and high")
    if spec.log:
        low, high = math.log(spec.low), math.log(spec.high)
        points = [math.exp(low + (high - low) * i / 4) for i in range(5)]
    else:
        points = [spec.low + (spec.high - spec.low) * i / 4 for i in range(5)]
    points = [spec.low, spec.high, *points[1:-1]]  # exactly the ends (no rounding), first
    return [round(p) for p in points] if kind is int else points


def _check_space(params: Params, source: str) -> None:
    """Refuse a space entry whose values the params schema would refuse inside a trial."""
    for key, spec in params.tune.space.items():
        section, _, name = key.partition(".")
        values = getattr(params, section).model_dump()
        for value in _probes(key, spec, source):
            try:
                TUNABLE[section].model_validate({**values, name: value})
            except ValidationError as error:
                raise ParamsError(f"{source}: tune.space.{key}: value {value!r} is refused "
                                  f"({section}.{_one_line(error)})") from None


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


def parse_params(raw: Any, source: str = "params.yaml", flags: Any = ()) -> Params:
    """Validate already-loaded data; raise ParamsError naming the first bad key, or as
    `--flag-name` a key of the tune section listed in `flags` (a command-line flag's value)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        path, message = _where(error)
        if path[:1] == ("tune",) and len(path) > 1 and path[1] in flags:
            raise ParamsError(f"--{path[1].replace('_', '-')}: {message}") from None
        raise ParamsError(f"{source}: {'.'.join(path) or '(top level)'}: {message}") from None
    if params.tune is not None:
        _check_space(params, source)
    return params


def parse_tune(raw: Any, flags: dict[str, Any] | None = None,
               source: str = "params.yaml") -> Tune:
    """The `tune` section of loaded params.yaml with `flags` over its keys (tune.py's
    `--key-name` flags), validated with the whole file."""
    section = raw.get("tune") if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ParamsError(f"{source}: tune: missing section (see the project's params.yaml)")
    flags = flags or {}
    return parse_params({**raw, "tune": {**section, **flags}}, source, flags).tune


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"dropout": 0.3}} -> {"model.dropout": 0.3}: dotted keys, as `-S` takes them."""
    flat = {}
    for key, value in (node.items() if isinstance(node, dict) else ()):
        name = f"{prefix}{key}"
        flat |= flatten(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return flat


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
