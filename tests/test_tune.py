"""`python src/tune.py` end to end on the tiny archive: storage, MLflow, best params, resume."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from conftest import NO_STARTING_POINTS, runs_while_running, sh, tool_env, training
from params import load_params, parse_params, read_yaml, update_yaml, with_overrides

pytestmark = pytest.mark.slow

SMALL_SPACE = {  # a few knobs of the real space, kept cheap
    "model.dropout": {"low": 0.0, "high": 0.5},
    "augment.flip": {"choices": [False, True]},
    "train.learning_rate": {"low": 0.005, "high": 0.05, "log": True},
    "train.batch_size": {"choices": [32, 64]},
}


@pytest.fixture
def tuned(project):
    sh("dvc", "repro", "preprocess", cwd=project)
    # no pruning here: which trials a pruner stops on two-epoch trials is luck, not behaviour;
    # no gap limit: a tiny model's gap says nothing (tests/test_tune_goal.py tests the limit)
    update_yaml(project / "params.yaml", {"tune.space": SMALL_SPACE, **NO_STARTING_POINTS,
                                          "tune.pruner": "none", "tune.max_gap": None,
                                          "tune.lr_reference_batch": None,
                                          "tune.train_limit": 4000})  # more than the project has
    return project


LONG = "150"  # epochs of a trial that a test stops in its training: about 10 s alone here


def tune(project, *args, check=True, **extra_env):
    return sh(sys.executable, "src/tune.py", "--epochs", "2", *args, cwd=project, check=check,
              **extra_env)


def finished(trials):
    """What the budget counts: complete and pruned trials."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def load(project, name="regularization"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'optuna.db'}")


def trial_runs(project):
    return runs_while_running(project, "cifar10-alexnet-tune")


