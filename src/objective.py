"""One Optuna trial: train a sampled point (or a queued one) as a nested MLflow run and score it.

`Objective` is what `tune.py` hands to Optuna for a study and for its companion study of
confirmations (confirmation.py). A trial trains `tune.epochs` epochs on the images it is given,
reports each epoch's validation accuracy to the pruner (`Pruning`), and returns its validation
accuracy (and honest gap, multi-objective); the gap is also the study's constraint
(`Tune.trial_max_gap`: `tune.max_gap`, over `tune.gap_growth` for short trials). A
trial cut by the invocation's `--timeout` (`Deadline`) is failed and its point queued again with
what it stands for (a starting point, a confirmation).
"""

from __future__ import annotations

import time

import keras
import mlflow
import optuna

import cli
import confirmation
import devices
import progress
import study_report
import tracking
from cifar import Split
from fitting import Diverged, fit
from params import Tune
from scoring import final_scores
from search_space import overrides, sample, trial_params

# the user attrs a queued point is given (shared_study.make_study, confirmation.queue): a
# timed-out trial's point is queued again with them
QUEUED_ATTRS = ("recipe", "recipe_variant", confirmation.CONFIRMS)


def queue_again(trial: optuna.Trial, why: str) -> None:
    """Queue the trial's point for the next invocation, with what it stands for (a starting
    point, a confirmation) and `why` (the number of the trial it replaces)."""
    kept = {key: value for key, value in trial.user_attrs.items() if key in QUEUED_ATTRS}
    trial.study.enqueue_trial(trial.params, user_attrs={**kept, why: trial.number})


class TimeoutReached(Exception):
    """The invocation's --timeout passed during a trial (Optuna records the trial as FAIL)."""


class Deadline(keras.callbacks.Callback):
    """Stop the trial after the epoch in which the invocation's timeout passed, unless that
    epoch was its last (a trained trial is scored, not trained again)."""

    def __init__(self, deadline: float | None):
        super().__init__()
        self.deadline = deadline

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 >= self.params.get("epochs", epoch + 2)
        if self.deadline is not None and not last and time.monotonic() > self.deadline:
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
                configured = devices.configure(params.train, params.seed)
                mlflow.set_tags(configured.tags())  # the precision it trained in, among others
                result = fit(params, self.train_split, self.val_split, configured=configured,
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
            except optuna.TrialPruned:  # a verdict, not a fault: FINISHED, as Optuna's own
                mlflow.set_tag("optuna.state", "PRUNED")  # MLflow callback ends it
                mlflow.end_run("FINISHED")
                raise
            except TimeoutReached as stopped:  # its point is trained again by the next run
                mlflow.set_tag("optuna.state", "FAIL")
                mlflow.end_run("KILLED")
                queue_again(trial, "timed_out_trial")
                print(f"tune: trial {trial.number} {stopped}; its point is queued for the next "
                      "invocation")
                raise
            except KeyboardInterrupt:  # Ctrl-C, SIGTERM (cli.Terminated): FAIL in Optuna
                mlflow.set_tag("optuna.state", "FAIL")
                # a sampled point is sampled anew; a starting point or a confirmation would
                # be lost (a study queues its starting points once, when it is new)
                if any(key in trial.user_attrs for key in QUEUED_ATTRS):
                    queue_again(trial, "interrupted_trial")
                raise
            except Diverged as error:  # the point's verdict: a confirmation is not redone
                mlflow.set_tag("optuna.state", "FAIL")
                trial.set_user_attr(confirmation.DIVERGED, str(error))
                raise
            except Exception:  # Optuna records it as FAIL
                mlflow.set_tag("optuna.state", "FAIL")
                raise
            finally:
                keras.backend.clear_session()
            scores = tracking.rounded({"val_accuracy_final": val_accuracy, "honest_gap": gap,
                                       "epochs_trained": len(result.history)})
            limit = self.tune.trial_max_gap
            if limit is not None:  # feasible when <= 0; Optuna's best is feasible
                over = study_report.record_constraint(trial, gap, self.tune)
                scores["gap_over_max"] = round(over, tracking.DIGITS)
            feasible = limit is None or gap <= limit
            mlflow.set_tags({"optuna.feasible": str(feasible).lower(),
                             # what gap_over_max is measured from
                             "optuna.gap_limit": "none" if limit is None else str(limit)})
            mlflow.log_metrics(scores)
            mlflow.set_tag("optuna.state", "COMPLETE")
            for key, value in scores.items():
                trial.set_user_attr(key, value)
        return (val_accuracy, gap) if self.tune.multi_objective else val_accuracy
