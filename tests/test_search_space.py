"""Unit tests of the tuning pieces that need no training: space, pruning, study settings."""

from __future__ import annotations

import time

import numpy as np
import optuna
import pytest

import known_runs
import tune as tune_script
from cli import UserError
from conftest import NO_STARTING_POINTS, ROOT
from objective import Objective, Pruning
from params import ParamsError, parse_tune, read_yaml, with_overrides
from search_space import as_nested, distributions, exp_run_command, sample, trial_params
from shared_study import make_study, run_study

# the real params without the recipe, so that a changed space is judged alone
RAW = with_overrides(read_yaml(ROOT / "params.yaml"), NO_STARTING_POINTS)


def test_every_space_key_is_a_param_and_every_sample_validates():
    tune = parse_tune(RAW)
    study = optuna.create_study()
    for _ in range(20):
        trial = study.ask()
        point = sample(trial, tune.space)
        params = trial_params(RAW, point, tune)  # raises if a sampled value is out of range
        assert params.train.epochs == tune.epochs
        assert params.model.dropout == point["model.dropout"]
        study.tell(trial, 0.5)


@pytest.mark.parametrize(("flags", "message"), [
    ({"n_trials": 0}, "--n-trials: Input should be greater than 0 (got 0)"),
    ({"epochs": -1, "n_trials": 3}, "--epochs: Input should be greater than 0 (got -1)"),
    ({"train_limit": 0}, "--train-limit: Input should be greater than 0 (got 0)"),
])
def test_a_bad_flag_is_named_as_the_flag(flags, message):
    with pytest.raises(ParamsError) as error:
        parse_tune(RAW, flags)
    assert str(error.value) == message


def test_a_bad_tune_key_in_params_yaml_is_named_as_the_key():
    with pytest.raises(ParamsError) as error:
        parse_tune(with_overrides(RAW, {"tune.n_trials": 0}), {"epochs": 2})
    assert str(error.value) == "params.yaml: tune.n_trials: Input should be greater than 0 (got 0)"


def test_bad_space_is_refused_naming_the_key():
    bad = with_overrides(RAW, {"tune.space": {"train.nonsense": {"low": 0.0, "high": 1.0}}})
    with pytest.raises(ParamsError, match="train.nonsense"):
        parse_tune(bad)
    reversed_range = with_overrides(RAW, {"tune.space": {"model.dropout": {"low": 0.5,
                                                                           "high": 0.1}}})
    with pytest.raises(ParamsError, match="tune.space.model.dropout"):
        parse_tune(reversed_range)


@pytest.mark.parametrize(("entry", "refused"), [
    ({"low": 0.0, "high": 1.0}, "a range needs a numeric param"),  # a Literal
    ({"choices": ["constant", "warmup"]}, "'warmup' is refused"),
    ({"choices": [1, 2]}, "value 1 is refused"),  # a wrong type
])
def test_mistyped_categorical_entry_is_refused_before_any_trial(entry, refused):
    raw = with_overrides(RAW, {"tune.space": {"train.lr_schedule": entry}})
    with pytest.raises(ParamsError, match=rf"^params.yaml: tune.space.train.lr_schedule: "
                                          rf".*{refused}"):
        parse_tune(raw)


@pytest.mark.parametrize(("key", "entry", "refused"), [
    ("augment.flip", {"low": 0, "high": 1}, "a range needs a numeric param"),  # a bool
    ("model.dropout", {"low": 0.0, "high": 1.5}, "value 1.5 is refused"),  # beyond the schema
    ("model.dropout", {"choices": ["high"]}, "'high' is refused"),
    ("train.batch_size", {"choices": [32, 64.0]}, "value 64.0 is refused"),
    ("train.batch_size", {"low": 16.5, "high": 64}, "whole numbers"),
])
def test_space_values_the_schema_refuses_are_refused_naming_the_key(key, entry, refused):
    with pytest.raises(ParamsError, match=rf"^params.yaml: tune.space.{key}: .*{refused}"):
        parse_tune(with_overrides(RAW, {"tune.space": {key: entry}}))


def test_params_without_tune_section_is_a_one_line_error(tmp_path, monkeypatch):
    no_tune = (ROOT / "params.yaml").read_text().split("\ntune:")[0]
    (tmp_path / "params.yaml").write_text(no_tune)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="^params.yaml: tune: missing section"):
        tune_script.tune(tune_script.parse_args([]))


def test_point_maps_to_params_layout_and_dvc_command():
    point = {"model.dropout": 0.25, "augment.flip": True, "train.lr_schedule": "cosine"}
    assert as_nested(point) == {"model": {"dropout": 0.25}, "augment": {"flip": True},
                                "train": {"lr_schedule": "cosine"}}
    assert exp_run_command(point) == ("dvc exp run -S model.dropout=0.25 "
                                      "-S augment.flip=true -S train.lr_schedule=cosine")


