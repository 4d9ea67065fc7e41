"""`tune.py --add-run`: a finished pipeline run becomes a complete trial of a study."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

import known_runs
import tracking
from cli import UserError
from conftest import RECIPE, ROOT, SPACE, sh
from params import parse_params, parse_tune, read_yaml, update_yaml, with_overrides
from search_space import distributions, sample

REAL = read_yaml(ROOT / "params.yaml")

# the recipe as the pipeline trains it: the rate scaled to batch 64 (reference batch 32)
RECIPE_RUN = ["-S", "model.dropout=0.25", "-S", "augment.crop=4", "-S", "train.learning_rate=0.04",
              "-S", "train.batch_size=64"]


def test_added_trials_carry_the_distributions_sampling_makes():
    tune = parse_tune(REAL)
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda trial: sample(trial, tune.space) and 0.0, n_trials=3)
    for trial in study.trials:
        assert trial.distributions == distributions(tune.space)


@pytest.mark.parametrize("values", [[0.8], [0.8, 0.05]], ids=["single", "multi-objective"])
def test_an_added_run_is_a_complete_trial_of_single_and_multi_objective_studies(values):
    tune = parse_tune(REAL)
    study = optuna.create_study(directions=["maximize", "minimize"][:len(values)])
    point = dict(tune.recipe)
    curve = {1: 0.5, 2: 0.8}
    run = optuna.trial.create_trial(
        state=TrialState.COMPLETE, values=values, params=point,
        distributions=distributions(tune.space), intermediate_values=curve,
        user_attrs={"pipeline_run_id": "0" * 32, "added_run": "a-run", "honest_gap": 0.05,
                    "val_accuracy_final": 0.8})
    known_runs.add(study, [run])  # a multi-objective study takes no reports: it was refused
    (added,) = study.trials
    assert added.state == TrialState.COMPLETE and added.values == values
    assert added.intermediate_values == curve and added.params == point


def test_an_added_run_cancels_the_queued_trial_of_its_point_and_no_other():
    """A confirmation queued (WAITING) for a point, then a finished run of that point added:
    the run is the confirmation, so the queued one is cancelled rather than trained twice."""
    tune = parse_tune(REAL)
    study = optuna.create_study(direction="maximize")
    point = dict(tune.recipe)
    other = {**point, "model.dropout": 0.1}
    study.enqueue_trial(point)
    study.enqueue_trial(other)
    run = optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=0.85, params=point,
        distributions=distributions(tune.space),
        user_attrs={"pipeline_run_id": "0" * 32, "added_run": "a-run", "honest_gap": 0.07,
                    "val_accuracy_final": 0.85})
    known_runs.add(study, [run])
    queued, queued_other, added = study.trials
    assert queued.state == TrialState.FAIL and queued.user_attrs["superseded_by"] == "a-run"
    assert queued_other.state == TrialState.WAITING
    assert added.state == TrialState.COMPLETE and added.params == point


def logged(overrides: dict, code: str | None = None) -> SimpleNamespace:
    """A pipeline run of the real params with `overrides`, its params as train.py logs them,
    trained by this training code (or the one `code` names)."""
    params = parse_params(with_overrides(REAL, overrides))
    flat = {"seed": params.seed, "data.md5": params.data.md5, "data.train_images": 20000,
            "data.val_images": 10000}
    for section in ("model", "augment", "train"):
        flat |= {f"{section}.{k}": v for k, v in getattr(params, section).model_dump().items()}
    return SimpleNamespace(info=SimpleNamespace(run_name="a-run", run_id="0" * 32),
                           data=SimpleNamespace(params={k: str(v) for k, v in flat.items()},
                                                tags={tracking.CODE_TAG: code or
                                                      tracking.training_code()}))


def test_a_run_is_the_point_it_trained_or_a_line_saying_how_it_is_not():
    tune = parse_tune(REAL, {"epochs": 10})  # 10 epochs per trial
    recipe = {**tune.recipe, "train.epochs": tune.epochs, "train.backend": "jax"}
    assert known_runs._point(logged(recipe), REAL, tune, 20000, 10000) == tune.recipe
    with pytest.raises(UserError, match=r"a-run: outside the study's space: augment.cutout=5$"):
        known_runs._point(logged({**recipe, "augment.cutout": 5}), REAL, tune, 20000, 10000)
    with pytest.raises(UserError, match=r"it differs in data.train_images 20000 \(study: 40000\); "
                       r"model.l2 0.001 \(study: 0.0\); train.epochs 50 \(study: 10\)$"):
        known_runs._point(logged({**recipe, "model.l2": 0.001, "train.epochs": 50}), REAL, tune,
                          40000, 10000)


def test_a_run_of_other_training_code_is_refused_unless_allowed():
    tune = parse_tune(REAL)
    recipe = {**tune.recipe, "train.epochs": tune.epochs}
    other = logged(recipe, code="0123456789abcdef")
    with pytest.raises(UserError, match=r"^--add-run a-run: trained by other training code "
                       r"\(code.training 0123456789abcdef, this study's [0-9a-f]{16}\); add "
                       r"--allow-other-code to count it anyway$"):
        known_runs._point(other, REAL, tune, 20000, 10000)
    untagged = logged(recipe)
    del untagged.data.tags[tracking.CODE_TAG]  # a run from before the tag existed
    with pytest.raises(UserError, match=r"code.training not recorded"):
        known_runs._point(untagged, REAL, tune, 20000, 10000)
    assert known_runs._point(other, REAL, tune, 20000, 10000, allow_other_code=True) == \
        tune.recipe


def test_the_training_code_digest_follows_the_training_modules(tmp_path, monkeypatch):
    before = tracking.training_code()
    copy = tmp_path / "src"
    copy.mkdir()
    for name in tracking.TRAINING_CODE:
        (copy / name).write_bytes((ROOT / "src" / name).read_bytes())
    (copy / "tracking.py").write_text("")
    monkeypatch.setattr(tracking, "__file__", str(copy / "tracking.py"))
    assert tracking.training_code() == before
    with open(copy / "augment.py", "a") as source:
        source.write("\n# another augmentation\n")
    assert tracking.training_code() != before


def tune_py(project, *args, check=True):
    return sh(sys.executable, "src/tune.py", "--epochs", "2", *args, cwd=project, check=check)


@pytest.mark.slow
def test_a_run_that_is_the_recipe_takes_its_place_and_is_not_trained_again(project):
    sh("dvc", "repro", "preprocess", cwd=project)
    update_yaml(project / "params.yaml", {"tune.space": SPACE, "tune.recipe": RECIPE,
                                          "tune.variants": [{"augment.crop": 0}],
                                          "tune.pruner": "none", "tune.max_gap": 0.5,
                                          "tune.lr_reference_batch": 32})
    sh("git", "commit", "-qam", "tune settings", cwd=project)
    sh("dvc", "exp", "run", "-n", "recipe-run", *RECIPE_RUN, cwd=project)
    sh("git", "checkout", "params.yaml", cwd=project)  # dvc exp run left its values there
    storage = f"sqlite:///{project / 'optuna.db'}"

    # a run that is not a point of the study (it trained on all 240 images) nor a run at the
    # pipeline's length (now 3 epochs): one line naming what differs, nothing created
    update_yaml(project / "params.yaml", {"train.epochs": 3})
    refused = tune_py(project, "--train-limit", "100", "--add-run", "recipe-run", check=False)
    sh("git", "checkout", "params.yaml", cwd=project)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "tune: error: --add-run recipe-run: not a point of this study: it differs in "
        "data.train_images 240 (study: 100)")
    assert "regularization" not in optuna.get_all_study_names(storage)
    missing = tune_py(project, "--add-run", "no-such-run", check=False)
    assert missing.returncode == 1 and "no finished, evaluated run" in missing.stderr

    out = tune_py(project, "--n-trials", "2", "--add-run", "recipe-run").stdout
    study = optuna.load_study(study_name="regularization", storage=storage)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # budget 2: one trained
    added, trained = trials
    assert added.params == RECIPE and "added_run" in added.user_attrs
    assert trained.params == {**RECIPE, "augment.crop": 0}  # the variant; the recipe was not
    assert trained.user_attrs["recipe_variant"] == 1        # enqueued again

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["cifar10-alexnet"], output_format="list",
                             filter_string="attributes.run_name = 'recipe-run'")[0]
    curve = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert added.value == pytest.approx(curve[-1].value)
    assert added.intermediate_values == pytest.approx({m.step: m.value for m in curve})
    gap = run.data.metrics["honest_gap"]
    # Optuna's own form and the list optuna-dashboard reads (which Optuna names "0")
    expected = pytest.approx(gap - 0.5)
    assert added.constraints == {"honest_gap": expected, "0": expected}
    assert f"added as trial {added.number}" in out

    # a rerun with the same run adds nothing
    again = tune_py(project, "--n-trials", "2", "--add-run", "recipe-run").stdout
    assert f"is trial {added.number} already" in again
    assert len(optuna.load_study(study_name="regularization", storage=storage).trials) == 2

    # a study of shorter trials counts the run (the pipeline's 2 epochs on all its images) as a
    # confirmed trial as it is: its winner, with nothing trained at the pipeline's length
    short = tune_py(project, "--epochs", "1", "--n-trials", "1", "--study-name", "short",
                    "--confirm", "0", "--add-run", "recipe-run").stdout
    (confirmed,) = optuna.load_study(study_name="short-confirm", storage=storage).trials
    assert confirmed.user_attrs["added_run"] == "recipe-run" and confirmed.params == RECIPE
    assert "the run recipe-run, added -> val accuracy" in short
    assert "best params written to reports/best_params.yaml (confirmed at the pipeline's " \
        "length, 2 epochs on 240 images)" in short
    (trial,) = optuna.load_study(study_name="short", storage=storage).get_trials(
        states=(TrialState.COMPLETE,))
    assert sorted(trial.intermediate_values) == [1]  # its own trial trained the short length
