"""A study's best short trials confirmed at the pipeline's length (src/confirmation.py).

The tiny project's pipeline trains 2 epochs on its 240 training images; the studies here train
1-epoch trials, so their best ones are confirmed at 2 epochs on all images.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from conftest import NO_STARTING_POINTS, runs_while_running, sh, tool_env, training
from params import read_yaml, update_yaml
from search_space import distributions

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


def tune(project, *args, check=True, **extra_env):
    return sh(sys.executable, "src/tune.py", "--epochs", "1", *args, cwd=project, check=check,
              **extra_env)


def load(project, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'optuna.db'}")


def runs(project):
    return runs_while_running(project, "cifar10-alexnet-tune")


def test_the_best_short_trials_are_trained_at_full_length_and_the_best_of_them_wins(
        short, no_tensorflow):
    update_yaml(short / "params.yaml", {"tune.confirm": 2, "tune.train_limit": 200})
    out = tune(short, "--n-trials", "3", "--apply").stdout
    study, companion = load(short, "regularization"), load(short, "regularization-confirm")
    first, second = sorted((t for t in study.trials if t.state == TrialState.COMPLETE),
                           key=lambda t: t.value, reverse=True)[:2]
    assert [t.state for t in companion.trials] == [TrialState.COMPLETE] * 2
    assert [t.user_attrs["confirms"] for t in companion.trials] == [first.number, second.number]
    assert [t.params for t in companion.trials] == [first.params, second.params]
    for trial in companion.trials:  # train.epochs, not the proxy's 1
        assert sorted(trial.intermediate_values) == [1, 2]
    assert f"confirming trials {first.number}, {second.number} at 2 epochs on all images" in out
    assert f"tune: best short trial {first.number}: val accuracy" in out  # not the winner
    # the winner: the best validation accuracy at full length, whatever the short ranking said
    confirmed = max(companion.trials, key=lambda t: t.value)

    # tracked under the study's parent run, at the pipeline's length
    found = runs(short)
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    confirming = [r for r in found if r.data.tags.get("optuna.confirms")]
    assert len(confirming) == 2
    (run,) = [r for r in confirming
              if r.data.tags["optuna.confirms"] == str(confirmed.user_attrs["confirms"])]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["data.train_images"] == "240"
    assert run.data.tags["optuna.best"] == "true"
    assert parent.data.tags["optuna.best_study"] == "regularization-confirm"
    assert parent.data.tags["optuna.best_measured"].startswith(
        "confirmed at the pipeline's length")
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(confirmed.value, abs=1e-6)
    assert f"Winner: trial {confirmed.number} of 'regularization-confirm', confirming trial " \
        f"{confirmed.user_attrs['confirms']}" in parent.data.tags["mlflow.note.content"]

    # --apply wrote the confirmed point, and best_params.yaml says how it was measured
    applied = read_yaml(short / "params.yaml")
    assert applied["model"]["dropout"] == pytest.approx(confirmed.params["model.dropout"])
    best = (short / "reports/best_params.yaml").read_text()
    assert best.startswith("# measured: confirmed at the pipeline's length, 2 epochs on 240 ")

    # a rerun finds everything done: no trial trained again in either study, and Keras never
    # loaded (TensorFlow, the backend, is blocked)
    again = tune(short, "--n-trials", "3", **no_tensorflow).stdout
    assert len(load(short, "regularization-confirm").trials) == 2
    assert len(load(short, "regularization").trials) == 3
    assert "confirming trials" not in again
    assert "tune: nothing to train: 3 of 3 trials finished in study 'regularization', its " \
        "confirmations done" in again

    # a report judges the study against the budget it ran to (3), not params.yaml's 20; it
    # reads the studies, not the images (as on a machine that shares the study's database):
    # the image counts come from what the studies recorded
    (short / "data/processed").rename(short / "elsewhere")
    declared = f"tune: winner: confirmed trial {confirmed.number}: val accuracy"
    report = tune(short, "--report-only", "--apply").stdout
    assert declared in report
    assert "the winner at the pipeline's length (2 epochs, 240 images): dvc exp run" in report
    assert "the winner at the proxy's length (1 epochs, 200 images)" in report
    missing = tune(short, "--n-trials", "4", check=False)  # training needs them
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == \
        "tune: error: data/processed/train.npz is missing: run `dvc repro preprocess`"
    # a larger budget: no winner until its trials are confirmed, and none left on the run
    bigger = tune(short, "--report-only", "--n-trials", "4").stdout
    assert "tune: no confirmed winner: its confirmation is not done: a rerun does it" in bigger
    (parent,) = [r for r in runs(short) if "mlflow.parentRunId" not in r.data.tags]
    assert not [key for key in parent.data.tags if key.startswith(("best.", "optuna.best_"))]
    assert math.isnan(parent.data.metrics["best_val_accuracy"])
    assert parent.data.tags["mlflow.note.content"].endswith(
        "No winner: its confirmation is not done: a rerun does it.")
    # with --confirm 0 the confirmations made still count
    assert declared in tune(short, "--report-only", "--confirm", "0").stdout


def test_apply_refuses_a_winner_measured_only_on_short_trials(short):
    before = (short / "params.yaml").read_text()
    refused = tune(short, "--n-trials", "2", "--confirm", "0", "--apply", check=False)
    assert refused.returncode != 0
    line = refused.stderr.strip().splitlines()[-1]  # after the trials' logs
    assert line.startswith("tune: error: --apply: no confirmed winner to apply; params.yaml "
                           "unchanged (--apply-unconfirmed"), refused.stderr
    assert (short / "params.yaml").read_text() == before
    # the best short trial is still written out, saying what it was measured on
    best = (short / "reports/best_params.yaml").read_text()
    assert best.startswith("# measured: not confirmed: 1 epochs on 240 images only\n")
    out = tune(short, "--n-trials", "2", "--confirm", "0", "--apply-unconfirmed").stdout
    assert "params.yaml updated with the winner (not confirmed: 1 epochs on 240 images only)" \
        in out
    assert (short / "params.yaml").read_text() != before
    # a report under tune.confirm 1 says the confirmation is still to come, and makes no
    # companion study: only an invocation that trains does
    (short / "params.yaml").write_text(before)
    report = tune(short, "--n-trials", "2", "--report-only").stdout
    assert "tune: no confirmed winner: its confirmation has not started: a rerun does it" in report
    storage = f"sqlite:///{short / 'optuna.db'}"
    assert optuna.get_all_study_names(storage) == ["regularization"]


def test_a_confirmation_killed_mid_way_is_retried_by_the_next_invocation(short):
    # a confirmation long enough to be killed in (about 0.07 s an epoch alone); a dead
    # worker's trial is failed after 2 s
    update_yaml(short / "params.yaml", {"train.epochs": 100, "tune.heartbeat_interval": 1,
                                        "tune.grace_period": 2})
    worker = subprocess.Popen([sys.executable, "src/tune.py", "--epochs", "1", "--n-trials", "2"],
                              cwd=short, env=tool_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not training(short, "optuna.confirms"):  # then killed in its training
        assert worker.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
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


def test_a_confirmation_cut_by_the_timeout_is_queued_again_as_a_confirmation(tmp_path):
    """The invocation's --timeout stops a confirming trial after an epoch; its point is queued
    again with the trial it confirms, and `confirmation.queue` does not queue it twice."""
    import confirmation
    from objective import Objective, TimeoutReached
    from shared_study import make_study

    raw, tune_settings, study, split = _tiny_study(tmp_path)
    study.add_trial(optuna.trial.create_trial(
        value=0.5, params={"model.dropout": 0.1, "train.learning_rate": 0.01},
        distributions=distributions(tune_settings.space)))
    confirming = confirmation.companion(tune_settings, pipeline_epochs=3)
    companion = make_study(confirming)
    assert confirmation.queue(study, companion, tune_settings, "accuracy") == [0]
    passed = time.monotonic() - 1  # the invocation's timeout has passed: stop after an epoch
    companion.optimize(Objective(raw, confirming, split, split, passed),
                       n_trials=1, catch=(TimeoutReached,))
    cut, queued = companion.trials
    assert cut.state == TrialState.FAIL and len(cut.intermediate_values) == 1
    assert queued.state == TrialState.WAITING
    assert queued.user_attrs["confirms"] == 0 and queued.user_attrs["timed_out_trial"] == 0
    assert confirmation.queue(study, companion, tune_settings, "accuracy") == []  # held
    assert confirmation.budget(companion) == 1


def test_a_confirmation_whose_loss_diverged_is_not_queued_again(tmp_path, monkeypatch):
    """A diverging loss is the point's verdict: a rerun would diverge again, so the point is
    not queued again (a dead worker's confirmation is) and the summary says what happened."""
    import confirmation
    import objective
    from fitting import Diverged
    from shared_study import make_study

    raw, tune_settings, study, split = _tiny_study(tmp_path)
    for value, dropout in ((0.5, 0.1), (0.6, 0.2)):
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"model.dropout": dropout, "train.learning_rate": 0.01},
            distributions=distributions(tune_settings.space)))
    confirming = confirmation.companion(tune_settings, pipeline_epochs=2)
    companion = make_study(confirming)
    assert confirmation.queue(study, companion, tune_settings, "accuracy") == [1, 0]

    def diverge(self, epoch, logs=None):
        raise Diverged(f"loss became nan in epoch {epoch + 1}; nothing was saved")

    monkeypatch.setattr(objective.Deadline, "on_epoch_end", diverge)
    companion.optimize(objective.Objective(raw, confirming, split, split, None), n_trials=1,
                       catch=(Diverged,))
    died = companion.ask()  # the other: its worker dies, its retries spent
    companion.tell(died, state=TrialState.FAIL)
    diverged = companion.trials[0]
    assert diverged.state == TrialState.FAIL
    assert diverged.user_attrs["diverged"] == "loss became nan in epoch 1; nothing was saved"
    assert confirmation.queue(study, companion, tune_settings, "accuracy") == [0]
    assert confirmation.summary(study, companion, tune_settings) == [
        "  regularization-confirm trial 0: trial 1 (0.6000, gap nan at the proxy) -> diverged: "
        "loss became nan in epoch 1; nothing was saved"]