def test_pruning_callback_reports_each_epoch_and_stops_when_told():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=0.4))
    trial = study.ask()
    callback = Pruning(trial)
    callback.on_epoch_end(0, {"val_accuracy": 0.6})
    with pytest.raises(optuna.TrialPruned):
        callback.on_epoch_end(1, {"val_accuracy": 0.3})
    assert study.trials[0].intermediate_values == {1: 0.6, 2: 0.3}


def test_a_late_learning_starting_point_survives_a_recipe_ahead_at_the_first_rung(tmp_path):
    """Hyperband, one bracket: at a rung only the best of fewer than three trials survives. The
    recipe is far ahead at epoch 2; the enqueued variant (cutmix, say) learns late and is not
    pruned, while a sampled trial as weak as it is; the variant's rung is still recorded."""
    raw = with_overrides(read_yaml(ROOT / "params.yaml"), {
        "tune.pruner": "hyperband", "tune.min_epochs": 2, "tune.epochs": 6,
        "tune.variants": [{"augment.cutmix": 1.0}],
        "tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}"})
    study = make_study(parse_tune(raw))

    def train(curve):
        trial = study.ask()
        callback = Pruning(trial)
        try:
            for epoch, accuracy in enumerate(curve):
                callback.on_epoch_end(epoch, {"val_accuracy": accuracy})
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return trial.number, "pruned"
        study.tell(trial, curve[-1])
        return trial.number, trial.user_attrs

    assert train([0.5, 0.6, 0.65, 0.7, 0.72, 0.74]) == (0, {"recipe": True})
    assert train([0.1, 0.2, 0.5, 0.7, 0.8, 0.85]) == (1, {"recipe_variant": 1})
    assert train([0.1, 0.2, 0.5, 0.7, 0.8, 0.85]) == (2, "pruned")  # sampled: no such grace
    variant = study.trials[1]
    assert any(key.startswith("completed_rung") for key in variant.system_attrs)  # it competed


def test_an_added_run_competes_at_the_rungs_with_its_own_curve(tmp_path):
    """A finished run added to a study (known_runs.py) reaches the pruner's rungs with the value
    it had at each rung's epoch, as a trial trained there would: a later trial is compared with
    it."""
    raw = with_overrides(read_yaml(ROOT / "params.yaml"), {
        "tune.pruner": "hyperband", "tune.min_epochs": 2, "tune.epochs": 6,
        "tune.recipe": None, "tune.variants": [],
        "tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}"})
    tune = parse_tune(raw)
    study = make_study(tune)
    point = {key: spec.choices[0] if hasattr(spec, "choices") else spec.low
             for key, spec in tune.space.items()}
    curve = {1: 0.3, 2: 0.6, 3: 0.62, 4: 0.7, 5: 0.75, 6: 0.8}
    added = optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, value=0.8, params=point,
        distributions=distributions(tune.space), intermediate_values=curve,
        user_attrs={"pipeline_run_id": "0" * 32, "added_run": "a-run",
                    "val_accuracy_final": 0.8, "honest_gap": 0.05})
    known_runs.add(study, [added])
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.8
    assert trial.intermediate_values == curve and trial.user_attrs["added_run"] == "a-run"
    assert trial.system_attrs["completed_rung_0"] == 0.6  # epoch 2's value, not its last
    # a sampled trial behind it at the first rung is pruned there (bootstrap count 0: one
    # competitor is enough)
    weak = study.ask()
    weak.report(0.1, 1)
    assert not weak.should_prune()
    weak.report(0.2, 2)
    assert weak.should_prune()


