"""MLflow as a person reads it: pipeline runs named after the DVC experiment or the commit and
params, experiments that open on the runs table, stage logs free of terminal codes."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import weakref

import mlflow
import pytest
import sqlalchemy

import tracking
from conftest import sh
from params import update_yaml
from tracking import run as tracked_run

pytestmark = pytest.mark.slow


def pipeline_runs(project) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["cifar10-alexnet"], output_format="list",
                              order_by=["attributes.start_time ASC"])


def test_runs_are_named_after_the_experiment_or_the_commit_and_params(project):
    commit = sh("git", "rev-parse", "--short", "HEAD", cwd=project).stdout.strip()
    out = sh("dvc", "repro", cwd=project).stdout
    update_yaml(project / "params.yaml", {"model.dropout": 0.2})
    sh("dvc", "repro", cwd=project)
    sh("dvc", "exp", "run", "-S", "model.dropout=0.3", "-n", "more-dropout", cwd=project)

    names = [run.info.run_name for run in pipeline_runs(project)]
    assert names == [commit, f"{commit}-dirty dropout=0.2", "more-dropout"]

    experiment = mlflow.tracking.MlflowClient().get_experiment_by_name("cifar10-alexnet")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "dvc repro" in experiment.tags["mlflow.note.content"]
    # MLflow 3.17's UI opens on GenAI traces unless the URL says workflowType=machine_learning;
    # the view the URL names shows the key figures as columns
    url = (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
           "?workflowType=machine_learning&viewStateShareKey=pipeline-columns")
    assert f"evaluate: runs in the MLflow UI (`mlflow ui`): {url}" in out
    view = json.loads(experiment.tags["mlflow.sharedViewState.pipeline-columns"])
    assert view["selectedColumns"][:3] == ["metrics.`val_accuracy`", "metrics.`honest_gap`",
                                           "metrics.`test_accuracy`"]
    assert view["orderByKey"] == "metrics.`val_accuracy`"  # chosen on validation, never test
    assert "params.`model.dropout`" in view["selectedColumns"]


def test_train_stage_log_has_no_terminal_codes(project):
    out = sh("dvc", "repro", "train", cwd=project).stdout  # a pipe, as a log file or CI
    assert re.search(r"^epoch 2/2: .*val_accuracy \d\.\d{4}", out, re.MULTILINE), out
    assert "\x1b[" not in out, out


def test_a_signal_during_a_metric_write_still_marks_the_run_killed(tmp_path):
    # SIGTERM (or Ctrl-C) raised inside the store's INSERT left SQLite locked: the run stayed
    # RUNNING and "database is locked" replaced the interrupt. It is raised after the write now.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("signals")
    sent = []

    def terminate_mid_insert(connection, cursor, statement, *args):
        if not sent and statement.lstrip().upper().startswith("INSERT INTO METRICS"):
            sent.append(statement)
            os.kill(os.getpid(), signal.SIGTERM)

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute",
                            terminate_mid_insert)
    try:
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            with tracked_run(run_name="interrupted") as active:
                mlflow.log_metrics({"loss": 1.5}, step=1)
                time.sleep(30)  # the signal lands here, after the write
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute",
                                terminate_mid_insert)
    assert sent
    client = mlflow.tracking.MlflowClient()
    assert client.get_run(active.info.run_id).info.status == "KILLED"
    assert [m.value for m in client.get_metric_history(active.info.run_id, "loss")] == [1.5]


def test_an_interrupt_swallowed_by_a_weakref_callback_is_raised_again(tmp_path):
    # Python prints an exception raised in a weakref callback (the garbage collector runs them
    # anywhere) and goes on: a Ctrl-C that landed there was lost and tune.py trained on.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("signals")

    def interrupt_inside_callback(_):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, inside the callback
            pass

    class Owner:
        pass

    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        with tracked_run(run_name="interrupted") as active:
            owner = Owner()
            ref = weakref.ref(owner, interrupt_inside_callback)
            del owner  # the callback runs and swallows the first Terminated
            assert ref() is None
            time.sleep(30)  # the signal is sent again and lands here
    client = mlflow.tracking.MlflowClient()
    assert client.get_run(active.info.run_id).info.status == "KILLED"


def test_the_runs_view_follows_the_code_and_a_user_s_description_stays(tmp_path, monkeypatch):
    """The stored column view (ours) is rewritten when the code's columns change; a description
    someone wrote in the UI is kept."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.configure("views", "first description", ("metrics.val_accuracy",))
    client = mlflow.tracking.MlflowClient()
    found = client.get_experiment_by_name("views")
    client.set_experiment_tag(found.experiment_id, tracking.NOTE, "written in the UI")
    tracking.configure("views", "first description", ("metrics.val_accuracy", "params.seed"))
    tags = client.get_experiment_by_name("views").tags
    assert tags[tracking.NOTE] == "written in the UI"
    view = json.loads(tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"])
    assert view["selectedColumns"] == ["metrics.`val_accuracy`", "params.`seed`"]
