"""MLflow as a person reads it: runs that end KILLED when interrupted, experiments that open on
the runs table, a user's description left alone (the pipeline's run names, experiment tags and
stage logs are checked end to end in test_pipeline.py)."""

from __future__ import annotations

import json
import os
import signal
import time
import weakref

import mlflow
import pytest
import sqlalchemy

import tracking
from tracking import run as tracked_run

pytestmark = pytest.mark.slow


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
