"""Optuna study over the seed's regularization, every trial tracked in MLflow.

    python src/tune.py                          # settings from the `tune` section of params.yaml
    python src/tune.py --n-trials 30 --epochs 5 --train-limit 10000
    python src/tune.py --storage postgresql://host/db   # many workers, one study
    python src/tune.py --apply                  # also write the best point into params.yaml

Needs the preprocessed data (`dvc repro preprocess`). Each trial trains `tune.epochs` epochs on the
first `tune.train_limit` training images and scores validation accuracy; the honest gap (train
accuracy in inference mode minus validation accuracy) is recorded for every trial and is the
second objective with `--multi-objective`. Rerunning the same command continues the study up to
`--n-trials` finished (complete or pruned) trials; several processes may run it at once on the same
storage.
"""

from __future__ import annotations

import backend  # noqa: F401  (first: sets KERAS_BACKEND from params.yaml)

# isort: split

import argparse
import time
import warnings
from pathlib import Path
from typing import get_args

import keras
import mlflow
import optuna
from optuna.trial import TrialState

import atomic
import cli
import study_report
import tracking
from cifar import Split
from evaluate import measure
from params import load_params, read_yaml, update_yaml
from preprocess import load_split
from search_space import (
    Tune,
    as_nested,
    exp_run_command,
    overrides,
    parse_tune,
    sample,
    trial_params,
)
from train import fit

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what the trial budget counts
ALIVE = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
MAX_FAILURES_IN_A_ROW = 5


class BudgetReached(Exception):
    """Other workers already hold the last trials of the budget."""


def make_storage(tune: Tune) -> optuna.storages.RDBStorage:
    url = tune.storage or f"sqlite:///{tracking.project_root() / 'optuna.db'}"
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {
        "pool_pre_ping": True}
    with warnings.catch_warnings():  # experimental since Optuna 2.8, the supported way
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=tune.max_retry)
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=tune.heartbeat_interval,
        grace_period=tune.grace_period, heartbeat_stale_trial_callback=retry)


def make_pruner(tune: Tune) -> optuna.pruners.BasePruner:
    """No trial is pruned before `tune.min_epochs` epochs (epoch-1 accuracy is mostly noise)."""
    if (tune.multi_objective  # Optuna prunes single objectives only
            or tune.pruner == "none" or tune.min_epochs >= tune.epochs):
        return optuna.pruners.NopPruner()
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=tune.min_epochs,
                                              max_resource=tune.epochs)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=tune.min_epochs)