def _tiny_study(tmp_path, **settings):
    """A study of 1-epoch trials on 64 random images, and those images."""
    import numpy as np

    import cifar
    from conftest import ROOT, TINY
    from params import parse_tune, with_overrides
    from shared_study import make_study

    raw = with_overrides(read_yaml(ROOT / "params.yaml"), TINY | {
        **NO_STARTING_POINTS, "tune.space": SMALL_SPACE, "tune.max_gap": None,
        "tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}", **settings})
    tune_settings = parse_tune(raw, {"epochs": 1})
    rng = np.random.default_rng(0)
    split = cifar.Split(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
                        rng.integers(0, 10, 64).astype(np.uint8))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("tiny")
    return raw, tune_settings, make_study(tune_settings), split


def test_an_interrupted_starting_point_is_queued_again(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) in the recipe's trial: the trial fails, and the recipe is queued
    again for the next invocation (a study queues its starting points only when it is new)."""
    import objective
    from objective import Objective

    raw, tune_settings, study, split = _tiny_study(
        tmp_path, **{"tune.recipe": {"model.dropout": 0.25, "train.learning_rate": 0.01}})

    def interrupt(self, epoch, logs=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(objective.Deadline, "on_epoch_end", interrupt)
    with pytest.raises(KeyboardInterrupt):
        study.optimize(Objective(raw, tune_settings, split, split, None), n_trials=1)
    cut, queued = study.trials
    assert cut.state == TrialState.FAIL and "recipe" in cut.user_attrs
    assert queued.state == TrialState.WAITING
    assert queued.system_attrs["fixed_params"] == cut.params
    assert queued.user_attrs["recipe"] is True and queued.user_attrs["interrupted_trial"] == 0


def test_a_trial_whose_last_epoch_ends_after_the_timeout_is_scored(tmp_path):
    from objective import Objective, TimeoutReached

    raw, tune_settings, study, split = _tiny_study(tmp_path)
    passed = time.monotonic() - 1  # passed during its only epoch
    study.optimize(Objective(raw, tune_settings, split, split, passed), n_trials=1,
                   catch=(TimeoutReached,))
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE


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
    update_yaml(short / "params.yaml", {"tune.front_end": "gap"})  # the same, set in params
    refused = tune(short, "--n-trials", "1", check=False)
    assert refused.returncode != 0
    assert "tune.front_end gap: a single-objective study has one best trial" in refused.stderr


def test_the_confirmed_winner_has_the_best_val_accuracy_whichever_end_was_confirmed(tmp_path,
                                                                                      capsys):
    """A multi-objective study confirms its front's gap end (`--front-end gap`); among the
    confirmations the winner is still the best validation accuracy within tune.max_gap, not the
    smallest gap, and there is none until every confirmation is done."""
    import confirmation
    from conftest import ROOT
    from params import parse_tune, with_overrides
    from shared_study import make_study

    raw = with_overrides(read_yaml(ROOT / "params.yaml"), {
        **NO_STARTING_POINTS, "tune.space": SMALL_SPACE, "tune.multi_objective": True,
        "tune.max_gap": 0.08, "tune.n_trials": 3, "tune.confirm": 3,
        "tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}"})
    tune_settings = parse_tune(raw)
    confirming = confirmation.companion(tune_settings, pipeline_epochs=50)
    study, companion = make_study(tune_settings), make_study(confirming)
    space = distributions(tune_settings.space)
    # (short, confirmed) accuracy and gap of three points, all on the short front, within the
    # gap limit; the last is over it once confirmed
    figures = [((0.44, 0.02), (0.8403, 0.0482)), ((0.46, 0.04), (0.8633, 0.0728)),
               ((0.52, 0.07), (0.8700, 0.1200))]
    for number, (short, confirmed) in enumerate(figures):
        point = {"model.dropout": 0.1 * number, "train.learning_rate": 0.01}
        study.add_trial(optuna.trial.create_trial(
            values=list(short), params=point, distributions=space,
            user_attrs={"honest_gap": short[1]}, constraints={"honest_gap": short[1] - 0.08}))
        if number < 2:
            companion.add_trial(optuna.trial.create_trial(
                values=list(confirmed), params=point, distributions=space,
                user_attrs={"honest_gap": confirmed[1], "confirms": number},
                constraints={"honest_gap": confirmed[1] - 0.08}))
    assert confirmation.queue(study, companion, tune_settings, "gap") == [2]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("confirm")
    with mlflow.start_run():
        assert confirmation.winner(study, companion, tune_settings, confirming, "gap") is None
        out = capsys.readouterr().out
        assert "tune: best confirmed trial so far 1: val accuracy 0.8633" in out
        assert "1 waiting; waiting: queued confirmations that a rerun trains\n" in out
        last = companion.ask()  # the third confirmation, queued above
        last.set_user_attr("honest_gap", 0.12)
        last.set_constraint("honest_gap", 0.12 - 0.08)
        companion.tell(last, [0.87, 0.12])
        winner = confirmation.winner(study, companion, tune_settings, confirming, "gap")
    assert winner.values == [0.8633, 0.0728]
    out = capsys.readouterr().out
    assert "tune: winner: confirmed trial 1: val accuracy 0.8633, honest gap 0.0728" in out
    assert "--front-end" not in out  # the end chose what was confirmed, not among confirmations


def test_confirmation_is_pending_until_every_best_trial_is_confirmed():
    """What `tune.py` says when there is no confirmed winner: a confirmation still queued (cut
    by --timeout) is "not done", not "none within tune.max_gap"."""
    import confirmation
    from conftest import ROOT
    from params import parse_tune, with_overrides

    tune_settings = parse_tune(with_overrides(read_yaml(ROOT / "params.yaml"), {
        **NO_STARTING_POINTS, "tune.space": SMALL_SPACE, "tune.max_gap": None,
        "tune.n_trials": 3, "tune.confirm": 2}))
    space = distributions(tune_settings.space)
    study, companion = optuna.create_study(direction="maximize"), optuna.create_study()
    for value, dropout in ((0.5, 0.1), (0.6, 0.2)):
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"model.dropout": dropout, "train.learning_rate": 0.01},
            distributions=space))
    assert confirmation.pending(study, companion, tune_settings, "accuracy")  # 2 of 3 trials
    study.add_trial(optuna.trial.create_trial(
        value=0.4, params={"model.dropout": 0.3, "train.learning_rate": 0.01},
        distributions=space))
    assert confirmation.pending(study, companion, tune_settings, "accuracy")  # none queued
    assert confirmation.queue(study, companion, tune_settings, "accuracy") == [1, 0]
    assert confirmation.pending(study, companion, tune_settings, "accuracy")  # queued
    first, second = companion.ask(), companion.ask()
    companion.tell(first, 0.8)
    assert confirmation.pending(study, companion, tune_settings, "accuracy")  # one running
    companion.tell(second, 0.7)
    assert not confirmation.pending(study, companion, tune_settings, "accuracy")
