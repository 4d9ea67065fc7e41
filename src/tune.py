"""Optuna study over the seed's regularization, every trial tracked in MLflow.

    python src/tune.py                          # settings from the `tune` section of params.yaml
    python src/tune.py --n-trials 30 --epochs 5 --train-limit 10000 --study-name quick
    python src/tune.py --storage postgresql://host/db   # many workers, one study
    python src/tune.py --apply                  # also write the confirmed winner into params.yaml
    python src/tune.py --add-run NAME           # count a finished 50-epoch run as a confirmation

Needs the preprocessed data (`dvc repro preprocess`). A new study's first trials are the hand
recipe (`tune.recipe`) and its variants (`tune.variants`). Each trial trains `tune.epochs` epochs
(its own full schedule) on the first `tune.train_limit` training images and maximizes validation
accuracy subject to the honest gap (train accuracy in inference mode on all its training images,
minus validation accuracy) staying within `tune.max_gap` over `tune.gap_growth` (a short
trial's gap grows by about that much at the pipeline's length), an Optuna constraint; the gap
is the second objective with `--multi-objective`. The best trials are then confirmed at the
pipeline's length (`tune.confirm`), held to `tune.max_gap` itself. Rerunning the same command
continues the study up to `--n-trials` finished (complete or pruned) trials; several processes may
run it at once on the same storage, also started at the same instant on an empty database (see
shared_study.py).
Progress: Keras' bars on a terminal, otherwise one line per epoch of every trial.
Keras and its backend load only in an invocation that trains, after its checks: a report, a
refused flag, a bad `--add-run` or a rerun of a finished study answers in seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import mlflow
import optuna

import atomic
import cli
import confirmation
import known_runs
import study_report
import tracking
from cifar import TRAIN_IMAGES, Split, load_split, split_size
from params import Params, Tune, load_params, parse_tune, read_yaml, update_yaml
from search_space import as_nested, exp_run_command, fixed_params
from shared_study import (
    FINISHED,
    IDENTITY,
    exists,
    make_storage,
    make_study,
    parent_run_id,
    run_study,
    shown,
    storage_url,
    study_lock,
)

if TYPE_CHECKING:
    from objective import Objective

TUNE_DESCRIPTION = ("Optuna studies: one parent run per study (settings as params, the report as "
                    "artifacts, the best trial's point as best.* tags and its scores as "
                    "best_* metrics), one nested run per trial (optuna.feasible: within "
                    "its gap limit, tune.max_gap over tune.gap_growth for short trials).")


# the runs table's columns in the MLflow UI (tracking.runs_url)
TUNE_COLUMNS = ("metrics.val_accuracy_final", "metrics.honest_gap", "params.train.epochs",
                "params.data.train_images", "tags.optuna.confirms", "tags.optuna.feasible",
                "tags.optuna.gap_limit", "tags.optuna.state", "params.model.dropout",
                "params.train.learning_rate", "params.train.batch_size", "params.augment.cutout",
                "params.augment.mixup", "params.augment.cutmix")


@dataclass(frozen=True)
class Invocation:
    """What one invocation works with: its settings, and how many images its trials train on
    (the images themselves are loaded only to train: `splits`)."""

    args: argparse.Namespace
    params: Params
    raw: dict  # params.yaml as read, for trial_params
    tune: Tune  # the study's settings: params.yaml's `tune` and the flags
    confirming: Tune  # its companion study's (confirmation.companion)
    end: str  # the end of a Pareto front a winner is taken from (study_report.ENDS)
    full: int  # training images at the pipeline's params
    train: int  # the first `tune.train_limit` of them: each trial's
    val: int | None  # validation images; None: a report made without the data

    @property
    def full_length(self) -> bool:
        """Whether the trials train as long as the pipeline (then nothing is confirmed)."""
        return confirmation.is_full_length(self.tune, self.train, self.full,
                                           self.params.train.epochs)

    @property
    def short(self) -> str:
        return f"{self.tune.epochs} epochs on {self.train} images"

    @property
    def pipeline(self) -> str:
        return f"{self.params.train.epochs} epochs on {self.full} images"

    def splits(self) -> tuple[Split, Split, Split]:
        """The pipeline's training images, the first part of them each trial trains on, and
        the validation images."""
        processed = self.params.paths.processed
        full = load_split(processed, "train")
        return (full, Split(full.images[:self.train], full.labels[:self.train]),
                load_split(processed, "val"))


def settings_of(args: argparse.Namespace, raw: dict) -> Tune:
    """The study's settings: params.yaml's `tune` section with the flags given over it."""
    flags = {key: value for key, value in {
        "n_trials": args.n_trials, "timeout": args.timeout, "epochs": args.epochs,
        "train_limit": args.train_limit, "study_name": args.study_name,
        "storage": args.storage, "pruner": args.pruner, "confirm": args.confirm,
        "gap_growth": args.gap_growth, "multi_objective": args.multi_objective or None,
        "front_end": args.front_end,
    }.items() if value is not None}
    settings = parse_tune(raw, flags)
    if (args.front_end or settings.front_end != "accuracy") and not settings.multi_objective:
        where = "--front-end" if args.front_end else "tune.front_end"
        raise cli.UserError(f"{where} {settings.front_end}: a single-objective study has one "
                            "best trial; the option picks an end of a multi-objective study's "
                            "Pareto front")
    if settings.max_gap is None:  # no limit to scale
        settings = settings.model_copy(update={"gap_growth": 1.0})
    return settings


def invocation(args: argparse.Namespace) -> Invocation:
    params = load_params()
    raw = read_yaml("params.yaml")
    settings = settings_of(args, raw)
    if args.report_only and not exists(settings):  # reads a study, never makes one
        raise cli.UserError(f"--report-only: no study {settings.study_name!r} in "
                            f"{shown(storage_url(settings))}")
    processed = Path(params.paths.processed)
    has_data = all((processed / f"{name}.npz").is_file() for name in ("train", "val"))
    if has_data or not args.report_only:
        full = split_size(processed, "train")  # what the pipeline trains on at its params
        train, val = min(settings.train_limit or full, full), split_size(processed, "val")
    else:  # a report of a shared study, read where its images are not
        full, train = recorded_images(settings, params)
        val = None
    if confirmation.is_full_length(settings, train, full, params.train.epochs):
        settings = settings.model_copy(update={"gap_growth": 1.0})  # nothing to grow into
    return Invocation(args, params, raw, settings,
                      confirmation.companion(settings, params.train.epochs),
                      settings.front_end, full, train, val)


def recorded_images(tune: Tune, params: Params) -> tuple[int, int]:
    """Without the preprocessed data: how many images the pipeline and the study's trials train
    on, as the study and its companion recorded them (`shared_study.identity`); for a study
    with no companion yet, the pipeline's from params.yaml and the official archive's size."""
    companion = confirmation.companion(tune, params.train.epochs)
    full = exists(companion) and recorded_train_images(companion)
    if not full:
        full = min(params.data.train_limit or TRAIN_IMAGES, TRAIN_IMAGES - params.data.val_size)
    train = recorded_train_images(tune) or min(tune.train_limit or full, full)
    return full, train


def recorded_train_images(tune: Tune) -> int | None:
    """The training images a study's trials train on, as it recorded them (None: not recorded)."""
    study = optuna.load_study(study_name=tune.study_name, storage=make_storage(tune))
    return (study.user_attrs.get(IDENTITY) or {}).get("tune.train_limit")