def make_study(tune: Tune) -> optuna.Study:
    # Unseeded: workers sharing a study would otherwise sample the same points.
    directions = ["maximize", "minimize"] if tune.multi_objective else ["maximize"]
    sampler = (optuna.samplers.TPESampler() if tune.sampler == "tpe"
               else optuna.samplers.RandomSampler())
    study = optuna.create_study(storage=make_storage(tune), study_name=tune.study_name,
                                sampler=sampler, pruner=make_pruner(tune), directions=directions,
                                load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise cli.StageError(f"study {tune.study_name!r} exists with other objectives; "
                             "use --study-name for a new one")
    return study


class Pruning(keras.callbacks.Callback):
    """Report each epoch's validation accuracy; stop the trial when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        super().__init__()
        self.trial = trial

    def on_epoch_end(self, epoch, logs=None):
        self.trial.report(float(logs["val_accuracy"]), step=epoch + 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")


class Objective:
    def __init__(self, raw: dict, tune: Tune, train_split: Split, val_split: Split):
        self.raw, self.tune = raw, tune
        self.train_split, self.val_split = train_split, val_split
        self.budget_reached = False

    def __call__(self, trial: optuna.Trial):
        # Workers racing for the last places: the lower trial numbers win, the others stand down.
        alive = [t for t in trial.study.get_trials(deepcopy=False, states=ALIVE)
                 if t.number < trial.number]
        if len(alive) >= self.tune.n_trials:
            self.budget_reached = True
            trial.set_user_attr("not_run", "budget reached by other workers")
            raise BudgetReached(f"trial {trial.number}: budget of {self.tune.n_trials} reached")
        point = sample(trial, self.tune.space)
        params = trial_params(self.raw, point, self.tune)
        tags = {"optuna.study": self.tune.study_name, "optuna.trial": str(trial.number)}
        with tracking.run(run_name=f"trial-{trial.number}", nested=True, tags=tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params({**overrides(point, self.tune), "train.epochs": self.tune.epochs,
                               "data.train_images": len(self.train_split)})
            try:
                result = fit(params, self.train_split, self.val_split, verbose=0,
                             callbacks=[] if self.tune.multi_objective else [Pruning(trial)],
                             on_epoch=lambda model, history: mlflow.log_metrics(
                                 {k: v for k, v in history[-1].items() if k != "epoch"},
                                 step=history[-1]["epoch"]))
            except optuna.TrialPruned:
                mlflow.set_tag("optuna.state", "PRUNED")
                mlflow.end_run("KILLED")
                raise
            except (Exception, KeyboardInterrupt):  # Optuna records both as FAIL
                mlflow.set_tag("optuna.state", "FAIL")
                raise
            finally:
                keras.backend.clear_session()
            # the saved model is the last epoch's, whose validation the history holds; the gap
            # compares it, in inference mode, with as many training images as validate
            val_accuracy = result.history[-1]["val_accuracy"]
            seen = Split(self.train_split.images[:len(self.val_split)],
                         self.train_split.labels[:len(self.val_split)])
            gap = measure(result.model, seen, params.evaluate.batch_size)[1] - val_accuracy
            scores = {"val_accuracy_final": val_accuracy, "honest_gap": gap,
                      "epochs_trained": len(result.history)}
            if self.tune.max_gap is not None:  # feasible when <= 0; Optuna's best is feasible
                trial.set_constraint("honest_gap", gap - self.tune.max_gap)
                scores["gap_over_max"] = gap - self.tune.max_gap
            mlflow.log_metrics(scores)
            mlflow.set_tag("optuna.state", "COMPLETE")
            for key, value in scores.items():
                trial.set_user_attr(key, value)
        return (val_accuracy, gap) if self.tune.multi_objective else val_accuracy


def start_from_recipe(study: optuna.Study, tune: Tune) -> None:
    """A new study's first trial is the hand recipe (`tune.recipe`): the point to beat."""
    if tune.recipe and not study.get_trials(deepcopy=False):
        study.enqueue_trial(tune.recipe, user_attrs={"recipe": True}, skip_if_exists=True)


def parent_run_id(study: optuna.Study, experiment: str) -> str:
    """The study's one MLflow parent run, created by the first worker that needs it."""
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id and mlflow.tracking.MlflowClient().search_runs(
            [mlflow.get_experiment_by_name(experiment).experiment_id],
            f"attributes.run_id = '{run_id}'"):
        return run_id
    with mlflow.start_run(run_name=study.study_name,
                          tags={"optuna.study": study.study_name}) as run:
        pass
    study.set_user_attr("mlflow_run_id", run.info.run_id)
    return run.info.run_id


def run_study(study: optuna.Study, objective: Objective, tune: Tune) -> None:
    """Run trials until the study has `n_trials` finished ones (or the timeout passes).

    Finished means complete or pruned: a pruned trial got its verdict. Failed trials do not
    count; a dead worker's trial is retried.
    """
    deadline = time.monotonic() + tune.timeout if tune.timeout else None
    failures = 0
    while True:
        with warnings.catch_warnings():  # experimental since Optuna 2.9, still the way to do it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL, then retried
        if len(study.get_trials(deepcopy=False, states=FINISHED)) >= tune.n_trials:
            return
        taken = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        if len(taken) >= tune.n_trials:  # not WAITING: a retry or enqueued point needs a worker
            return  # the remaining trials are running in other workers
        if deadline and time.monotonic() > deadline:
            return
        finished: list[TrialState] = []
        study.optimize(objective, n_trials=1, catch=(Exception,),
                       callbacks=[lambda _, trial, done=finished: done.append(trial.state)])
        if objective.budget_reached:
            return
        failures = failures + 1 if finished == [TrialState.FAIL] else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise cli.StageError(f"{failures} trials in a row failed; see the log above")


def tune(args: argparse.Namespace) -> dict:
    params = load_params()
    raw = read_yaml("params.yaml")
    overrides = {key: value for key, value in {
        "n_trials": args.n_trials, "timeout": args.timeout, "epochs": args.epochs,
        "train_limit": args.train_limit, "study_name": args.study_name,
        "storage": args.storage, "pruner": args.pruner,
        "multi_objective": args.multi_objective or None,
    }.items() if value is not None}
    tune_settings = parse_tune({"tune": {**raw["tune"], **overrides}})
    processed = Path(params.paths.processed)
    if not (processed / "train.npz").is_file():
        raise cli.StageError(f"{processed}/train.npz is missing: run `dvc repro preprocess`")
    train_split = load_split(processed, "train")
    if tune_settings.train_limit:
        limit = tune_settings.train_limit
        train_split = Split(train_split.images[:limit], train_split.labels[:limit])
    val_split = load_split(processed, "val")

    study = make_study(tune_settings)
    start_from_recipe(study, tune_settings)
    experiment = f"{params.mlflow.experiment}-tune"
    tracking.configure(experiment)
    objective = Objective(raw, tune_settings, train_split, val_split)
    with tracking.run(run_id=parent_run_id(study, experiment)):
        # tags, not params: a rerun of the study may ask for another budget
        mlflow.set_tags({f"tune.{k}": str(v) for k, v in tune_settings.model_dump().items()
                         if k not in ("space", "storage")})
        run_study(study, objective, tune_settings)
        best = study_report.report(study, tune_settings)
    if best is None:
        print("tune: no complete trial yet")
        return {}
    atomic.write_text(params.paths.best_params, study_report.yaml_text(as_nested(best)))
    print(f"tune: best params written to {params.paths.best_params}")
    print(f"tune: reproduce with: {exp_run_command(best)}")
    if args.apply:
        update_yaml("params.yaml", best)
        print("tune: params.yaml updated; `dvc repro` trains the winner")
    return best


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, help="finished (complete or pruned) trials")
    parser.add_argument("--timeout", type=float, help="seconds for this invocation")
    parser.add_argument("--epochs", type=int, help="epochs per trial")
    parser.add_argument("--train-limit", type=int, help="training images per trial")
    parser.add_argument("--study-name")
    parser.add_argument("--storage", help="database URL (default: sqlite:///optuna.db)")
    parser.add_argument("--pruner", choices=get_args(Tune.model_fields["pruner"].annotation),
                        help="pruner of this invocation (default: tune.pruner)")
    parser.add_argument("--multi-objective", action="store_true",
                        help="maximize val accuracy and minimize the honest gap")
    parser.add_argument("--apply", action="store_true",
                        help="write the best point into params.yaml (comments kept)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run("tune", lambda: tune(parse_args()))
