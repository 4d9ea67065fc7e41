"""Confirmation at full length: a study's best short trials trained again as the pipeline trains.

A study's trials are short (`tune.epochs` epochs on `tune.train_limit` images) so that many fit
in a budget; their ranking is a proxy for the ranking at the pipeline's length, and a proxy can
be wrong (docs/tuning.md, "How short trials rank"). After its trials, a study's `tune.confirm`
best trials within their gap limit (`tune.max_gap / tune.gap_growth`) train again at the
pipeline's length (`train.epochs`, all training images) with the same training code, as trials
of a companion study `<study>-confirm` in the same storage. So confirmation is shared by a
study's workers and resumes after a kill (a dead worker's trial is retried, like any trial), and
each confirming trial is an MLflow run under the study's parent run. The study's winner is the
confirmed trial with the best validation accuracy among those within `tune.max_gap`. A finished
pipeline run of a point at the pipeline's length (`--add-run`) is a confirmed trial as it is.

A study whose trials already run at the pipeline's length (a GPU's `--epochs 50`) needs no
confirmation: its trials are confirmed ones.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

import study_report
from params import CONFIRM_SUFFIX, Tune
from shared_study import FINISHED

SUFFIX = CONFIRM_SUFFIX
CONFIRMS = "confirms"  # a confirming trial's user attr: the number of the trial it confirms
DIVERGED = "diverged"  # a trial's user attr: how its loss diverged (objective.py)


def companion(tune: Tune, pipeline_epochs: int) -> Tune:
    """The settings of the companion study: the pipeline's length, held to `tune.max_gap`
    itself, no pruning, no starting points (it trains only the points it is given)."""
    return tune.model_copy(update={
        "study_name": tune.study_name + SUFFIX, "epochs": pipeline_epochs, "train_limit": None,
        "gap_growth": 1.0, "pruner": "none", "recipe": None, "variants": []})


def is_full_length(tune: Tune, trial_images: int, pipeline_images: int,
                   pipeline_epochs: int) -> bool:
    """Whether the study's trials train as long as the pipeline does (then nothing to confirm)."""
    return tune.epochs == pipeline_epochs and trial_images == pipeline_images


HELD = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


def _held(trial: FrozenTrial) -> bool:
    """Whether a confirming trial settles its point: queued, running, trained or added, or
    failed because its loss diverged (a rerun would diverge again). One whose worker died
    (after its retries), that was stopped or that failed otherwise is not: a rerun queues its
    point again."""
    return trial.state in HELD or (trial.state == TrialState.FAIL and DIVERGED in trial.user_attrs)


def _unheld(study: optuna.Study, confirming: optuna.Study, tune: Tune, end: str
            ) -> list[tuple[int, dict]]:
    """(number, point) of the study's `tune.confirm` best trials whose point the companion
    study does not hold (`_held`)."""
    held = [t.system_attrs.get("fixed_params", t.params)
            for t in confirming.get_trials(deepcopy=False) if _held(t)]
    unheld = []
    for trial in study_report.ranked(study, end)[:tune.confirm]:
        point = {key: trial.params[key] for key in tune.space}
        if point not in held and point not in (p for _, p in unheld):
            unheld.append((trial.number, point))
    return unheld


def queue(study: optuna.Study, confirming: optuna.Study, tune: Tune, end: str) -> list[int]:
    """Queue the points of the study's `tune.confirm` best trials in the companion study, unless
    it holds them (`_held`); return the numbers of the trials queued."""
    unheld = _unheld(study, confirming, tune, end)
    for number, point in unheld:
        confirming.enqueue_trial(point, user_attrs={CONFIRMS: number})
    return [number for number, _ in unheld]


def pending(study: optuna.Study, confirming: optuna.Study, tune: Tune, end: str) -> bool:
    """Whether confirmation is not done: the study has not finished its `tune.n_trials`
    trials, a confirmation is queued or running, or one of its best trials is not confirmed."""
    return (len(study.get_trials(deepcopy=False, states=FINISHED)) < tune.n_trials
            or bool(confirming.get_trials(deepcopy=False,
                                          states=(TrialState.RUNNING, TrialState.WAITING)))
            or bool(_unheld(study, confirming, tune, end)))


def budget(confirming: optuna.Study) -> int:
    """What the companion study trains: every point it was given. A failed trial's retry is
    queued again (its failure is not counted); a trial that failed for good counts no more."""
    return len(confirming.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)))


def summary(study: optuna.Study, confirming: optuna.Study, tune: Tune) -> list[str]:
    """One line per confirmed trial: its figures at the proxy and at the pipeline's length."""
    proxy = {t.number: t for t in study.get_trials(deepcopy=False)}
    lines = []
    for trial in confirming.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                TrialState.FAIL)):
        attrs = trial.user_attrs
        number = attrs.get(CONFIRMS)
        if number in proxy and proxy[number].values:
            short = proxy[number]
            source = (f"trial {number} ({short.values[0]:.4f}, gap "
                      f"{short.user_attrs.get('honest_gap', float('nan')):.4f} at the proxy)")
        else:
            source = f"the run {attrs.get('added_run', '?')}, added"
        if trial.state == TrialState.FAIL:
            if DIVERGED in attrs:  # a verdict on its point; other failures are retried
                lines.append(f"  {tune.study_name}{SUFFIX} trial {trial.number}: {source} -> "
                             f"diverged: {attrs[DIVERGED]}")
            continue
        gap = attrs.get("honest_gap", float("nan"))
        within = tune.max_gap is None or gap <= tune.max_gap
        lines.append(f"  {tune.study_name}{SUFFIX} trial {trial.number}: {source} -> val "
                     f"accuracy {trial.values[0]:.4f}, honest gap {gap:.4f}"
                     + ("" if within else f" (over tune.max_gap {tune.max_gap})"))
    return lines


def winner(study: optuna.Study, confirming: optuna.Study, tune: Tune, confirming_tune: Tune,
           end: str) -> FrozenTrial | None:
    """The companion study's report (study_report.report) and the study's winner: the
    confirmed trial with the best validation accuracy within `tune.max_gap`, whichever end of a
    multi-objective study's front its trials were confirmed from; None while confirmation is
    not done (`pending`: a later confirmation may beat it)."""
    done = not pending(study, confirming, tune, end)
    best = study_report.report(confirming, confirming_tune, None, label="confirm",
                               title="winner: confirmed trial" if done
                               else "best confirmed trial so far", final=done)
    return best if done else None


def confirmed_number(winner: FrozenTrial) -> str:
    """How the report names a confirmed winner."""
    number = winner.user_attrs.get(CONFIRMS)
    added = winner.user_attrs.get("added_run")
    return (f"trial {number}" if number is not None
            else f"the run {added}" if added else f"trial {winner.number}")
