"""Optuna study over the seed's regularization, every trial tracked in MLflow.

    python src/tune.py                          # settings from the `tune` section of params.yaml
    python src/tune.py --n-trials 30 --epochs 5 --train-limit 10000
    python src/tune.py --storage postgresql://host/db   # many workers, one study
    python src/tune.py --apply                  # also write the best point into params.yaml
    python src/tune.py --epochs 50 --train-limit 40000 --add-run NAME   # count a 50-epoch run

Needs the preprocessed data (`dvc repro preprocess`). A new study's first trials are the hand
recipe (`tune.recipe`) and its variants (`tune.variants`). Each trial trains `tune.epochs` epochs
(its own full schedule) on the first `tune.train_limit` training images and maximizes validation
accuracy subject to the honest gap (train accuracy in inference mode on all its training images,
minus validation accuracy) staying within `tune.max_gap`, an Optuna constraint; the gap
is the second objective with `--multi-objective`. Rerunning the same command continues the study up
to `--n-trials` finished (complete or pruned) trials; several processes may run it at once on the
same storage, also started at the same instant on an empty database (see shared_study.py).
Progress: Keras' bars on a terminal, otherwise one line per epoch of every trial.
"""

from __future__ import annotations

import backend  # noqa: F401  (first: sets KERAS_BACKEND from params.yaml)

# isort: split

import argparse
import json
import time
from pathlib import Path
from typing import get_args

import keras
import mlflow
import optuna

import atomic
import cli
import confirmation
import known_runs
import progress
import study_report
import tracking
from cifar import Split, load_split
from fitting import fit
from params import Tune, load_params, parse_tune, read_yaml, update_yaml
from scoring import final_scores
from search_space import as_nested, exp_run_command, overrides, sample, trial_params
from shared_study import FINISHED, make_study, parent_run_id, run_study, study_lock

TUNE_DESCRIPTION = ("Optuna studies: one parent run per study (settings as params, the report as "
                    "artifacts, the best trial's point as best.* tags and its scores as "
                    "best_* metrics), one nested run per trial (optuna.feasible: within "
                    "tune.max_gap).")


# the runs table's columns in the MLflow UI (tracking.runs_url)
TUNE_COLUMNS = ("metrics.val_accuracy_final", "metrics.honest_gap", "params.train.epochs",
                "params.data.train_images", "tags.optuna.confirms", "tags.optuna.feasible",
                "tags.optuna.state", "params.model.dropout", "params.train.learning_rate",
                "params.train.batch_size", "params.augment.cutout", "params.augment.mixup",
                "params.augment.cutmix")


# the user attrs a queued point is given (shared_study.make_study, confirmation.queue): a
# timed-out trial's point is queued again with them
QUEUED_ATTRS = ("recipe", "recipe_variant", confirmation.CONFIRMS)


class TimeoutReached(Exception):
    """The invocation's --timeout passed during a trial (Optuna records the trial as FAIL)."""


class Deadline(keras.callbacks.Callback):
    """Stop the trial after the epoch in which the invocation's timeout passed."""

    def __init__(self, deadline: float | None):
        super().__init__()
        self.deadline = deadline

    def on_epoch_end(self, epoch, logs=None):
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutReached(f"stopped after epoch {epoch + 1}: --timeout reached")


class Pruning(keras.callbacks.Callback):
    """Report each epoch's validation accuracy; stop the trial when the pruner says so.

    The study's starting points (the recipe and its variants, shared_study.make_study) run to
    their end: they are what the sampled trials are measured against, and some of them (cutmix,
    mixup) learn late. The pruner still sees them (Hyperband records their rungs when asked), so
    they compete at the rungs; only its answer is ignored for them.
    """

    def __init__(self, trial: optuna.Trial):
        super().__init__()
        self.trial = trial
        attrs = trial.user_attrs
        self.starting_point = "recipe" in attrs or "recipe_variant" in attrs

    def on_epoch_end(self, epoch, logs=None):
        self.trial.report(float(logs["val_accuracy"]), step=epoch + 1)
        if self.trial.should_prune() and not self.starting_point:
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")


