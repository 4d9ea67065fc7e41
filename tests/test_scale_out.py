"""Scaling out on engines that already exist: Optuna workers sharing a PostgreSQL study, an MLflow
tracking server on PostgreSQL, `MirroredStrategy` over two replicas, and a DVC remote.

The PostgreSQL tests need the server on 127.0.0.1:5432 (trust auth, user postgres); each one works
in a database of its own that it drops at the end. Deselect them with `-m "not postgres"`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import psycopg2
import pytest
import requests
from optuna.trial import TrialState
from psycopg2 import sql

from conftest import NO_STARTING_POINTS, ROOT, sh, tool_env
from params import update_yaml
from test_tune import SMALL_SPACE, assert_one_study

pytestmark = pytest.mark.slow

SERVER = "postgresql://postgres@127.0.0.1:5432"  # as the README writes it (psycopg 3)
ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
STUDY = "regularization"


@dataclass(frozen=True)
class Database:
    name: str

    @property
    def url(self) -> str:
        return f"{SERVER}/{self.name}"

    def query(self, statement: str, arguments: tuple = ()) -> list[tuple]:
        connection = psycopg2.connect(**ADMIN | {"dbname": self.name})
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute(statement, arguments)
                return cursor.fetchall()
        finally:
            connection.close()


def _admin(*statements: tuple[sql.Composable | str, tuple]) -> None:
    """Run (statement, arguments) pairs on the maintenance database, outside a transaction."""
    try:
        connection = psycopg2.connect(**ADMIN)
    except psycopg2.OperationalError as error:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is unreachable ({error}); "
                    "deselect these tests with -m 'not postgres'")
    connection.autocommit = True  # CREATE/DROP DATABASE refuse to run in a transaction
    try:
        with connection.cursor() as cursor:
            for statement, arguments in statements:
                cursor.execute(statement, arguments)
    finally:
        connection.close()


@pytest.fixture
def database_name():
    """A fresh database name, dropped (if anyone created it) at the end."""
    name = f"test_scale_out_{uuid.uuid4().hex[:12]}"
    yield Database(name)
    _admin(("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)),
           (sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)), ()))


@pytest.fixture
def database(database_name):
    _admin((sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database_name.name)), ()))
    return database_name


@pytest.fixture
def tuned(project):
    sh("dvc", "repro", "preprocess", cwd=project)
    update_yaml(project / "params.yaml", {"tune.space": SMALL_SPACE, **NO_STARTING_POINTS,
                                          "tune.max_gap": None})
    return project


def start(command: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """A background process in its own process group, its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=cwd, env=tool_env(**env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition: Callable[[], object], what: str, process: subprocess.Popen | None = None,
             log: Path | None = None, timeout: float = 300):
    """Poll `condition` until it returns something truthy; fail if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            pytest.fail(f"exited ({process.returncode}) before {what}:\n{tail}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout} s")


def exit_code(process: subprocess.Popen, log: Path, timeout: float) -> int:
    """The process's exit status; past `timeout`, fail with its threads' stacks (faulthandler
    prints them on SIGABRT, PYTHONFAULTHANDLER in tool_env) and the end of its log."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGABRT)
        process.wait(timeout=30)
        pytest.fail(f"still running after {timeout} s; its stacks and log:\n"
                    f"{log.read_text()[-6000:]}")