def test_study_tracks_trials_and_writes_the_winner(tuned):
    out = tune(tuned, "--n-trials", "3")  # stdout is a pipe, as in a log file or CI
    study = load(tuned)
    assert len(finished(study.trials)) == 3
    assert "dvc exp run -S model.dropout=" in out.stdout
    assert study.metric_names == ["val_accuracy"]  # not "Objective 0" in optuna-dashboard
    # progress: one plain line per epoch of every trial, no bars or colour codes
    for trial in study.trials:
        for epoch in range(1, len(trial.intermediate_values) + 1):
            assert re.search(rf"^trial {trial.number} epoch {epoch}/2: .*accuracy 0\.\d+ "
                             r".*val_accuracy 0\.\d+", out.stdout, re.MULTILINE), out.stdout
    assert "\x1b[" not in out.stdout and "\r" not in out.stdout
    assert "ExperimentalWarning" not in out.stderr, out.stderr  # nothing a user can act on

    runs = trial_runs(tuned)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_name == "regularization"
    settings = parent.data.params
    assert settings["tune.epochs"] == "2" and settings["tune.sampler"] == "tpe"
    # the images each trial used: the project has fewer than tune.train_limit
    assert read_yaml(tuned / "params.yaml")["tune"]["train_limit"] > 240
    assert settings["tune.pruner"] == "none" and settings["tune.train_limit"] == "240"
    assert parent.data.tags["tune.train_limit"] == "240"
    assert settings["tune.max_gap"] == "null"
    assert json.loads(settings["tune.space"]) == SMALL_SPACE
    best_trial = study.best_trial
    assert parent.data.tags["best.train.batch_size"] == str(best_trial.params["train.batch_size"])
    assert float(parent.data.tags["best.model.dropout"]) == pytest.approx(
        best_trial.params["model.dropout"])
    assert not any(key.startswith("best.") for key in parent.data.metrics)  # tags only
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best_trial.value, abs=1e-6)
    # the parent run's description in the UI names the study's winner and how it was measured
    # (its trials train as the pipeline does: 2 epochs on all images, nothing to confirm)
    assert f"Winner: trial {best_trial.number}, 2 epochs on 240 images, the pipeline's " \
        f"length: val_accuracy {best_trial.value:.4f}" in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["optuna.best_study"] == "regularization"
    assert "240 images): dvc exp run -S" in out.stdout and "data.train_limit" not in out.stdout
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(study.trials)
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("cifar10-alexnet-tune")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Optuna" in experiment.tags["mlflow.note.content"]
    for trial in study.trials:
        (run,) = [r for r in children if r.data.tags["optuna.trial"] == str(trial.number)]
        assert run.info.run_name == f"regularization-trial-{trial.number}"
        assert run.data.tags["optuna.state"] == trial.state.name
        dropout = float(run.data.params["model.dropout"])
        assert dropout == pytest.approx(trial.params["model.dropout"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == list(range(1, len(steps) + 1)) and steps
        if trial.state == TrialState.COMPLETE:
            assert steps == [1, 2] and "honest_gap" in run.data.metrics
            assert run.data.tags["optuna.feasible"] == "true"  # no tune.max_gap here
    best = [r for r in children if r.data.tags.get("optuna.best") == "true"]
    assert [r.data.tags["optuna.trial"] for r in best] == [str(study.best_trial.number)]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/trials.csv", "study/optimization_history.png",
            "study/accuracy_vs_gap.png", "study/param_importances.png"} <= artifacts

    # the best-params file has exactly params.yaml keys and validates as params
    best_file = read_yaml(tuned / "reports/best_params.yaml")
    assert set(best_file) == {"model", "augment", "train"}
    point = {f"{s}.{k}": v for s, body in best_file.items() for k, v in body.items()}
    assert point.keys() == SMALL_SPACE.keys()
    parse_params(with_overrides(read_yaml(tuned / "params.yaml"), point))

    # --apply round-trips into params.yaml and keeps its comments
    before = (tuned / "params.yaml").read_text()
    tune(tuned, "--n-trials", "3", "--apply")  # the budget is reached: no new trial
    assert len(load(tuned).trials) == len(study.trials)
    after = (tuned / "params.yaml").read_text()
    assert after.count("#") == before.count("#")
    applied = load_params(tuned / "params.yaml")
    assert applied.model.dropout == pytest.approx(point["model.dropout"])
    assert applied.train.batch_size == point["train.batch_size"]


def test_rerun_continues_to_the_asked_number(tuned):
    tune(tuned, "--n-trials", "1")
    # another epoch count would mix trials that cannot be compared: refused, nothing trained
    refused = tune(tuned, "--n-trials", "2", "--epochs", "1", check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
        "tune: error: study 'regularization' was made with tune.epochs 2, this invocation has "
        "1: use the study's value, or --study-name for a new study")
    assert len(finished(load(tuned).trials)) == 1
    tune(tuned, "--n-trials", "2")  # another budget
    assert len(finished(load(tuned).trials)) == 2
    (parent,) = [r for r in trial_runs(tuned) if "mlflow.parentRunId" not in r.data.tags]
    # the settings the study started with stay its params; the last invocation's are tags
    assert parent.data.params["tune.epochs"] == "2"
    assert parent.data.tags["tune.n_trials"] == "2"


def test_timeout_stops_a_trial_mid_way_and_queues_its_point(tuned):
    """--timeout bounds the invocation, not only the start of its trials: the trial running when
    it passes stops after that epoch, fails, and its point waits for the next invocation."""
    # the first trial starts well within the timeout and needs well over it, however loaded
    # the machine is (an epoch here takes about 0.07 s alone)
    out = tune(tuned, "--n-trials", "2", "--epochs", LONG, "--timeout", "6").stdout
    (stopped,) = load(tuned).get_trials(states=(TrialState.FAIL,))
    assert len(stopped.intermediate_values) < int(LONG)
    (queued,) = load(tuned).get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs["fixed_params"] == stopped.params and \
        queued.user_attrs["timed_out_trial"] == stopped.number
    assert f"tune: trial {stopped.number} stopped after epoch " in out
    assert "--timeout reached; its point is queued for the next invocation" in out
    tune(tuned, "--n-trials", "1", "--epochs", LONG)  # the next one trains the queued point
    (done,) = load(tuned).get_trials(states=(TrialState.COMPLETE,))
    assert done.params == stopped.params


def test_a_report_or_a_rerun_of_a_finished_study_trains_nothing(tuned, no_tensorflow):
    # neither a refusal, a report nor a rerun with nothing left to train loads Keras:
    # TensorFlow (train.backend) is blocked
    missing = tune(tuned, "--report-only", check=False, **no_tensorflow)  # never makes a study
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        f"tune: error: --report-only: no study 'regularization' in sqlite:///{tuned}/optuna.db")
    assert not (tuned / "optuna.db").exists()
    tune(tuned, "--n-trials", "1")
    before = [t.number for t in load(tuned).trials]
    rerun = tune(tuned, "--n-trials", "1", **no_tensorflow).stdout
    assert [t.number for t in load(tuned).trials] == before
    assert "tune: nothing to train: 1 of 1 trials finished in study 'regularization'" in rerun
    (tuned / "reports/best_params.yaml").unlink()
    out = tune(tuned, "--n-trials", "5", "--report-only", "--apply", **no_tensorflow).stdout
    assert [t.number for t in load(tuned).trials] == before  # no trial started
    assert (tuned / "reports/best_params.yaml").is_file() and "params.yaml updated" in out


