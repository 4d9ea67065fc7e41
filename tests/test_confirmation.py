"""A study's best short trials confirmed at the pipeline's length (src/confirmation.py).

The tiny project's pipeline trains 2 epochs on its 240 training images; the studies here train
1-epoch trials, so their best ones are confirmed at 2 epochs on all images.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from conftest import NO_STARTING_POINTS, sh, tool_env
from params import read_yaml, update_yaml

pytestmark = pytest.mark.slow

SMALL_SPACE = {"model.dropout": {"low": 0.0, "high": 0.5},
               "train.learning_rate": {"low": 0.005, "high": 0.05, "log": True}}


@pytest.fixture
def short(project):
    sh("dvc", "repro", "preprocess", cwd=project)
    update_yaml(project / "params.yaml", {
        "tune.space": SMALL_SPACE, **NO_STARTING_POINTS, "tune.pruner": "none",
        "tune.max_gap": None, "tune.lr_reference_batch": None, "tune.confirm": 1})
    return project


def tune(project, *args, check=True):
    return sh(sys.executable, "src/tune.py", "--epochs", "1", *args, cwd=project, check=check)


def load(project, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'optuna.db'}")


def runs(project):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["cifar10-alexnet-tune"], output_format="list")


def test_the_best_short_trial_is_trained_at_full_length_and_wins(short):
    out = tune(short, "--n-trials", "3", "--apply").stdout
    study, companion = load(short, "regularization"), load(short, "regularization-confirm")
    leader = max((t for t in study.trials if t.state == TrialState.COMPLETE),
                 key=lambda t: t.value)
    (confirmed,) = companion.trials
    assert confirmed.state == TrialState.COMPLETE
    assert confirmed.user_attrs["confirms"] == leader.number
    assert confirmed.params == leader.params
    assert sorted(confirmed.intermediate_values) == [1, 2]  # train.epochs, not the proxy's 1
    assert f"confirming trials {leader.number} at 2 epochs on all images" in out

    # tracked under the study's parent run, at the pipeline's length
    found = runs(short)
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    (run,) = [r for r in found if r.data.tags.get("optuna.confirms")]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["optuna.confirms"] == str(leader.number)
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["data.train_images"] == "240"
    assert run.data.tags["optuna.best"] == "true"
    assert parent.data.tags["optuna.best_study"] == "regularization-confirm"
    assert parent.data.tags["optuna.best_measured"].startswith(
        "confirmed at the pipeline's length")
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(confirmed.value, abs=1e-6)
    assert "Winner: trial 0 of 'regularization-confirm', confirming trial" in \
        parent.data.tags["mlflow.note.content"]

    # --apply wrote the confirmed point, and best_params.yaml says how it was measured
    applied = read_yaml(short / "params.yaml")
    assert applied["model"]["dropout"] == pytest.approx(confirmed.params["model.dropout"])
    best = (short / "reports/best_params.yaml").read_text()
    assert best.startswith("# measured: confirmed at the pipeline's length (2 epochs on 240")

    # a rerun finds everything done: no trial trained again in either study
    again = tune(short, "--n-trials", "3").stdout
    assert len(load(short, "regularization-confirm").trials) == 1
    assert len(load(short, "regularization").trials) == 3
    assert "confirming trials" not in again


def test_apply_refuses_a_winner_measured_only_on_short_trials(short):
    before = (short / "params.yaml").read_text()
    refused = tune(short, "--n-trials", "2", "--confirm", "0", "--apply", check=False)
    assert refused.returncode != 0
    line = refused.stderr.strip().splitlines()[-1]  # after the trials' logs
    assert line.startswith("tune: error: --apply: no confirmed winner to apply; params.yaml "
                           "unchanged (--apply-unconfirmed"), refused.stderr
    assert (short / "params.yaml").read_text() == before
    out = tune(short, "--n-trials", "2", "--confirm", "0", "--apply-unconfirmed").stdout
    assert "params.yaml updated with the winner measured at 1 epochs on 240 images" in out
    assert (short / "params.yaml").read_text() != before


def test_a_confirmation_killed_mid_way_is_retried_by_the_next_invocation(short):
    # a confirmation long enough to be killed in; a dead worker's trial is failed after 2 s
    update_yaml(short / "params.yaml", {"train.epochs": 25, "tune.heartbeat_interval": 1,
                                        "tune.grace_period": 2})
    worker = subprocess.Popen([sys.executable, "src/tune.py", "--epochs", "1", "--n-trials", "2"],
                              cwd=short, env=tool_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not _confirming(short):
        assert worker.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(3)  # inside the confirming trial's training
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=60)
    (killed,) = load(short, "regularization-confirm").trials
    assert killed.state == TrialState.RUNNING  # as a dead worker leaves it
    time.sleep(3)  # its heartbeat goes stale
    tune(short, "--n-trials", "2")
    first, retry = load(short, "regularization-confirm").trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.params == first.params
    assert retry.user_attrs["confirms"] == first.user_attrs["confirms"]
    assert len(load(short, "regularization").trials) == 2  # the short trials were not redone


def _confirming(project) -> bool:
    try:
        return any(r.data.tags.get("optuna.confirms") for r in runs(project))
    except Exception:  # the store or experiment does not exist yet
        return False


def test_multi_objective_apply_says_which_end_and_takes_the_other_on_request(short):
    # trials at the pipeline's length: nothing to confirm, the front is the winner's source
    update_yaml(short / "params.yaml", {"tune.multi_objective": True})
    args = ("--epochs", "2", "--n-trials", "4", "--study-name", "front")
    out = tune(short, *args, "--apply").stdout
    assert "best trial taken from the front's accuracy end (highest val accuracy); " \
        "--front-end gap takes the other end" in out
    study = load(short, "front")
    by_gap = min(study.best_trials, key=lambda t: (t.values[1], -t.values[0]))
    other = tune(short, *args, "--front-end", "gap", "--apply").stdout
    assert "best trial taken from the front's gap end (smallest honest gap)" in other
    assert f"tune: best trial {by_gap.number}:" in other
    applied = read_yaml(short / "params.yaml")["model"]["dropout"]
    assert applied == pytest.approx(by_gap.params["model.dropout"])


def test_front_end_needs_a_multi_objective_study(short):
    refused = tune(short, "--n-trials", "1", "--front-end", "gap", check=False)
    assert refused.returncode != 0
    assert "--front-end gap: a single-objective study has one best trial" in refused.stderr
