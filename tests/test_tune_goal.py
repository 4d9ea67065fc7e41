"""What aims the study at the goal: the recipe first, the gap as a constraint, scaled rates."""

from __future__ import annotations

import sys

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import study_report
from conftest import RECIPE, ROOT, SPACE, sh
from params import ParamsError, parse_tune, read_yaml, update_yaml, with_overrides
from search_space import overrides

REAL = read_yaml(ROOT / "params.yaml")


def test_the_winner_s_command_trains_the_images_its_trial_used():
    # a project of 400 training images: the trial used 400, not tune.train_limit's 20000
    from tune import winner_commands

    as_trial, at_length = winner_commands({"model.dropout": 0.3}, trial_epochs=10,
                                          trial_images=400, pipeline_images=400,
                                          pipeline_epochs=50)
    assert as_trial == ("the winner at the proxy's length (10 epochs, 400 images): "
                        "dvc exp run -S model.dropout=0.3 -S train.epochs=10")
    assert at_length == ("the winner at the pipeline's length (50 epochs, 400 images): "
                         "dvc exp run -S model.dropout=0.3")
    fewer, _ = winner_commands({"model.dropout": 0.3}, 10, 20000, 40000, 50)
    assert fewer.endswith("-S train.epochs=10 -S data.train_limit=20000")


def test_the_parent_run_s_settings_are_json_and_the_images_used():
    import json

    from shared_study import study_settings
    from tune import invocation_tags

    tune = parse_tune(REAL)
    tags = invocation_tags(tune, train_images=400)
    assert tags["tune.train_limit"] == "400" and tags["tune.max_gap"] == "0.08"
    assert json.loads(tags["tune.recipe"]) == tune.recipe
    assert json.loads(tags["tune.variants"]) == tune.variants
    settings = study_settings(tune, train_images=400)
    assert settings["tune.max_gap"] == "0.08" and settings["tune.train_limit"] == "400"
    assert settings["tune.gap_growth"] == "2.0"


def test_short_trials_are_held_to_max_gap_over_gap_growth_and_confirmations_to_max_gap():
    """A short trial's gap grows by about tune.gap_growth at the pipeline's length: the study's
    trials are held to max_gap / gap_growth, its confirmations (full length) to max_gap."""
    import confirmation

    tune = parse_tune(REAL)
    assert (tune.max_gap, tune.gap_growth) == (0.08, 2.0)
    assert tune.trial_max_gap == 0.04
    assert tune.gap_limit == "0.04 (tune.max_gap 0.08 / tune.gap_growth 2.0)"
    confirming = confirmation.companion(tune, pipeline_epochs=50)
    assert confirming.trial_max_gap == 0.08 and confirming.gap_limit == "tune.max_gap 0.08"
    unlimited = parse_tune(with_overrides(REAL, {"tune.max_gap": None}))
    assert unlimited.trial_max_gap is None and unlimited.gap_limit == "tune.max_gap None"
    with pytest.raises(ParamsError, match="gap_growth"):
        parse_tune(with_overrides(REAL, {"tune.gap_growth": 0}))


def test_real_recipe_is_a_point_of_the_real_space():
    tune = parse_tune(REAL)
    assert tune.recipe is not None and set(tune.recipe) == set(tune.space)
    assert tune.recipe["augment.crop"] == 4 and tune.recipe["train.momentum"] == 0.9


def test_a_recipe_outside_the_space_is_one_line():
    raw = with_overrides(REAL, {"tune.recipe": {**REAL["tune"]["recipe"],
                                                "train.batch_size": 96}})
    with pytest.raises(ParamsError, match="train.batch_size: 96 is outside the space"):
        parse_tune(raw)


def test_the_variants_follow_the_recipe_with_one_change_each():
    tune = parse_tune(REAL)
    points = tune.starting_points()
    assert points[0] == tune.recipe and len(points) == 1 + len(tune.variants) > 1
    for point, variant in zip(points[1:], tune.variants, strict=True):
        assert point == {**tune.recipe, **variant} and point != tune.recipe