def test_a_study_refuses_an_invocation_that_changes_what_its_trials_mean(tmp_path):
    from search_space import fixed_params

    raw = with_overrides(RAW, {"tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}"})
    tune = parse_tune(raw)
    make_study(tune, train_images=400, fixed=fixed_params(raw, tune))
    # a budget is not identity, nor how a trial runs
    make_study(parse_tune(raw, {"n_trials": 3}), train_images=400, fixed=fixed_params(
        with_overrides(raw, {"train.mixed_precision": "off"}), tune))
    changes = [({"tune.max_gap": 0.05}, {}, "tune.max_gap 0.08, this invocation has 0.05"),
               ({"tune.gap_growth": 1.0}, {}, "tune.gap_growth 2.0, this invocation has 1.0"),
               ({"tune.lr_reference_batch": 32}, {}, "tune.lr_reference_batch 128, this "
                                                     "invocation has 32"),
               ({}, {"epochs": 3}, f"tune.epochs {tune.epochs}, this invocation has 3"),
               ({}, {"train_limit": 100}, "training images 400, this invocation has 100"),
               ({"tune.space": {**RAW["tune"]["space"], "model.dropout": {"low": 0.1,
                                                                          "high": 0.5}}}, {},
                'tune.space model.dropout {"low": 0.0, "high": 0.5}, this invocation has '
                '{"low": 0.1, "high": 0.5}'),
               ({"seed": 1}, {}, "seed 42, this invocation has 1"),
               ({"data.md5": "0" * 32}, {}, f'data.md5 "{RAW["data"]["md5"]}", this invocation '
                                           f'has "{"0" * 32}"'),
               ({"model.l2": 0.001}, {}, "model.l2 0.0, this invocation has 0.001"),
               ({"tune.multi_objective": True}, {}, "tune.multi_objective false, this "
                                                    "invocation has true")]
    for keys, flags, message in changes:
        with pytest.raises(UserError) as refused:
            changed = with_overrides(raw, keys)
            make_study(parse_tune(changed, flags), train_images=flags.get("train_limit", 400),
                       fixed=fixed_params(changed, tune))
        assert str(refused.value) == (f"study 'regularization' was made with {message}: use the "
                                      "study's value, or --study-name for a new study")


def test_a_study_made_before_gap_growth_keeps_its_trials_limit(tmp_path):
    """A study made before `tune.gap_growth` held its short trials to tune.max_gap itself:
    continuing it under a scaled limit would mix trials held to two limits."""
    from search_space import fixed_params
    from shared_study import IDENTITY

    raw = with_overrides(RAW, {"tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}"})
    tune = parse_tune(raw)
    study = make_study(tune, train_images=400, fixed=fixed_params(raw, tune))
    old = {k: v for k, v in study.user_attrs[IDENTITY].items() if k != "tune.gap_growth"}
    study.set_user_attr(IDENTITY, old)
    with pytest.raises(UserError, match="was made with tune.gap_growth 1.0, this invocation "
                                        "has 2.0"):
        make_study(tune, train_images=400, fixed=fixed_params(raw, tune))
    unscaled = with_overrides(raw, {"tune.gap_growth": 1.0})
    make_study(parse_tune(unscaled), train_images=400, fixed=fixed_params(unscaled, tune))


@pytest.mark.parametrize(("pruner", "multi", "epochs", "expected"), [
    ("hyperband", False, 5, optuna.pruners.HyperbandPruner),
    ("median", False, 5, optuna.pruners.MedianPruner),
    ("none", False, 5, optuna.pruners.NopPruner),
    ("hyperband", True, 5, optuna.pruners.NopPruner),  # Optuna prunes single objectives only
    ("median", False, 2, optuna.pruners.NopPruner),  # no epoch left to prune: epochs = min_epochs
])
def test_study_settings(tmp_path, pruner, multi, epochs, expected):
    tune = parse_tune(with_overrides(RAW, {
        "tune.pruner": pruner, "tune.multi_objective": multi,
        "tune.epochs": epochs, "tune.min_epochs": 2,
        "tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}"}))
    study = make_study(tune)
    assert isinstance(study.pruner, expected)
    assert len(study.directions) == (2 if multi else 1)
    # optuna-dashboard and the plots name the objectives instead of "Objective 0"
    assert study.metric_names == (["val_accuracy", "honest_gap"] if multi else ["val_accuracy"])


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_no_trial_is_pruned_before_min_epochs(tmp_path, pruner):
    tune = parse_tune(with_overrides(RAW, {
        "tune.pruner": pruner, "tune.min_epochs": 2, "tune.epochs": 4,
        "tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}"}))
    study = make_study(tune)
    for _ in range(4):  # strong finished trials: a weak one is pruned as soon as it may be
        trial = study.ask()
        for epoch in range(1, 5):
            trial.report(0.9, epoch)
            assert not trial.should_prune()  # Hyperband records its rungs on this call
        study.tell(trial, 0.9)
    weak = study.ask()
    weak.report(0.1, 1)
    assert not weak.should_prune()
    weak.report(0.1, 2)
    assert weak.should_prune()


