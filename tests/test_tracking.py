"""MLflow as a person reads it: pipeline runs named after the DVC experiment or the commit and
params, experiments that open on the runs table, stage logs free of terminal codes."""

from __future__ import annotations

import mlflow
import pytest

from conftest import sh
from params import update_yaml

pytestmark = pytest.mark.slow


def pipeline_runs(project) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["cifar10-alexnet"], output_format="list",
                              order_by=["attributes.start_time ASC"])


def test_runs_are_named_after_the_experiment_or_the_commit_and_params(project):
    commit = sh("git", "rev-parse", "--short", "HEAD", cwd=project).stdout.strip()
    sh("dvc", "repro", cwd=project)
    update_yaml(project / "params.yaml", {"model.dropout": 0.2})
    sh("dvc", "repro", cwd=project)
    sh("dvc", "exp", "run", "-S", "model.dropout=0.3", "-n", "more-dropout", cwd=project)

    names = [run.info.run_name for run in pipeline_runs(project)]
    assert names == [commit, f"{commit}-dirty dropout=0.2", "more-dropout"]

    experiment = mlflow.tracking.MlflowClient().get_experiment_by_name("cifar10-alexnet")
    # what the MLflow UI reads to open the runs table (not the GenAI overview)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "dvc repro" in experiment.tags["mlflow.note.content"]


def test_train_stage_log_has_no_terminal_codes(project):
    out = sh("dvc", "repro", "train", cwd=project).stdout  # a pipe, as a log file or CI
    assert "Epoch 2/2" in out
    assert "\x1b[" not in out, out
