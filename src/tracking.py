"""MLflow tracking shared by every stage and by tune.py.

The store is embedded in the repository unless `MLFLOW_TRACKING_URI` names a server: runs go to
`./mlflow.db` and artifacts to `./mlruns/`, the layout a bare `mlflow ui` in the repository root
reads. Stages that `dvc exp run --temp` or `--queue` runs in a copy under `.dvc/tmp/exps/` log to
the repository's store all the same. Credentials for a server come from the environment
(`MLFLOW_TRACKING_USERNAME`/`_PASSWORD`/`_TOKEN`), never from params, tags or logs.

A new run is named after what a person knows it by: the DVC experiment (`dvc exp run -n NAME`),
else the commit, `-dirty` when the worktree has changes, and the params that differ from the
commit's params.yaml (`1a2b3c4-dirty dropout=0.3 learning_rate=0.02`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from ruamel.yaml import YAML, YAMLError

import cli
from cli import UserError
from dblock import DatabaseLock
from params import flatten

# MLflow 3.17's UI ignores this tag (it opens on the GenAI view unless the URL's workflowType or
# the browser's last choice says machine_learning: see runs_url); older and other UIs read it
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
NOTE = "mlflow.note.content"  # the experiment's (and a run's) description in the UI
# The runs table's view that runs_url opens: the UI loads the experiment tag
# `mlflow.sharedViewState.<key>` (JSON) named by the URL's viewStateShareKey
VIEW_KEY = "pipeline-columns"
PIPELINE_COLUMNS = ("metrics.val_accuracy", "metrics.honest_gap", "metrics.test_accuracy",
                    "params.train.epochs", "params.model.dropout", "params.train.learning_rate",
                    "params.train.batch_size", "params.augment.flip", "params.augment.crop",
                    "params.augment.cutout", "params.augment.mixup", "params.augment.cutmix")
PIPELINE_DESCRIPTION = (
    "Runs of the DVC pipeline (`dvc repro`, `dvc exp run`): one run per training, named after "
    "the DVC experiment or the commit and changed params; evaluation adds the test metrics.")


DIGITS = 6  # logged figures, rounded: a difference of accuracies is 0.01, not 0.010000000000000009


def rounded(figures: dict[str, float]) -> dict[str, float]:
    """Figures as logged and written: to DIGITS places, which every accuracy and loss keeps."""
    return {key: round(float(value), DIGITS) for key, value in figures.items()}


def project_root(cwd: Path | None = None) -> Path:
    """The repository this process belongs to, also from inside a DVC experiment's temp copy."""
    cwd = (cwd or Path.cwd()).resolve()
    if ".dvc" in cwd.parts:
        return Path(*cwd.parts[: cwd.parts.index(".dvc")])
    return cwd