@pytest.mark.parametrize("variants, message", [
    ([{"augment.cutout": 5}], "variant 0 value augment.cutout: 5 is outside the space"),
    ([{"augment.cutmix": 1.0}, {"model.l2": 0.1}], "variant 1: 'model.l2' is not a key of the"),
    ([{}], "tune.variants.0: Dictionary should have at least 1 item"),
])
def test_a_variant_outside_the_space_is_one_line(variants, message):
    with pytest.raises(ParamsError, match=message):
        parse_tune(with_overrides(REAL, {"tune.variants": variants}))


def test_variants_without_a_recipe_are_one_line():
    with pytest.raises(ParamsError, match="variants change the recipe: they need a recipe"):
        parse_tune(with_overrides(REAL, {"tune.recipe": None}))
    assert parse_tune(with_overrides(REAL, {"tune.recipe": None, "tune.variants": []})
                      ).starting_points() == []


def test_learning_rate_scales_with_the_batch():
    tune = parse_tune(REAL)  # lr_reference_batch 128
    point = {"train.learning_rate": 0.05, "train.batch_size": 256}
    assert overrides(point, tune)["train.learning_rate"] == pytest.approx(0.1)
    assert overrides({**point, "train.batch_size": 64}, tune)["train.learning_rate"] == \
        pytest.approx(0.025)


def test_an_infeasible_trial_is_never_the_best():
    study = optuna.create_study(direction="maximize")
    space = {"model.dropout": FloatDistribution(0.0, 0.5)}
    for number, (accuracy, over) in enumerate([(0.9, 0.05), (0.7, -0.01), (0.8, 0.0)]):
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, value=accuracy, params={"model.dropout": number / 10},
            distributions=space, system_attrs={"constraints:honest_gap": over}))
    best = study_report.best(study)
    assert best.number == 2 and best.value == 0.8  # 0.9 is over max_gap, 0.8 is exactly at it
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.95, params={
        "model.dropout": 0.4}, distributions=space, system_attrs={"constraints:honest_gap": 1}))
    assert study_report.best(study).number == 2


def test_the_gap_growth_flag_and_a_study_without_a_limit():
    """`--gap-growth` overrides tune.gap_growth (1 resumes a study made before it); with no
    tune.max_gap there is no limit to scale."""
    from tune import parse_args, settings_of

    assert settings_of(parse_args([]), REAL).gap_growth == 2.0
    assert settings_of(parse_args(["--gap-growth", "1"]), REAL).gap_growth == 1.0
    unlimited = settings_of(parse_args([]), with_overrides(REAL, {"tune.max_gap": None}))
    assert unlimited.gap_growth == 1.0 and unlimited.trial_max_gap is None


def test_with_no_feasible_trial_there_is_no_winner():
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(
        state=TrialState.COMPLETE, value=0.9, params={"model.dropout": 0.1},
        distributions={"model.dropout": FloatDistribution(0.0, 0.5)},
        system_attrs={"constraints:honest_gap": 0.2}))
    assert study_report.best(study) is None


@pytest.mark.parametrize(("n_trials", "said"), [
    (3, " yet (1 of its 3 trials finished: a rerun continues it)"), (1, "")])
def test_no_winner_says_when_the_study_has_trials_left_to_run(n_trials, said):
    """A study stopped early (--timeout, a kill) with no feasible trial so far is not done."""
    from types import SimpleNamespace

    import tune as tune_script

    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(
        state=TrialState.COMPLETE, value=0.9, params={"model.dropout": 0.1},
        distributions={"model.dropout": FloatDistribution(0.0, 0.5)},
        system_attrs={"constraints:honest_gap": 0.2}))
    run = SimpleNamespace(tune=parse_tune(REAL, {"n_trials": n_trials}), full_length=False,
                          end="accuracy")
    assert tune_script.no_winner(run, study, None) == (
        "no complete trial has an honest gap within 0.04 (tune.max_gap 0.08 / "
        f"tune.gap_growth 2.0){said}")