class Objective:
    def __init__(self, raw: dict, tune: Tune, train_split: Split, val_split: Split,
                 deadline: float | None):
        self.raw, self.tune = raw, tune
        self.train_split, self.val_split = train_split, val_split
        self.deadline = deadline  # time.monotonic() at which the invocation's timeout passes
        self.confirming = tune.study_name.endswith(confirmation.SUFFIX)

    def __call__(self, trial: optuna.Trial):
        if self.confirming and confirmation.CONFIRMS not in trial.user_attrs:
            raise cli.StageError(f"{self.tune.study_name}: trial {trial.number} has no point to "
                                 "confirm (the study trains queued points only)")
        point = sample(trial, self.tune.space)
        params = trial_params(self.raw, point, self.tune)
        tags = {"optuna.study": self.tune.study_name, "optuna.trial": str(trial.number)}
        if self.confirming:
            tags["optuna.confirms"] = str(trial.user_attrs[confirmation.CONFIRMS])
        tags[tracking.CODE_TAG] = tracking.training_code()
        with tracking.run(run_name=f"{self.tune.study_name}-trial-{trial.number}", nested=True,
                          tags=tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            as_trained = overrides(point, self.tune)  # the rate after batch scaling
            trial.set_user_attr("as_trained", as_trained)  # what the report and --apply write
            mlflow.log_params({**as_trained, "train.epochs": self.tune.epochs,
                               "data.train_images": len(self.train_split)})
            try:
                pruning = [] if self.tune.multi_objective else [Pruning(trial)]
                result = fit(params, self.train_split, self.val_split,
                             verbose=progress.verbosity(),
                             callbacks=[*progress.callbacks(f"trial {trial.number}"), *pruning,
                                        Deadline(self.deadline)],
                             on_epoch=lambda model, history: mlflow.log_metrics(
                                 {k: v for k, v in history[-1].items() if k != "epoch"},
                                 step=history[-1]["epoch"]))
                # scored before the reset below, which also drops the dtype policy and the
                # distribution the model was trained under
                val_accuracy, gap = final_scores(result, self.train_split,
                                                 params.evaluate.batch_size)
            except optuna.TrialPruned:
                mlflow.set_tag("optuna.state", "PRUNED")
                mlflow.end_run("KILLED")
                raise
            except TimeoutReached as stopped:  # its point is trained again by the next run
                mlflow.set_tag("optuna.state", "FAIL")
                mlflow.end_run("KILLED")
                # what it stands for (a starting point, a confirmation) goes with it
                kept = {key: value for key, value in trial.user_attrs.items()
                        if key in QUEUED_ATTRS}
                trial.study.enqueue_trial(trial.params, user_attrs={
                    **kept, "timed_out_trial": trial.number})
                print(f"tune: trial {trial.number} {stopped}; its point is queued for the next "
                      "invocation")
                raise
            except (Exception, KeyboardInterrupt):  # Optuna records both as FAIL
                mlflow.set_tag("optuna.state", "FAIL")
                raise
            finally:
                keras.backend.clear_session()
            scores = tracking.rounded({"val_accuracy_final": val_accuracy, "honest_gap": gap,
                                       "epochs_trained": len(result.history)})
            if self.tune.max_gap is not None:  # feasible when <= 0; Optuna's best is feasible
                study_report.record_constraint(trial, gap, self.tune.max_gap)
                scores["gap_over_max"] = round(gap - self.tune.max_gap, tracking.DIGITS)
            feasible = self.tune.max_gap is None or gap <= self.tune.max_gap
            mlflow.set_tag("optuna.feasible", str(feasible).lower())
            mlflow.log_metrics(scores)
            mlflow.set_tag("optuna.state", "COMPLETE")
            for key, value in scores.items():
                trial.set_user_attr(key, value)
        return (val_accuracy, gap) if self.tune.multi_objective else val_accuracy


def tune(args: argparse.Namespace) -> dict:
    params = load_params()
    raw = read_yaml("params.yaml")
    settings = {key: value for key, value in {
        "n_trials": args.n_trials, "timeout": args.timeout, "epochs": args.epochs,
        "train_limit": args.train_limit, "study_name": args.study_name,
        "storage": args.storage, "pruner": args.pruner, "confirm": args.confirm,
        "multi_objective": args.multi_objective or None,
    }.items() if value is not None}
    tune_settings = parse_tune(raw, settings)
    if args.front_end and not tune_settings.multi_objective:
        raise cli.UserError(f"--front-end {args.front_end}: a single-objective study has one "
                            "best trial; the option picks an end of a multi-objective study's "
                            "Pareto front")
    end = args.front_end or "accuracy"
    processed = Path(params.paths.processed)
    if not (processed / "train.npz").is_file():
        raise cli.StageError(f"{processed}/train.npz is missing: run `dvc repro preprocess`")
    full_split = load_split(processed, "train")  # what the pipeline trains on at its params
    train_split = full_split
    if tune_settings.train_limit:
        limit = tune_settings.train_limit
        train_split = Split(full_split.images[:limit], full_split.labels[:limit])
    val_split = load_split(processed, "val")
    full_length = confirmation.is_full_length(tune_settings, len(train_split), len(full_split),
                                              params.train.epochs)
    confirming = confirmation.companion(tune_settings, params.train.epochs)

    experiment = f"{params.mlflow.experiment}-tune"
    tracking.configure(experiment, TUNE_DESCRIPTION, TUNE_COLUMNS)
    known, known_full = [], []  # short runs join the study, full-length ones its companion
    for name in args.add_run:
        run = known_runs.find_run(name, params.mlflow.experiment)
        at_full = not full_length and known_runs.length(run) == (params.train.epochs,
                                                                  len(full_split))
        (known_full if at_full else known).append(known_runs.as_trial(
            run, raw, confirming if at_full else tune_settings,
            len(full_split) if at_full else len(train_split), len(val_split),
            allow_other_code=args.allow_other_code))
    study = make_study(tune_settings, known, train_images=len(train_split))
    companion = None
    if not full_length and (tune_settings.confirm or known_full):
        companion = make_study(confirming, known_full, train_images=len(full_split))
    deadline = time.monotonic() + tune_settings.timeout if tune_settings.timeout else None
    with tracking.run(run_id=parent_run_id(study, tune_settings, experiment,
                                           len(train_split))):
        # tags, not params: a rerun of the study may ask for another budget
        mlflow.set_tags(invocation_tags(tune_settings, len(train_split)))
        if not args.report_only:
            run_study(study, Objective(raw, tune_settings, train_split, val_split, deadline),
                      tune_settings, deadline=deadline)
        # the workers of a study finish together (after the shared confirmation): one at a
        # time writes the parent run's report, or MLflow's SQLite store refuses a second
        # insert of the same tag
        with study_lock(tune_settings):
            leader = study_report.report(study, tune_settings, end, confirmed_in=companion and
                                         companion.study_name)
        short = f"{tune_settings.epochs} epochs on {len(train_split)} images"
        full = f"{params.train.epochs} epochs on {len(full_split)} images"
        winner, holder, measured = (leader, study, f"{full}, the pipeline's length") \
            if full_length else (None, study, f"not confirmed: {short} only")
        if companion is not None:
            if not args.report_only:
                confirm(study, companion, tune_settings, confirming, end,
                        Objective(raw, confirming, full_split, val_split, deadline))
            for line in confirmation.summary(study, companion, tune_settings):
                print(f"tune: {line.strip()}")
            with study_lock(tune_settings):
                winner = study_report.report(companion, confirming, end, label="confirm",
                                             title="winner: confirmed trial")
            holder, measured = companion, f"confirmed at the pipeline's length, {full}"
        with study_lock(tune_settings):
            point = study_report.declare([study, *([companion] if companion else [])],
                                         tune_settings, winner, holder.study_name,
                                         _winner_name(winner, holder), measured)
    found = mlflow.get_experiment_by_name(experiment)
    print(f"tune: trials in the MLflow UI (`mlflow ui`): {tracking.runs_url(found.experiment_id)}")
    confirmed = point is not None
    if point is None and leader is not None and not full_length:
        done = companion is not None and companion.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        why = ("no confirmed trial has an honest gap within tune.max_gap" if done
               else "tune.confirm is 0: nothing is confirmed at the pipeline's length"
               if not tune_settings.confirm else "its confirmation is not done: a rerun does it")
        print(f"tune: no confirmed winner: {why}; the best short trial is trial "
              f"{leader.number} (val accuracy {leader.values[0]:.4f}, measured at {short})")
        point = study_report.point_of(leader, tune_settings)
        measured = f"not confirmed: {short} only"
    if point is None:
        print("tune: no winner yet: no complete trial meets the constraints"
              + ("; nothing applied" if args.apply or args.apply_unconfirmed else ""))
        return {}
    atomic.write_text(params.paths.best_params,
                      f"# measured: {measured}\n" + study_report.yaml_text(as_nested(point)))
    print(f"tune: best params written to {params.paths.best_params} ({measured})")
    for line in winner_commands(point, tune_settings.epochs, len(train_split), len(full_split),
                                params.train.epochs):
        print(f"tune: {line}")
    if args.apply and not confirmed and not args.apply_unconfirmed:
        raise cli.UserError("--apply: no confirmed winner to apply; params.yaml unchanged "
                            "(--apply-unconfirmed applies the best short trial)")
    if args.apply or args.apply_unconfirmed:
        update_yaml("params.yaml", point)
        print(f"tune: params.yaml updated with the winner ({measured}); `dvc repro` "
              "trains it")
    return point


def _winner_name(winner: optuna.trial.FrozenTrial | None, holder: optuna.Study) -> str:
    if winner is None:
        return ""
    return (f"trial {winner.number} of {holder.study_name!r}, confirming "
            f"{confirmation.confirmed_number(winner)}"
            if holder.study_name.endswith(confirmation.SUFFIX) else f"trial {winner.number}")


def confirm(study: optuna.Study, companion: optuna.Study, tune: Tune, confirming: Tune,
            end: str, objective: Objective) -> None:
    """Train the study's best short trials again at the pipeline's length (confirmation.py),
    once the study has all its trials; shared with the study's other workers."""
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    if len(finished) < tune.n_trials:
        print(f"tune: confirmation waits for the study's {tune.n_trials} trials "
              f"({len(finished)} finished)")
        return
    with study_lock(tune):
        queued = confirmation.queue(study, companion, tune, end)
    if queued:
        print(f"tune: confirming trials {', '.join(map(str, queued))} at "
              f"{confirming.epochs} epochs on all images (study {companion.study_name!r})")
    run_study(companion, objective, confirming, budget=confirmation.budget,
              deadline=objective.deadline)


def invocation_tags(tune: Tune, train_images: int) -> dict[str, str]:
    """This invocation's settings as the parent run's `tune.*` tags: lists and mappings as JSON,
    and the training images each trial actually uses (fewer than `tune.train_limit` when fewer
    exist)."""
    tags = {f"tune.{key}": value if isinstance(value, str) else json.dumps(value)
            for key, value in tune.model_dump(mode="json").items()
            if key not in ("space", "storage")}
    return tags | {"tune.train_limit": str(train_images)}


def winner_commands(best: dict, trial_epochs: int, trial_images: int, pipeline_images: int,
                    pipeline_epochs: int) -> list[str]:
    """The commands that train the winner: as its trial trained (its epochs and the images it
    actually used, which may be fewer than `tune.train_limit`) and at the pipeline's length."""
    trial_length = {"train.epochs": trial_epochs}
    if trial_images != pipeline_images:
        trial_length["data.train_limit"] = trial_images
    return [f"the winner as its trial trained ({trial_epochs} epochs, {trial_images} images): "
            f"{exp_run_command({**best, **trial_length})}",
            f"the winner at the pipeline's length ({pipeline_epochs} epochs, {pipeline_images} "
            f"images): {exp_run_command(best)}"]


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
    parser.add_argument("--add-run", action="append", default=[], metavar="NAME",
                        help="a finished pipeline run (DVC experiment name or MLflow run id) "
                        "to add as a complete trial (repeatable; see known_runs.py)")
    parser.add_argument("--report-only", action="store_true",
                        help="train no trial: report the study as it is (with --apply, apply "
                        "its winner)")
    parser.add_argument("--allow-other-code", action="store_true",
                        help="with --add-run: count a run trained by other training code")
    parser.add_argument("--confirm", type=int, help="best trials trained again at the "
                        "pipeline's length (default: tune.confirm)")
    parser.add_argument("--apply", action="store_true",
                        help="write the confirmed winner into params.yaml (comments kept)")
    parser.add_argument("--apply-unconfirmed", action="store_true",
                        help="with no confirmed winner, write the best short trial's point")
    parser.add_argument("--front-end", choices=study_report.ENDS,
                        help="multi-objective: the end of the Pareto front the winner is taken "
                        "from (default: accuracy, the highest val accuracy)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run("tune", lambda: tune(parse_args()))
