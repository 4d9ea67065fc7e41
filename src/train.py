"""Stage `train`: fit the seed's CNN on the training split, tracked in MLflow, resumable.

    python src/train.py          # reads `seed`, `model.*`, `train.*` and the paths

Writes `models/model.keras`, the per-epoch history (`reports/history.csv`: loss, accuracy,
val_loss, val_accuracy and the in-training gap accuracy - val_accuracy) and `reports/train.json`
(the MLflow run id that `evaluate` continues). After every epoch a checkpoint is saved; when the
stage is killed, the next run resumes from the last completed epoch in the same MLflow run.
"""

from __future__ import annotations

import backend  # noqa: F401  (first: sets KERAS_BACKEND from params.yaml)

# isort: split

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd

import atomic
import cli
import devices
import tracking
from checkpoint import Checkpoint, code_files, fingerprint
from cifar import load_split
from fitting import fit
from params import Params, flatten, load_params


def _sync_metrics(run_id: str, history: list[dict]) -> None:
    """Log the epochs MLflow lacks: one point per epoch, none missing or doubled after a resume."""
    client = mlflow.tracking.MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "val_accuracy")}
    for row in history:
        if row["epoch"] not in logged:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])


def log_model(model: keras.Model, sample: np.ndarray) -> None:
    """Log the model (MLflow's Keras 3 flavor) so that `mlflow.pyfunc.load_model` predicts on raw
    uint8 images, whichever backend trained it and whichever loads it."""
    from mlflow.models import infer_signature

    signature = infer_signature(sample, keras.ops.convert_to_numpy(model(sample, training=False)))
    # stated, not inferred: inference loads the model again in a subprocess, seconds per run
    requirements = [f"{name}=={importlib.metadata.version(name)}"
                    for name in ("keras", keras.backend.backend(), "numpy")]
    mlflow.keras.log_model(model, name="model", signature=signature,
                           pip_requirements=requirements)


def run_fingerprint(params: Params, setup: devices.Setup, data_files: Sequence[Path]) -> str:
    """What a checkpoint must match to be resumed: the params that change training, the device
    settings in force (the dtype policy among them: `auto` resolves per machine), the data and the
    project code loaded in this process."""
    return fingerprint(params.seed, params.model.model_dump(), params.augment.model_dump(),
                       params.train.model_dump(), setup.describe(),
                       files=tuple(data_files) + code_files())


def train(params: Params) -> dict:
    paths = params.paths
    train_split = load_split(paths.processed, "train")
    val_split = load_split(paths.processed, "val")
    data_files = tuple(Path(paths.processed) / f"{name}.npz" for name in ("train", "val"))
    backend.check(params.train.backend)
    configured = devices.configure(params.train, params.seed)
    checkpoint = Checkpoint(paths.checkpoint, run_fingerprint(params, configured, data_files))
    with configured.scope():  # loaded outside it, the model would train on one replica only
        saved = checkpoint.load()
    if checkpoint.ignored:
        print(f"train: checkpoint ignored: {checkpoint.ignored}; training from the start")
    tracking.configure(params.mlflow.experiment)
    with tracking.run(run_id=saved[1].run_id if saved else None,
                      tags=tracking.provenance_tags(params.data.md5)) as run:
        run_id = run.info.run_id
        if saved:
            print(f"train: resuming after epoch {saved[1].epochs_done} (MLflow run {run_id})")
            _sync_metrics(run_id, saved[1].history)
        else:
            mlflow.log_params({"seed": params.seed, "data.md5": params.data.md5,
                               "data.train_images": len(train_split),
                               "data.val_images": len(val_split),
                               **flatten(params.model_dump(include={"model", "augment",
                                                                    "train"}))})
            mlflow.set_tags({"keras.backend": backend.version(params.train.backend),
                             "keras.version": keras.__version__,
                             **configured.tags()})

        def after_epoch(model, history):
            checkpoint.save(model, len(history), run_id, history)
            _sync_metrics(run_id, history)

        result = fit(params, train_split, val_split, on_epoch=after_epoch,
                     resume=(saved[0], saved[1].history) if saved else None,
                     configured=configured)
        with atomic.atomic_path(paths.model, suffix=".keras") as tmp:
            result.model.save(tmp)
        history = pd.DataFrame(result.history)
        with atomic.atomic_path(paths.history) as tmp:
            history.to_csv(tmp, index=False, float_format="%.6f")
        mlflow.log_artifact(paths.history)
        log_model(result.model, val_split.images[:2])
        summary = {"mlflow_run_id": run_id, "epochs": len(result.history),
                   "stopped_early": result.stopped_early, **result.history[-1]}
        atomic.write_json(paths.train_run, summary)
    checkpoint.clear()
    return summary


def main() -> None:
    summary = train(load_params())
    print(f"train: {summary}")


if __name__ == "__main__":
    cli.run("train", main)