def test_diverging_trial_fails_and_the_study_goes_on(tuned):
    update_yaml(tuned / "params.yaml", {"tune.space": {
        **SMALL_SPACE, "train.momentum": {"low": 0.0, "high": 0.9},
        "model.l2": {"low": 1e-6, "high": 1.0, "log": True}}})
    tune(tuned, "--n-trials", "1", "--epochs", "3")
    # the largest rate and weight decay params allow: the loss turns NaN within three epochs
    load(tuned).enqueue_trial({"train.learning_rate": 10.0, "train.momentum": 0.9,
                               "train.batch_size": 32, "model.dropout": 0.0, "model.l2": 1.0})
    tune(tuned, "--n-trials", "3", "--epochs", "3")
    trials = load(tuned).trials
    diverged = [t for t in trials if t.params.get("train.learning_rate") == 10.0]
    assert diverged and diverged[0].state in (TrialState.FAIL, TrialState.PRUNED)
    assert len(finished(trials)) == 3


def start_workers(project, count: int, *args: str) -> list[subprocess.Popen]:
    """`count` tune.py workers started at the same instant, as a shell loop with `&` does."""
    command = [sys.executable, "src/tune.py", "--epochs", "1", *args]
    return [subprocess.Popen(command, cwd=project, env=tool_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for _ in range(count)]


def wait_for_workers(workers: list[subprocess.Popen]) -> None:
    """Every worker exits 0 without a traceback (a worker standing down is no failure)."""
    for worker in workers:
        _, stderr = worker.communicate(timeout=900)
        assert worker.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]


def assert_one_study(trials, runs, n_trials: int) -> None:
    """Exactly the budget of complete trials, none failed, and one MLflow parent run."""
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == n_trials, states
    assert TrialState.FAIL not in states and len(trials) == n_trials, states
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
               for r in runs if r is not parents[0])


def test_three_workers_started_together_share_the_default_storage(tuned):
    # nothing exists yet: no optuna.db, no mlflow.db; all three create them at the same instant
    wait_for_workers(start_workers(tuned, 3, "--n-trials", "4"))
    assert_one_study(load(tuned).trials, trial_runs(tuned), 4)


def test_ctrl_c_leaves_the_study_consistent(tuned):
    # a job started in the background (as CI may run us) inherits SIGINT ignored: undo that,
    # as a terminal's Ctrl-C would reach a foreground process
    worker = subprocess.Popen([sys.executable, "src/tune.py", "--epochs", LONG, "--n-trials", "1"],
                              cwd=tuned, env=tool_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not training(tuned, "optuna.trial"):  # then interrupted in its training
        assert worker.poll() is None and time.monotonic() < deadline, worker.stdout.read()
        time.sleep(0.2)
    worker.send_signal(signal.SIGINT)
    status, output = worker.wait(timeout=120), worker.stdout.read()
    assert status == 130, output
    (trial,) = load(tuned).trials
    assert trial.state == TrialState.FAIL  # not left RUNNING
    assert 0 < len(trial.intermediate_values) < int(LONG)
    statuses = {r.data.tags.get("optuna.trial"): r.info.status for r in trial_runs(tuned)}
    assert statuses["0"] == "KILLED"
    tune(tuned, "--n-trials", "1", "--epochs", LONG)
    first, second = load(tuned).trials
    assert first.state == TrialState.FAIL and finished([second])


def test_multi_objective_reports_the_pareto_front(tuned):
    out = tune(tuned, "--n-trials", "2", "--multi-objective", "--study-name", "pareto")
    study = load(tuned, "pareto")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert "Pareto front" in out.stdout
    assert all(len(t.values) == 2 for t in study.trials if t.state == TrialState.COMPLETE)