@pytest.mark.usefixtures("restore_policy")
def test_a_trial_is_scored_under_the_policy_it_trained_in(tmp_path, monkeypatch):
    """tune.py resets Keras after a trial; the honest gap is measured before that, in the dtype
    policy (and distribution) the model was trained under."""
    import keras
    import mlflow

    import cifar
    import scoring
    from conftest import TINY

    raw = with_overrides(RAW, TINY | {"train.mixed_precision": "on", "train.epochs": 1})
    tune = parse_tune(raw, {"epochs": 1, "multi_objective": True, "max_gap": None})
    rng = np.random.default_rng(0)
    split = cifar.Split(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
                        rng.integers(0, 10, 64).astype(np.uint8))
    seen = []
    real_gap = scoring.honest_gap

    def spy(model, data, val_accuracy, batch_size):
        seen.append(keras.mixed_precision.global_policy().name)
        return real_gap(model, data, val_accuracy, batch_size)

    monkeypatch.setattr(scoring, "honest_gap", spy)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("scoring")
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.optimize(Objective(raw, tune, split, split, None), n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert seen == ["mixed_bfloat16"]  # "on" on a CPU, as trained; not float32 after reset


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_retried(tmp_path):
    """A worker killed between taking a trial and its first heartbeat leaves a RUNNING trial
    Optuna never finds stale; the study's other workers give it a heartbeat, then fail and retry
    it a grace period later, instead of waiting for it forever."""
    tune = parse_tune(with_overrides(RAW, {
        "tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}", "tune.n_trials": 1,
        "tune.heartbeat_interval": 1, "tune.grace_period": 1, "tune.max_retry": 1}))
    study = make_study(tune)
    orphan = study.ask()  # RUNNING, and no heartbeat thread ever beats for it
    orphan.suggest_float("model.dropout", 0.0, 0.5)
    run_study(study, lambda trial: 0.5, tune, deadline=time.monotonic() + 60)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[orphan.number].state == optuna.trial.TrialState.FAIL
    (retry,) = [t for t in trials.values() if t.system_attrs.get("failed_trial") == orphan.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == {"model.dropout": orphan.params["model.dropout"]}


def test_a_retry_of_a_trial_that_passed_a_rung_meets_the_rung_again(tmp_path):
    """A dead worker's trial had passed the first rung. Its retry trains from epoch 1, so it must
    compete at that rung again: Optuna's retry copies the dead trial's rungs, and with them the
    pruner would wait for a rung past the trial's end and never prune the retry."""
    tune = parse_tune(with_overrides(RAW, {
        **NO_STARTING_POINTS, "tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "tune.pruner": "hyperband", "tune.min_epochs": 2, "tune.epochs": 6,
        "tune.heartbeat_interval": 1, "tune.grace_period": 1, "tune.max_retry": 1}))
    study = make_study(tune)
    dead = study.ask()
    sample(dead, tune.space)
    Pruning(dead).on_epoch_end(1, {"val_accuracy": 0.5})  # epoch 2: the first rung
    assert "completed_rung_0" in study.trials[0].system_attrs
    getattr(study._storage, "_backend", study._storage).record_heartbeat(dead._trial_id)
    time.sleep(2.5)  # its worker is silent past the grace period (whole seconds in SQLite)
    optuna.storages.fail_stale_trials(study)
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.state == optuna.trial.TrialState.WAITING
    assert retry.params == dead.params
    assert not [key for key in retry.system_attrs if key.startswith("completed_rung")]


def test_a_worker_whose_trial_was_failed_as_stale_while_it_trained_goes_on(tmp_path, capsys):
    """A worker paused longer than the grace period (suspended, swapping) finds its trial
    failed by another worker, which queued its retry: Optuna refuses its result; the worker
    says so and takes its next trial instead of dying with a traceback."""
    tune = parse_tune(with_overrides(RAW, {
        "tune.storage": f"sqlite:///{tmp_path / 'optuna.db'}", "tune.n_trials": 1}))
    study = make_study(tune)
    calls = []

    def objective(trial):
        calls.append(trial.number)
        trial.suggest_float("model.dropout", 0.0, 0.5)
        if len(calls) == 1:  # what another worker's fail_stale_trials does meanwhile
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return 0.5

    run_study(study, objective, tune, deadline=time.monotonic() + 60)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert "tune: trial 0 was failed while it trained: this worker was silent longer than " \
        "tune.grace_period" in capsys.readouterr().out


def test_a_pruned_trial_s_run_ends_finished_with_its_state_as_a_tag(tmp_path):
    """Pruning is a verdict, not a fault: the run shows as finished in the MLflow UI (as
    Optuna's MLflow callback ends it), tagged PRUNED, without final scores."""
    import mlflow

    import cifar
    from conftest import TINY

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    raw = with_overrides(RAW, TINY)
    tune = parse_tune(raw, {"epochs": 2, "max_gap": None})
    rng = np.random.default_rng(0)
    split = cifar.Split(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
                        rng.integers(0, 10, 64).astype(np.uint8))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("pruned")
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    study.optimize(Objective(raw, tune, split, split, None), n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    run = mlflow.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"
    assert "val_accuracy_final" not in run.data.metrics and "val_accuracy" in run.data.metrics
