"""The MLflow Model Registry: every evaluated pipeline run's model is a version of one registered
model, named after `mlflow.experiment`; the alias `champion` marks the version to use.

    models:/cifar10-alexnet@champion          # what `mlflow models serve` and predict.py load

`register` (called by the evaluate stage) makes the run's logged model a new version, once per
run: a resumed or re-evaluated run finds its version and registers nothing. Each version carries
the git commit, the data md5, the DVC experiment name, the Keras backend and its validation
accuracy, honest gap and test accuracy as tags, and a description of its configuration (the
params that differ from the seed's). The first version of a fresh registry becomes `champion`;
after that only `promote` (src/promote.py) moves the alias, choosing on validation accuracy among
the versions within `tune.max_gap`, never on test accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from cli import UserError
from dblock import DatabaseLock

ALIAS = "champion"
SCORES = ("val_accuracy", "honest_gap", "test_accuracy")
RUN_TAGS = {"git.commit": "git.commit", "data.md5": "data.md5", "dvc.exp_name": "dvc.exp_name",
            "keras.backend": "keras.backend", "code.training": "code.training"}

DESCRIPTION = ("The AlexNet-style CNN on CIFAR-10: one version per evaluated pipeline run "
               "(`dvc repro`, `dvc exp run`), tagged with its scores and provenance. "
               "@champion is the one to use: `python src/promote.py` moves it to the best "
               "validation accuracy within tune.max_gap, or `--version N`.")

# The seed experiment's configuration (its write-up): what a version's description is compared to.
SEED = {"seed": 42, "model.dropout": 0.1, "model.l2": 0.0, "model.filters": [64, 128, 256, 512],
        "model.dense_units": [128, 256, 512, 1024], "augment.flip": False, "augment.crop": 0,
        "augment.shift": 0.0, "augment.cutout": 0, "augment.mixup": 0.0, "augment.cutmix": 0.0,
        "train.epochs": 50, "train.batch_size": 32, "train.learning_rate": 0.01,
        "train.momentum": 0.0, "train.nesterov": False, "train.weight_decay": 0.0,
        "train.lr_schedule": "constant", "train.label_smoothing": 0.0,
        "train.early_stopping_patience": 0, "data.train_images": 40000}


def describe(params: dict[str, str]) -> str:
    """What configuration a run is: its logged params that differ from the seed's."""
    differ = []
    for key, seed in SEED.items():
        logged = params.get(key)
        if logged is not None and logged.lower() != str(seed).lower():
            differ.append(f"{key}={logged}")
    if not differ:
        return "The seed's configuration."
    return "Differs from the seed's configuration in: " + ", ".join(differ) + "."


@dataclass(frozen=True)
class Registered:
    version: ModelVersion
    new: bool
    champion: bool


def versions(name: str) -> list[ModelVersion]:
    client = mlflow.tracking.MlflowClient()
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda v: int(v.version))


def champion(name: str) -> ModelVersion | None:
    try:
        return mlflow.tracking.MlflowClient().get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def register(run_id: str, name: str, metrics: dict[str, float]) -> Registered:
    """The run's model as a version of `name` (once per run); champion if it is the first."""
    client = mlflow.tracking.MlflowClient()
    with DatabaseLock(mlflow.get_tracking_uri(), "mlflow-registry"):  # two evaluations at once
        mine = [v for v in versions(name) if v.run_id == run_id]
        if mine:
            return Registered(mine[0], new=False, champion=_is_champion(name, mine[0]))
        run = client.get_run(run_id)
        tags = {tag: run.data.tags[key] for key, tag in RUN_TAGS.items() if key in run.data.tags}
        tags |= {key: f"{metrics[key]:.4f}" for key in SCORES}
        first = not versions(name)
        version = mlflow.register_model(model_uri(run), name, tags=tags)
        client.update_model_version(name, version.version, description=describe(run.data.params))
        if first:
            client.set_registered_model_alias(name, ALIAS, version.version)
            client.update_registered_model(name, description=DESCRIPTION)
        return Registered(client.get_model_version(name, version.version), new=True,
                          champion=first)


def model_uri(run: Run) -> str:
    """The run's model by its MLflow 3 id (`models:/m-...`), the last one it logged.
    `runs:/<run>/model` names no artifact in MLflow 3: registering it finds the same model
    through a fallback that prints a warning on every evaluation."""
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        return f"runs:/{run.info.run_id}/model"
    return f"models:/{max(outputs, key=lambda output: output.step).model_id}"


def _is_champion(name: str, version: ModelVersion) -> bool:
    current = champion(name)
    return current is not None and current.version == version.version


def best_version(name: str, max_gap: float | None) -> ModelVersion:
    """The version with the best validation accuracy among those within `max_gap` (test
    accuracy is never read)."""
    candidates = []
    for version in versions(name):
        try:
            val, gap = (float(version.tags[key]) for key in ("val_accuracy", "honest_gap"))
        except (KeyError, ValueError):
            continue  # registered by hand, without the pipeline's scores
        if max_gap is None or gap <= max_gap:
            candidates.append((val, -gap, int(version.version), version))
    if not candidates:
        limit = f" within tune.max_gap {max_gap}" if max_gap is not None else ""
        raise UserError(f"no version of {name!r} has a validation accuracy and honest gap"
                        f"{limit}: nothing to promote")
    return max(candidates, key=lambda c: c[:3])[3]


def version(name: str, number: str | int) -> ModelVersion:
    """Version `number` of `name`; a one-line error naming the versions there are if none."""
    try:
        return mlflow.tracking.MlflowClient().get_model_version(name, str(number))
    except MlflowException:
        known = ", ".join(str(v.version) for v in versions(name)) or "none"
        raise UserError(f"{name!r} has no version {number} (versions: {known})") from None


def promote(name: str, number: str | int) -> tuple[ModelVersion | None, ModelVersion]:
    """Point `champion` at version `number`; return (the previous champion, the new one)."""
    target = version(name, number)
    before = champion(name)
    mlflow.tracking.MlflowClient().set_registered_model_alias(name, ALIAS, target.version)
    return before, target