def added_runs(run: Invocation) -> tuple[list, list]:
    """The `--add-run` runs as complete trials: the short ones for the study, those at the
    pipeline's length for its companion (each is then a confirmation)."""
    known, known_full = [], []
    if run.args.add_run and run.val is None:
        raise cli.StageError(f"{run.params.paths.processed}/train.npz is missing: --add-run "
                             "compares a run with the data: run `dvc repro preprocess`")
    for name in run.args.add_run:
        found = known_runs.find_run(name, run.params.mlflow.experiment)
        at_full = not run.full_length and known_runs.length(found) == (
            run.params.train.epochs, run.full)
        (known_full if at_full else known).append(known_runs.as_trial(
            found, run.raw, run.confirming if at_full else run.tune,
            run.full if at_full else run.train, run.val,
            allow_other_code=run.args.allow_other_code))
    return known, known_full


def left_to_train(run: Invocation, study: optuna.Study, companion: optuna.Study | None
                  ) -> bool:
    """Whether the invocation may train: the study lacks some of its `tune.n_trials` finished
    trials (a running one may yet fail and be retried), or its confirmation is not done
    (`confirmation.pending`, which counts the study's trials too)."""
    if companion is not None:
        return confirmation.pending(study, companion, run.tune, run.end)
    return len(study.get_trials(deepcopy=False, states=FINISHED)) < run.tune.n_trials


