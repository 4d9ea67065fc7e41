"""Stage `evaluate`: test the saved model; report accuracy, per-class figures and the honest gap.

    python src/evaluate.py       # reads `evaluate.batch_size` and the paths

The honest generalization gap is the accuracy on the training images evaluated in inference mode
(no dropout, no augmentation) minus the validation accuracy; the in-training gap from the history
(`gap` per epoch, `worst_gap` its largest) understates it once dropout or augmentation is on.
`train_accuracy_inference` is that accuracy on the training images; the history's `accuracy` is
the one measured while training (dropout and augmentation on). Writes `reports/metrics.json`,
`reports/per_class.json` (test accuracy per class), `reports/confusion.csv` (one row per test
image, for `dvc plots`) and PNG figures, and logs them to the MLflow run that `train` opened, with
a description (key figures, what differs from the seed), whose model it then registers as a new
version of the registered model `mlflow.experiment` (registry.py). Figures are rounded to 6
places. `test_loss` and
`val_loss` are plain categorical cross-entropy (no label smoothing, no weight decay), so they
compare across configurations; the training history's losses are the objective as trained.
"""

from __future__ import annotations

import backend  # noqa: F401  (first: sets KERAS_BACKEND from params.yaml)

# isort: split

import json
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

import atomic
import cli
import figures
import registry
import tracking
from cifar import CLASSES, load_split
from params import Params, load_params
from scoring import gap, predict, scores


def training_run(train_run: str) -> str:
    """The id of the MLflow run that `train` recorded in `train_run`, checked to exist in the
    configured store (a clone gets train.json from git but not the store it names)."""
    try:
        run_id = json.loads(Path(train_run).read_text())["mlflow_run_id"]
    except FileNotFoundError:
        raise cli.StageError(f"{train_run} is missing: run `dvc repro train`") from None
    except (ValueError, KeyError, TypeError):
        raise cli.StageError(f"{train_run}: no mlflow_run_id; run `dvc repro -f train`") from None
    try:
        mlflow.tracking.MlflowClient().get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise cli.StageError(
            f"{train_run} names MLflow run {run_id}, which the tracking store "
            f"{mlflow.get_tracking_uri()} does not have: run `dvc repro -f train`, or point "
            "MLFLOW_TRACKING_URI at the store that has it") from None
    return run_id


KEY_FIGURES = ("test_accuracy", "honest_gap", "val_accuracy")


def description(logged_params: dict[str, str], metrics: dict[str, float]) -> str:
    """The run's description in the MLflow UI: its key figures and what differs from the seed."""
    figures = ", ".join(f"{key} {metrics[key]:.4f}" for key in KEY_FIGURES)
    return f"{figures}. {registry.describe(logged_params)}"


def evaluate(params: Params) -> dict:
    backend.check(params.train.backend)
    paths, batch = params.paths, params.evaluate.batch_size
    tracking.configure(params.mlflow.experiment)
    run_id = training_run(paths.train_run)  # before any output is written
    if not Path(paths.model).is_file():
        raise cli.StageError(f"{paths.model} is missing: run `dvc repro train`")
    model = keras.models.load_model(paths.model, safe_mode=True)
    splits = {name: load_split(paths.processed, name) for name in ("train", "val", "test")}
    probabilities = {name: predict(model, split, batch) for name, split in splits.items()}
    (_, train_acc), (val_loss, val_acc), (test_loss, test_acc) = (
        scores(probabilities[name], splits[name].labels) for name in ("train", "val", "test"))
    test = splits["test"]
    predicted = np.argmax(probabilities["test"], axis=1)
    matrix = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(matrix, (test.labels, predicted), 1)
    history = pd.read_csv(paths.history)
    metrics = tracking.rounded({  # in the order `dvc exp show` shows them: compared first
        "test_accuracy": test_acc, "honest_gap": gap(train_acc, val_acc), "val_accuracy": val_acc,
        "test_loss": test_loss, "val_loss": val_loss, "train_accuracy_inference": train_acc,
        "worst_gap": float(history["gap"].max())})
    per_class = tracking.rounded({f"test_accuracy.{cls}": matrix[i, i] / max(1, matrix[i].sum())
                                  for i, cls in enumerate(CLASSES)})
    confusion = pd.DataFrame({"actual": [CLASSES[i] for i in test.labels],
                              "predicted": [CLASSES[i] for i in predicted]})
    with atomic.atomic_path(paths.confusion) as tmp:
        confusion.to_csv(tmp, index=False)
    with atomic.atomic_dir(paths.figures) as tmp:
        figures.learning_curves(history, tmp / "learning_curves.png")
        figures.confusion_matrix(matrix, CLASSES, tmp / "confusion_matrix.png")
    atomic.write_json(paths.metrics, metrics)
    # a file of its own, not a metrics file: ten columns that would push the params a user
    # compares off `dvc exp show`; flattened, its keys are the MLflow metrics' names
    atomic.write_json(paths.per_class, {"test_accuracy": {
        key.partition(".")[2]: value for key, value in per_class.items()}})

    with tracking.run(run_id=run_id) as run:
        # val_loss/val_accuracy already have one point per epoch from train (val_loss there is
        # the objective as trained, with label smoothing and L2)
        mlflow.log_metrics({key: value for key, value in metrics.items()
                            if key not in ("val_loss", "val_accuracy")} | per_class)
        mlflow.set_tag(tracking.NOTE, description(run.data.params, metrics))
        mlflow.log_artifacts(paths.figures, artifact_path="figures")
        mlflow.log_artifact(paths.metrics)
        mlflow.log_artifact(paths.per_class)
        mlflow.log_artifact(paths.confusion)
    registered = registry.register(run_id, params.mlflow.experiment, metrics)
    version = registered.version
    state = "registered" if registered.new else "already registered as"
    alias = f" @{registry.ALIAS}" if registered.champion else ""
    print(f"evaluate: {state} {version.name} version {version.version}{alias} "
          f"(models:/{version.name}/{version.version})")
    return metrics


def main() -> None:
    params = load_params()
    metrics = evaluate(params)
    print(f"evaluate: test_accuracy {metrics['test_accuracy']:.4f}, "
          f"honest_gap {metrics['honest_gap']:.4f}")
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    print(f"evaluate: runs in the MLflow UI (`mlflow ui`): "
          f"{tracking.runs_url(experiment.experiment_id)}")


if __name__ == "__main__":
    cli.run("evaluate", main)