def store_uri() -> str:
    """The tracking store: MLFLOW_TRACKING_URI, or the repository's mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def use_store() -> str:
    """Point MLflow at the store without creating an experiment (readers: promote, predict)."""
    uri = store_uri()
    if uri.startswith(("http://", "https://")):
        wait_for_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


SERVER_WAIT_S = 15  # how long a tracking server that does not answer is given


def wait_for_server(uri: str, seconds: float = SERVER_WAIT_S) -> None:
    """Return once the MLflow server at `uri` answers /health; a one-line UserError after
    `seconds` (MLflow's own client would retry for minutes, then raise a traceback)."""
    import time

    import requests

    deadline, reason = time.monotonic() + seconds, "no answer"
    while True:
        try:
            answer = requests.get(f"{uri.rstrip('/')}/health", timeout=5)
            if answer.status_code < 500:
                return
            reason = f"HTTP {answer.status_code}"
        except requests.RequestException as error:
            reason = type(error).__name__
        if time.monotonic() >= deadline:
            raise UserError(f"MLFLOW_TRACKING_URI={uri}: the MLflow tracking server does not "
                            f"answer ({reason} after {seconds:.0f} s); start it or unset "
                            "MLFLOW_TRACKING_URI")
        time.sleep(1)


def table_view(columns: tuple[str, ...]) -> str:
    """The runs table's view (JSON, as the UI shares views) showing `columns`
    (`metrics.<key>`, `params.<key>`, `tags.<key>`), sorted by the first (validation accuracy:
    what a configuration is chosen on, never test accuracy)."""
    import json

    selected = [f"{kind}.`{key}`" for kind, _, key in (c.partition(".") for c in columns)]
    return json.dumps({"selectedColumns": selected, "orderByKey": selected[0],
                       "orderByAsc": False})


def runs_url(experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI (`mlflow ui`, or the tracking server), on
    model training (MLflow 3.17 opens on GenAI traces without workflowType) with the key
    columns."""
    uri = store_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return (f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


def store_lock(uri: str) -> DatabaseLock:
    """What a process holds while its first access to the store at `uri` may create or
    migrate the schema."""
    return DatabaseLock(uri, "mlflow-store")


def configure(experiment: str, description: str = PIPELINE_DESCRIPTION,
              columns: tuple[str, ...] = PIPELINE_COLUMNS) -> str:
    """Point MLflow at the store, select `experiment` (created if needed); return the store URI.

    The experiment carries `description` unless someone wrote another one, and the runs table's
    view of `columns` that runs_url opens (updated when the code's columns change).
    """
    uri = store_uri()
    artifact_location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        artifact_location = (project_root() / "mlruns").as_uri()
    if uri.startswith(("http://", "https://")):
        wait_for_server(uri)
    mlflow.set_tracking_uri(uri)
    # the first access creates or migrates the store's schema: one process at a time
    with store_lock(uri):
        tags = {**EXPERIMENT_TAGS, NOTE: description,
                f"mlflow.sharedViewState.{VIEW_KEY}": table_view(columns)}
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            try:
                mlflow.create_experiment(experiment, artifact_location=artifact_location,
                                         tags=tags)
            except MlflowException:  # a server's other client created it meanwhile
                found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            client = mlflow.tracking.MlflowClient()
            view = f"mlflow.sharedViewState.{VIEW_KEY}"  # ours: kept as this code lays it out
            for key, value in tags.items():
                if key not in found.tags or (key == view and found.tags[key] != value):
                    client.set_experiment_tag(found.experiment_id, key, value)
    mlflow.set_experiment(experiment)
    return uri


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


# The modules whose source decides what a run trains (the model, its inputs and augmentation, the
# fit and its devices): the `code.training` tag is their digest, and `tune.py --add-run` counts a
# run as a trial only when it was trained by the same code as the study's trials.
TRAINING_CODE = ("augment.py", "dataset.py", "devices.py", "early_stopping.py", "fitting.py",
                 "model.py")
CODE_TAG = "code.training"


def training_code() -> str:
    """A 16-hex digest of the training code's source (TRAINING_CODE, in src/)."""
    import hashlib

    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        digest.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def provenance_tags(data_md5: str) -> dict[str, str]:
    """Tags that tie a run to the code and data that produced it."""
    tags = {"data.md5": data_md5, CODE_TAG: training_code()}
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


def _changed_params() -> list[str]:
    """`name=value` for each param that differs from the committed params.yaml."""
    committed = _git("show", "HEAD:params.yaml")
    try:
        before = flatten(YAML(typ="safe", pure=True).load(committed or "") or {})
        now = flatten(YAML(typ="safe", pure=True).load(Path("params.yaml").read_text()) or {})
    except (OSError, YAMLError):
        return []
    changed = [key for key in now if key != "tune" and not key.startswith("tune.")
               and before.get(key) != now[key]]
    return [f"{key.rpartition('.')[2]}={_show(now[key])}" for key in changed]


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value).replace(" ", "")


def run_name() -> str | None:
    """The DVC experiment's name, else `<commit>[-dirty] [changed params]`; None outside git."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    name = " ".join([commit + ("-dirty" if dirty else ""), *_changed_params()])
    return name[:200]


@contextlib.contextmanager
def run(run_id: str | None = None, **kwargs) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, given `run_id`) a run that always ends with the right status.

    FINISHED on success, FAILED on an exception, KILLED on SIGTERM or Ctrl-C, also one that
    arrives while a metric is being written. A SIGKILL leaves the run RUNNING; resuming it from a
    checkpoint continues the same run. A new run without a `run_name` gets `run_name()`.
    """
    if run_id is None and not kwargs.get("run_name"):
        kwargs["run_name"] = run_name()
    with cli.interrupts_outside_database_code(), \
            mlflow.start_run(run_id=run_id, **kwargs) as active:
        try:
            yield active
        except KeyboardInterrupt:
            cli.interrupt_seen()
            mlflow.end_run("KILLED")
            raise