def objective_class() -> type[Objective]:
    """objective.Objective, the trials' objective. Keras loads here, with the backend that
    params.yaml names (backend.py), in an invocation that trains: a report never loads it."""
    import backend  # noqa: F401  (first: sets KERAS_BACKEND from params.yaml)
    from objective import Objective

    return Objective


def run_and_declare(run: Invocation, splits: tuple[Split, Split, Split] | None,
                    objective: type[Objective] | None, study: optuna.Study,
                    companion: optuna.Study | None
                    ) -> tuple[optuna.trial.FrozenTrial | None, dict | None, str, str | None]:
    """Inside the study's parent run: the trials (`objective` on `splits`: the pipeline's
    training images, each trial's part of them, validation; `objective` None: nothing to
    train), the report, the confirmation and the winner declared. Returns the study's best
    short trial, the winner's point (None: no confirmed winner yet), what the winner was
    measured on, and why there is none (`no_winner`)."""
    tune = run.tune
    deadline = time.monotonic() + tune.timeout if tune.timeout else None
    full, train, val = splits or (None, None, None)
    if objective is not None:
        run_study(study, objective(run.raw, tune, train, val, deadline), tune, deadline=deadline)
    # the workers of a study finish their trials together: one at a time writes the parent
    # run's report, or MLflow's SQLite store refuses a second insert of the same tag
    with study_lock(tune):
        leader = study_report.report(study, tune, run.end, confirmed_in=companion and
                                     companion.study_name)
    winner, holder, measured = (leader, study, f"{run.pipeline}, the pipeline's length") \
        if run.full_length else (None, study, f"not confirmed: {run.short} only")
    if companion is not None:
        if objective is not None:
            confirm(study, companion, tune, run.confirming, run.end,
                    objective(run.raw, run.confirming, full, val, deadline))
        for line in confirmation.summary(study, companion, tune):
            print(f"tune: {line.strip()}")
        with study_lock(tune):
            winner = confirmation.winner(study, companion, tune, run.confirming, run.end)
        holder, measured = companion, f"confirmed at the pipeline's length, {run.pipeline}"
    why = None if winner is not None else no_winner(run, study, companion)
    with study_lock(tune):
        point = study_report.declare([study, *([companion] if companion else [])], tune,
                                     winner, holder.study_name, _winner_name(winner, holder),
                                     measured, why)
    return leader, point, measured, why


def no_winner(run: Invocation, study: optuna.Study, companion: optuna.Study | None) -> str:
    """Why the study has no winner (yet), as the report, the parent run and --apply say it."""
    tune = run.tune
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return "no trial is complete yet"
    if run.full_length or not study_report.ranked(study, run.end):
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        return f"no complete trial has an honest gap within {tune.gap_limit}" + (
            f" yet ({finished} of its {tune.n_trials} trials finished: a rerun continues it)"
            if finished < tune.n_trials else "")
    if companion is None:
        return ("its confirmation has not started: a rerun does it" if tune.confirm
                else "tune.confirm is 0: nothing is confirmed at the pipeline's length")
    if confirmation.pending(study, companion, tune, run.end):
        return "its confirmation is not done: a rerun does it"
    if not companion.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return "the loss of every confirmation diverged"
    return f"no confirmed trial has an honest gap within tune.max_gap {tune.max_gap}"


def write_winner(run: Invocation, leader: optuna.trial.FrozenTrial | None, point: dict | None,
                 measured: str, why: str | None) -> dict:
    """reports/best_params.yaml, the commands that train the winner, and `--apply`: a confirmed
    winner, or the best short trial where none is confirmed (said so, applied only with
    `--apply-unconfirmed`). `why`: why there is no winner (`no_winner`)."""
    args, tune = run.args, run.tune
    confirmed = point is not None
    if point is None and leader is not None and not run.full_length:
        print(f"tune: no confirmed winner: {why}; the best short trial is trial "
              f"{leader.number} (val accuracy {leader.values[0]:.4f}, measured at {run.short})")
        point = study_report.point_of(leader, tune)
        measured = f"not confirmed: {run.short} only"
    if point is None:
        if args.apply or args.apply_unconfirmed:
            flag = "--apply" if args.apply else "--apply-unconfirmed"
            raise cli.UserError(f"{flag}: no winner ({why}); params.yaml unchanged")
        print(f"tune: no winner: {why}")
        return {}
    best_params = run.params.paths.best_params
    atomic.write_text(best_params, f"# measured: {measured}\n"
                      + study_report.yaml_text(as_nested(point)))
    print(f"tune: best params written to {best_params} ({measured})")
    for line in winner_commands(point, tune.epochs, run.train, run.full,
                                run.params.train.epochs):
        print(f"tune: {line}")
    if args.apply and not confirmed and not args.apply_unconfirmed:
        raise cli.UserError("--apply: no confirmed winner to apply; params.yaml unchanged "
                            "(--apply-unconfirmed applies the best short trial)")
    if args.apply or args.apply_unconfirmed:
        update_yaml("params.yaml", point)
        print(f"tune: params.yaml updated with the winner ({measured}); `dvc repro` "
              "trains it")
    return point