def stop(process: subprocess.Popen) -> None:
    """Terminate the process group (a server's workers too), killing it if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def trials_if_any(database: Database, states=None) -> list:
    """The study's trials, or [] while no worker has created the schema and the study yet.

    Plain SQL first: an Optuna storage opened on a half-made schema would race the worker's own
    table creation and version stamping.
    """
    try:
        if not database.query("SELECT 1 FROM studies WHERE study_name = %s", (STUDY,)):
            return []
    except psycopg2.errors.UndefinedTable:
        return []
    storage = optuna.storages.RDBStorage(database.url, skip_table_creation=True)
    try:
        study = optuna.load_study(study_name=STUDY, storage=storage)
        return study.get_trials(deepcopy=False, states=states)
    finally:
        storage.engine.dispose()


def tune_command(database: Database, *args: str) -> list[str]:
    return [sys.executable, "src/tune.py", "--storage", database.url, *args]


@pytest.mark.postgres
def test_three_workers_started_together_share_one_postgres_study(tuned, database, tmp_path):
    update_yaml(tuned / "params.yaml", {"tune.pruner": "none"})  # every trial runs to the end
    command = tune_command(database, "--n-trials", "6", "--epochs", "1")
    logs = [tmp_path / f"worker-{index}.log" for index in range(3)]
    # An empty database and no MLflow store yet: all three workers create the Optuna schema, the
    # study, the MLflow store and the parent run at the same instant.
    workers = [start(command, tuned, log) for log in logs]
    try:
        for worker, log in zip(workers, logs, strict=True):
            assert exit_code(worker, log, timeout=1200) == 0, log.read_text()[-3000:]
            assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    finally:
        for worker in workers:
            stop(worker)

    trials = optuna.load_study(study_name=STUDY, storage=database.url).trials
    mlflow.set_tracking_uri(f"sqlite:///{tuned / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["cifar10-alexnet-tune"], output_format="list")
    assert_one_study(trials, runs, 6)
    assert len({t.number for t in trials}) == len(trials)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    for trial in trials:
        (run,) = [r for r in runs if r.data.tags.get("optuna.trial") == str(trial.number)
                  and r.data.tags["optuna.study"] == STUDY]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert run.data.metrics["val_accuracy_final"] == pytest.approx(trial.value, abs=1e-6)
    # the three workers then shared the confirmation of the best two (tune.confirm) at the
    # pipeline's length: each confirmed once, none twice, none failed
    confirmed = optuna.load_study(study_name=f"{STUDY}-confirm", storage=database.url).trials
    assert [t.state for t in confirmed] == [TrialState.COMPLETE] * 2
    best = sorted(trials, key=lambda t: t.value, reverse=True)[:2]
    assert sorted(t.user_attrs["confirms"] for t in confirmed) == sorted(t.number for t in best)
    assert len([r for r in runs if r.data.tags.get("optuna.confirms")]) == 2


@pytest.mark.postgres
def test_killed_worker_trial_fails_by_heartbeat_and_its_retry_completes(tuned, database,
                                                                         tmp_path):
    grace = 3
    update_yaml(tuned / "params.yaml", {"tune.heartbeat_interval": 1, "tune.grace_period": grace,
                                        "tune.pruner": "none"})
    log = tmp_path / "victim.log"
    victim = start(tune_command(database, "--n-trials", "1", "--epochs", "20"), tuned, log)
    try:
        # mid-trial: its params sampled and at least one epoch reported
        (killed,) = wait_for(lambda: [t for t in trials_if_any(database, (TrialState.RUNNING,))
                                      if t.intermediate_values],
                             "a trial with a finished epoch", victim, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    killed_at = time.monotonic()
    assert killed.params.keys() == SMALL_SPACE.keys()
    # The dead worker's heartbeat must be older than the grace period before anyone looks.
    time.sleep(max(0.0, grace + 1 - (time.monotonic() - killed_at)))

    sh(*tune_command(database, "--n-trials", "1", "--epochs", "20"), cwd=tuned)

    trials = optuna.load_study(study_name=STUDY, storage=database.url).trials
    by_number = {t.number: t for t in trials}
    assert by_number[killed.number].state == TrialState.FAIL
    # Optuna's retry callback enqueues the retry with these system attributes
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.number > killed.number
    assert retry.system_attrs["retry_history"] == [killed.number]
    assert retry.params == killed.params
    assert retry.state == TrialState.COMPLETE
    assert [t.number for t in trials if t.state == TrialState.COMPLETE] == [retry.number]


@pytest.mark.postgres
def test_survivors_wait_for_a_dead_worker_s_trial_then_retry_it(tuned, database, tmp_path):
    """Three workers, three trials: one worker is SIGKILLed mid-trial while the other two still
    train. The survivors finish their trials, find the dead one's still RUNNING, wait until its
    heartbeat is past the grace period, fail it and run its retry: three complete, none RUNNING.
    """
    grace = 15  # longer than the survivors' own trials take to finish
    update_yaml(tuned / "params.yaml", {"tune.heartbeat_interval": 1, "tune.grace_period": grace,
                                        "tune.pruner": "none"})
    command = tune_command(database, "--n-trials", "3", "--epochs", "12")
    logs = [tmp_path / f"worker-{index}.log" for index in range(3)]
    workers = [start(command, tuned, log) for log in logs]
    try:
        # with their points drawn: a trial is RUNNING a moment before its objective samples
        running = wait_for(lambda: len([t for t in trials_if_any(database, (TrialState.RUNNING,))
                                        if t.params]) == 3,
                           "three trials running at once", workers[0], logs[0], timeout=600)
        assert running
        os.killpg(workers[0].pid, signal.SIGKILL)
        workers[0].wait()
        others_running = [w.poll() is None for w in workers[1:]]
        for worker, log in zip(workers[1:], logs[1:], strict=True):
            assert exit_code(worker, log, timeout=900) == 0, log.read_text()[-3000:]
    finally:
        for worker in workers:
            stop(worker)
    assert others_running == [True, True]  # the kill came while both survivors trained
    trials = optuna.load_study(study_name=STUDY, storage=database.url).trials
    states = [t.state for t in trials]
    print("trial states:", ", ".join(f"{t.number} {t.state.name}" for t in trials))
    assert states.count(TrialState.COMPLETE) == 3, states
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(database_name, tmp_path):
    """scripts/mlflow_server.sh on a free loopback port; it creates the database itself."""
    port = free_port()
    artifacts = tmp_path / "mlartifacts"
    log = tmp_path / "mlflow-server.log"
    backend = f"postgresql://postgres@127.0.0.1:5432/{database_name.name}"  # as users write it
    server = start(["bash", str(ROOT / "scripts/mlflow_server.sh"), "--workers", "1"], tmp_path,
                   log, MLFLOW_BACKEND_STORE_URI=backend,
                   MLFLOW_ARTIFACTS_DESTINATION=str(artifacts), MLFLOW_PORT=str(port))
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(f"{uri}/health", timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or still starting
            return False

    try:
        wait_for(healthy, "an answer from /health", server, log, timeout=180)
        yield uri, artifacts, database_name
    finally:
        stop(server)


@pytest.mark.postgres
def test_repro_logs_to_a_tracking_server_on_postgres(project, mlflow_server):
    uri, artifacts, database = mlflow_server
    sh("dvc", "repro", cwd=project, MLFLOW_TRACKING_URI=uri)
    api = f"{uri}/api/2.0/mlflow"

    experiment = requests.get(f"{api}/experiments/get-by-name",
                              params={"experiment_name": "cifar10-alexnet"}, timeout=30)
    experiment.raise_for_status()
    experiment_id = experiment.json()["experiment"]["experiment_id"]
    found = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment_id]},
                          timeout=30)
    found.raise_for_status()
    (run,) = found.json()["runs"]
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    assert run_id == json.loads((project / "reports/train.json").read_text())["mlflow_run_id"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    local = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(local["test_accuracy"])
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.epochs"] == "2"

    history = requests.get(f"{api}/metrics/get-history",
                           params={"run_id": run_id, "metric_key": "val_accuracy"}, timeout=30)
    history.raise_for_status()
    assert sorted(m["step"] for m in history.json()["metrics"]) == [1, 2]

    listed = requests.get(f"{api}/artifacts/list", params={"run_id": run_id}, timeout=30)
    listed.raise_for_status()
    names = {f["path"] for f in listed.json()["files"]}
    assert {"history.csv", "metrics.json", "confusion.csv", "figures"} <= names
    # the files live in the server's artifact directory, the runs in PostgreSQL
    assert list(artifacts.rglob("history.csv")) and list(artifacts.rglob("confusion_matrix.png"))
    assert database.query("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)) == \
        [("FINISHED",)]
    assert not (project / "mlflow.db").exists()


MIRRORED_CHILD = """
import json, os, signal, sys

