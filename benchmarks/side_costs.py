"""The side measurements of `bench_train.py`: what the stages cost besides training itself.

Imported by `bench_train.py`, which puts `src/` on the import path first. Each function times one
thing and returns a dict for the benchmark's report and JSON file.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cifar
import preprocess
from params import Params


def time_input_pipeline(train: cifar.Split, params: Params) -> dict:
    """Images/s of the host side of the input pipeline alone (batching and augmentation)."""
    import dataset

    batches = dataset.TrainBatches(train, params.train.batch_size, params.seed, 0,
                                   params.train.epochs, params.augment)
    images, start = 0, time.perf_counter()
    for index in range(len(batches)):
        images += len(batches[index][0])
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds,
            "images_per_second": images / seconds if seconds > 0 else float("inf")}


def time_mlflow(calls: int = 20) -> dict:
    """One epoch's `log_metrics` row, and train.py's per-epoch sync, against a new sqlite store."""
    import logging

    import mlflow

    import fitting as stage

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its table creation notices
    row = dict.fromkeys((*stage.HISTORY_KEYS, "gap"), 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        experiment = mlflow.create_experiment("bench", (Path(tmp) / "mlruns").as_uri())
        setup = time.perf_counter() - start
        client = mlflow.tracking.MlflowClient()
        log, sync = [], []
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_metrics(row, step=0)  # the run's first write
            for step in range(1, calls + 1):
                start = time.perf_counter()
                mlflow.log_metrics(row, step=step)
                log.append(time.perf_counter() - start)
                start = time.perf_counter()
                client.get_metric_history(run.info.run_id, "val_accuracy")
                sync.append(time.perf_counter() - start + log[-1])
    return {"store_setup_s": setup, "log_metrics_s": statistics.median(log),
            "per_epoch_sync_s": statistics.median(sync), "calls": calls}


def time_preprocess(archive: str, params: Params) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = preprocess.preprocess(archive, Path(tmp) / "processed", Path(tmp) / "data.json",
                                        params.data.val_size, params.data.train_limit)
        return {"seconds": time.perf_counter() - start, "counts": summary["counts"]}


def time_dvc_repro(repo: str) -> dict:
    """A `dvc repro` in `repo`, only after `dvc status` says it has nothing to do."""
    dvc = [sys.executable, "-m", "dvc"]
    if not (Path(repo) / "dvc.yaml").is_file():
        return {"skipped": f"{repo} has no dvc.yaml"}
    status = subprocess.run([*dvc, "status", "--quiet"], cwd=repo, capture_output=True, text=True)
    if status.returncode:
        why = (status.stderr.strip().splitlines() or ["stages changed or outputs missing"])[-1]
        return {"skipped": f"the pipeline in {repo} is not up to date ({why}): a repro would "
                           "run stages"}
    start = time.perf_counter()
    done = subprocess.run([*dvc, "repro"], cwd=repo, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode or "Running stage" in done.stdout:
        return {"skipped": f"dvc repro did not finish as a no-op: {done.stdout[-300:]}"
                           f"{done.stderr[-300:]}"}
    return {"seconds": seconds}