def tune(args: argparse.Namespace) -> dict:
    run = invocation(args)
    splits = None if args.report_only else run.splits()  # before the study or MLflow is written
    experiment = f"{run.params.mlflow.experiment}-tune"
    tracking.configure(experiment, TUNE_DESCRIPTION, TUNE_COLUMNS)
    known, known_full = added_runs(run)  # before the studies: a new study starts with them
    fixed = fixed_params(run.raw, run.tune)  # what the trials train with besides their points
    study = make_study(run.tune, known, train_images=run.train, fixed=fixed)
    run = with_budget(run, study)
    companion = None
    # a report reads a companion study, never makes one (an added run at full length does)
    wanted = known_full or (run.tune.confirm and not args.report_only)
    if not run.full_length and (wanted or exists(run.confirming)):
        companion = make_study(run.confirming, known_full, train_images=run.full,
                               fixed=fixed)
    # Keras loads after every check of the invocation (a refusal answers in seconds), before
    # the parent run and --timeout's clock start; a report, or a rerun of a study with nothing
    # left to train, never loads it
    objective = None
    if not args.report_only:
        if left_to_train(run, study, companion):
            objective = objective_class()
        else:
            done = len(study.get_trials(deepcopy=False, states=FINISHED))
            print(f"tune: nothing to train: {done} of {run.tune.n_trials} trials finished in "
                  f"study {study.study_name!r}"
                  + (", its confirmations done" if companion is not None else ""))
    with tracking.run(run_id=parent_run_id(study, run.tune, experiment, run.train)):
        # tags, not params: a rerun of the study may ask for another budget
        mlflow.set_tags(invocation_tags(run.tune, run.train))
        leader, point, measured, why = run_and_declare(run, splits, objective, study,
                                                       companion)
    found = mlflow.get_experiment_by_name(experiment)
    print(f"tune: trials in the MLflow UI (`mlflow ui`): {tracking.runs_url(found.experiment_id)}")
    return write_winner(run, leader, point, measured, why)


BUDGET = "n_trials"  # the study's user attr: the budget of its last invocation that trained


def with_budget(run: Invocation, study: optuna.Study) -> Invocation:
    """An invocation that trains records its budget with the study; one that only reports
    (`--report-only` without `--n-trials`) judges the study against that budget, not against
    params.yaml's `tune.n_trials`: confirmation starts once the budget's trials are done, so
    the other would call a study's winner pending (a study recorded no budget before: its
    finished trials are its budget)."""
    if not run.args.report_only:
        study.set_user_attr(BUDGET, run.tune.n_trials)
        return run
    if run.args.n_trials is not None:
        return run
    n_trials = study.user_attrs.get(BUDGET) or len(
        study.get_trials(deepcopy=False, states=FINISHED))
    return replace(run, tune=run.tune.model_copy(update={"n_trials": n_trials}))


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
    """The commands that train the winner: at the proxy's length (its epochs and the images a
    trial actually used, which may be fewer than `tune.train_limit`) and at the pipeline's
    length."""
    trial_length = {"train.epochs": trial_epochs}
    if trial_images != pipeline_images:
        trial_length["data.train_limit"] = trial_images
    return [f"the winner at the proxy's length ({trial_epochs} epochs, {trial_images} images): "
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
    parser.add_argument("--gap-growth", type=float, help="short trials are held to "
                        "tune.max_gap over this (default: tune.gap_growth; 1 for a study made "
                        "before the setting existed)")
    parser.add_argument("--apply", action="store_true",
                        help="write the confirmed winner into params.yaml (comments kept)")
    parser.add_argument("--apply-unconfirmed", action="store_true",
                        help="with no confirmed winner, write the best short trial's point")
    parser.add_argument("--front-end", choices=study_report.ENDS,
                        help="multi-objective: the end of the Pareto front whose trials are "
                        "confirmed (or, with nothing to confirm, the winner is taken from; "
                        "default: tune.front_end)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run("tune", lambda: tune(parse_args()))