@pytest.mark.parametrize("flag", ["apply", "apply_unconfirmed"])
def test_apply_with_no_winner_at_all_is_an_error(flag, capsys):
    """`tune.py --apply && dvc repro` must not go on with params.yaml as it was."""
    import argparse
    from types import SimpleNamespace

    import tune as tune_script
    from cli import UserError

    args = argparse.Namespace(apply=flag == "apply", apply_unconfirmed=flag != "apply")
    run = SimpleNamespace(args=args, tune=parse_tune(REAL), full_length=False)
    why = "no complete trial has an honest gap within 0.05"
    with pytest.raises(UserError) as refused:
        tune_script.write_winner(run, None, None, "", why)
    option = "--" + flag.replace("_", "-")
    assert str(refused.value) == f"{option}: no winner ({why}); params.yaml unchanged"
    args.apply = args.apply_unconfirmed = False  # without it, a line and nothing else
    assert tune_script.write_winner(run, None, None, "", why) == {}
    assert capsys.readouterr().out == f"tune: no winner: {why}\n"


VARIANTS = [{"augment.crop": 0}]


@pytest.mark.slow
def test_the_recipe_and_its_variants_run_first_and_a_rerun_continues_to_exactly_n(project):
    sh("dvc", "repro", "preprocess", cwd=project)
    update_yaml(project / "params.yaml", {"tune.space": SPACE, "tune.recipe": RECIPE,
                                          "tune.variants": VARIANTS,
                                          "tune.pruner": "none", "tune.max_gap": 0.5,
                                          "tune.lr_reference_batch": 32})

    def tune(trials: int):
        return sh(sys.executable, "src/tune.py", "--epochs", "1", "--n-trials", str(trials),
                  cwd=project)

    tune(2)
    out = tune(3)
    study = optuna.load_study(study_name="regularization",
                              storage=f"sqlite:///{project / 'optuna.db'}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[0].params == RECIPE and trials[0].user_attrs["recipe"] is True
    assert trials[1].params == {**RECIPE, "augment.crop": 0}
    assert trials[1].user_attrs["recipe_variant"] == 1
    assert not any(t.user_attrs.get("recipe") for t in trials[1:])
    assert "recipe_variant" not in trials[2].user_attrs  # sampled
    # the gap is a constraint: max_gap 0.5 for a trial of the pipeline's length, 0.5 / 2.0
    # (tune.gap_growth) for these trials of half its epochs
    for trial in trials:
        gap = trial.user_attrs["honest_gap"]
        # Optuna's own form and the list optuna-dashboard reads (which Optuna names "0")
        expected = pytest.approx(gap - 0.25, abs=1e-4)
        assert trial.constraints == {"honest_gap": expected, "0": expected}
    # the winner is the best confirmed trial (train.epochs 2 against the trials' 1: each
    # invocation's best two trained again), the first of equals; its printed command carries the
    # rate scaled to its batch (reference batch 32)
    confirmed = optuna.load_study(study_name="regularization-confirm",
                                  storage=f"sqlite:///{project / 'optuna.db'}")
    complete = sorted(confirmed.get_trials(states=(TrialState.COMPLETE,)),
                      key=lambda t: t.number)
    assert 2 <= len(complete) <= 3
    for trial in complete:  # held to tune.max_gap itself (the attr is rounded to 4 digits)
        expected = pytest.approx(trial.user_attrs["honest_gap"] - 0.5, abs=1e-4)
        assert trial.constraints == {"honest_gap": expected, "0": expected}
    # each trial's MLflow run says which limit its gap_over_max is measured from
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    for trial, limit in [*((t, "0.25") for t in trials), *((t, "0.5") for t in complete)]:
        run = mlflow.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna.gap_limit"] == limit
        assert run.data.tags["devices.policy"] == "float32"  # the precision it trained in
    best = max((t for t in complete if t.user_attrs["honest_gap"] <= 0.5), key=lambda t: t.value)
    rate = best.params["train.learning_rate"] * best.params["train.batch_size"] / 32
    assert f"-S train.learning_rate={rate!r}" in out.stdout
