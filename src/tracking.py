"""MLflow tracking shared by every stage and by tune.py.

The store is embedded in the repository unless `MLFLOW_TRACKING_URI` names a server: runs go to
`./mlflow.db` and artifacts to `./mlruns/`, the layout a bare `mlflow ui` in the repository root
reads. Stages that `dvc exp run --temp` or `--queue` runs in a copy under `.dvc/tmp/exps/` log to
the repository's store all the same. Credentials for a server come from the environment
(`MLFLOW_TRACKING_USERNAME`/`_PASSWORD`/`_TOKEN`), never from params, tags or logs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from cli import Terminated


def project_root(cwd: Path | None = None) -> Path:
    """The repository this process belongs to, also from inside a DVC experiment's temp copy."""
    cwd = (cwd or Path.cwd()).resolve()
    if ".dvc" in cwd.parts:
        return Path(*cwd.parts[: cwd.parts.index(".dvc")])
    return cwd


def configure(experiment: str) -> str:
    """Point MLflow at the store, select `experiment` (created if needed); return the store URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    artifact_location = None
    if not uri:
        root = project_root()
        uri = f"sqlite:///{root / 'mlflow.db'}"
        artifact_location = (root / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=artifact_location)
        except MlflowException:  # another process created it first
            pass
    mlflow.set_experiment(experiment)
    return uri


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def provenance_tags(data_md5: str) -> dict[str, str]:
    """Tags that tie a run to the code and data that produced it."""
    tags = {"data.md5": data_md5}
    commit = _git("rev-parse", "HEAD")
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no") or ""
        tags |= {"mlflow.source.git.commit": commit, "git.commit": commit,
                 "git.dirty": str(bool(status)).lower()}
    for variable, tag in (("DVC_EXP_NAME", "dvc.exp_name"),
                          ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def run(run_id: str | None = None, **kwargs) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, given `run_id`) a run that always ends with the right status.

    FINISHED on success, FAILED on an exception, KILLED on SIGTERM or Ctrl-C. A SIGKILL leaves the
    run RUNNING; resuming it from a checkpoint continues the same run.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        with mlflow.start_run(run_id=run_id, **kwargs) as active:
            try:
                yield active
            except KeyboardInterrupt:
                mlflow.end_run("KILLED")
                raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