import tensorflow as tf

# two logical CPUs, declared before TensorFlow initialises its devices
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import devices
import train
from params import load_params

setups = []
configure = devices.configure
devices.configure = lambda *args: setups.append(configure(*args)) or setups[-1]


class DieAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):  # runs after the epoch's checkpoint is saved
        os.kill(os.getpid(), signal.SIGKILL)


trained_with = []
fit = train.fit


def fit_and_record(*args, callbacks=(), **kwargs):
    if sys.argv[1] == "die-after-epoch-1":
        callbacks = [*callbacks, DieAfterFirstEpoch()]
    result = fit(*args, callbacks=callbacks, **kwargs)
    trained_with.append(result.model.distribute_strategy)
    return result


train.fit = fit_and_record
train.train(load_params())
with setups[-1].scope():
    strategy = tf.distribute.get_strategy()
print("strategy: " + json.dumps({
    "class": type(strategy).__name__,
    "replicas": setups[-1].replicas,
    "model_replicas": trained_with[0].num_replicas_in_sync,  # a resumed model too
}))
"""


def test_data_parallel_over_two_cpus_trains_and_resumes(project):
    sh("dvc", "repro", "preprocess", cwd=project)
    update_yaml(project / "params.yaml", {"train.distribute": "data_parallel"})

    def child(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", MIRRORED_CHILD, mode], cwd=project,
                              env=tool_env(PYTHONPATH=str(project / "src")),
                              capture_output=True, text=True, timeout=900)

    killed = child("die-after-epoch-1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = json.loads((project / "checkpoints/train/state.json").read_text())
    assert state["epochs_done"] == 1

    resumed = child("resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train: resuming after epoch 1" in resumed.stdout
    (line,) = [x for x in resumed.stdout.splitlines() if x.startswith("strategy: ")]
    assert json.loads(line.removeprefix("strategy: ")) == {
        "class": "MirroredStrategy", "replicas": 2, "model_replicas": 2}
    assert list(pd.read_csv(project / "reports/history.csv")["epoch"]) == [1, 2]
    assert not (project / "checkpoints/train/state.json").exists()

    # one MLflow run across the kill, one point per epoch
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["cifar10-alexnet"], output_format="list")
    assert run.info.run_id == state["run_id"] and run.info.status == "FINISHED"
    steps = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in steps] == [1, 2]


def test_push_wipe_pull_and_nothing_reruns(project, tmp_path):
    sh("dvc", "repro", cwd=project)
    sh("dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"), cwd=project)
    sh("dvc", "push", cwd=project)

    for wiped in (".dvc/cache", "data", "models"):
        shutil.rmtree(project / wiped)
    assert "up to date" not in sh("dvc", "status", cwd=project).stdout

    sh("dvc", "pull", cwd=project)
    assert (project / "models/model.keras").is_file()
    assert (project / "data/processed/train.npz").is_file()
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=project).stdout
    assert "Running stage" not in sh("dvc", "repro", cwd=project).stdout
