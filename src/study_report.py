"""The report of an Optuna study, attached to its MLflow parent run.

A table of all trials (CSV), the optimization history, the parameter importances and validation
accuracy against the honest gap (PNGs); the best trial's MLflow run is tagged `optuna.best=true`.
The parent run gets the best trial's number and params as tags (`optuna.best_trial`,
`best.<key>`) and its scores as metrics (`best_val_accuracy`, `best_honest_gap`). `report`
returns the best trial: the highest validation accuracy within its gap limit (`tune.max_gap`,
over `tune.gap_growth` for short trials; on the Pareto
front when the study is multi-objective, from the end asked for).
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna_dashboard import save_note  # noqa: E402
from ruamel.yaml import YAML  # noqa: E402

import tracking  # noqa: E402
from params import Tune  # noqa: E402
from search_space import overrides  # noqa: E402


def yaml_text(data: dict) -> str:
    stream = io.StringIO()
    YAML().dump(data, stream)
    return stream.getvalue()


def _accuracy(trial: optuna.trial.FrozenTrial) -> float:
    return trial.values[0]


def _save(axes_or_figure, path: Path) -> None:
    figure = getattr(axes_or_figure, "figure", axes_or_figure)
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


IMPORTANCE_MIN_TRIALS = 10  # fewer: the sampler has hardly varied the parameters yet


def _placeholder(text: str, path: Path) -> None:
    figure, axes = plt.subplots()
    axes.axis("off")
    axes.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    _save(figure, path)


def _plots(study: optuna.Study, complete: list, folder: Path, tune: Tune,
           best: optuna.trial.FrozenTrial | None, title: str) -> None:
    multi = len(study.directions) > 1
    target = {"target": _accuracy, "target_name": "val_accuracy"} if multi else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        history = optuna.visualization.matplotlib.plot_optimization_history(study, **target)
        history.set_ylabel(study.metric_names[0] if study.metric_names else "val_accuracy")
        _save(history, folder / "optimization_history.png")
        if len(complete) >= IMPORTANCE_MIN_TRIALS:
            _save(optuna.visualization.matplotlib.plot_param_importances(study, **target),
                  folder / "param_importances.png")
        else:
            _placeholder(f"Parameter importances need {IMPORTANCE_MIN_TRIALS} complete trials "
                         f"(this study has {len(complete)}):\nwith fewer, most parameters have "
                         "hardly been varied and their importances mean nothing.",
                         folder / "param_importances.png")
    figure, axes = plt.subplots()
    front = {t.number for t in study.best_trials} if multi else set()
    # numbers on the trials worth finding only (the winner, the Pareto front): on every point
    # they overlap where trials score alike; trials.csv has every trial's figures
    labelled = front | ({best.number} if best is not None else set())
    for trial in complete:
        gap, accuracy = trial.user_attrs.get("honest_gap"), _accuracy(trial)
        axes.scatter(gap, accuracy, s=25, color="tab:red" if trial.number in front else "tab:blue")
        if trial.number in labelled:
            axes.annotate(f"trial {trial.number}", (gap, accuracy),
                          fontsize=8, xytext=(6, 6), textcoords="offset points")
    if best is not None:
        axes.scatter(best.user_attrs.get("honest_gap"), _accuracy(best), s=160,
                     facecolors="none", edgecolors="tab:green", linewidths=2,
                     label=f"{title} {best.number}")
    if tune.trial_max_gap is not None:
        axes.axvline(tune.trial_max_gap, color="tab:gray", linestyle="--",
                     label=f"gap limit {tune.gap_limit} (feasible: left of it)")
    if best is not None or tune.trial_max_gap is not None:
        axes.legend(loc="best", fontsize=8)
    axes.set(xlabel="honest gap (train acc. in inference mode - val acc.)",
             ylabel="validation accuracy", title="Trials: accuracy against gap")
    axes.grid(alpha=0.3)
    _save(figure, folder / "accuracy_vs_gap.png")


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial meets its constraints (its gap limit, `Tune.trial_max_gap`, as
    recorded when it finished; none: feasible)."""
    return all(value <= 0 for value in trial.constraints.values())


ENDS = ("accuracy", "gap")  # the ends of a Pareto front a winner is taken from


def ranked(study: optuna.Study, end: str = "accuracy") -> list[optuna.trial.FrozenTrial]:
    """The complete trials within their gap limit, best first: by validation accuracy. A
    multi-objective study ranks its Pareto front only, from `end`: "accuracy" (the highest
    validation accuracy first) or "gap" (the smallest honest gap first)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pool = [t for t in (study.best_trials if len(study.directions) > 1 else complete)
            if feasible(t)]
    if end == "gap":
        return sorted(pool, key=lambda t: (t.user_attrs.get("honest_gap", float("inf")),
                                           -_accuracy(t)))
    return sorted(pool, key=_accuracy, reverse=True)


# optuna-dashboard 0.21 reads a trial's constraints from the system attr "constraints" (a list,
# Optuna's format before 5.0) while Optuna 5's `set_constraint` writes "constraints:<name>"; both
# are written, and Optuna reads the list as constraint "0" beside "honest_gap", with one value.
DASHBOARD_CONSTRAINTS = "constraints"


def record_constraint(trial: optuna.Trial, gap: float, tune: Tune) -> float:
    """The trial's gap constraint, its study's limit `Tune.trial_max_gap` (feasible when <= 0),
    where Optuna and optuna-dashboard both read it; a note on the trial says whether it is
    feasible, naming the limit (`Tune.gap_limit`)."""
    max_gap = tune.trial_max_gap
    value = gap - max_gap
    trial.set_constraint("honest_gap", value)
    trial.storage.set_trial_system_attr(trial._trial_id, DASHBOARD_CONSTRAINTS, [value])
    save_note(trial, _feasibility(gap, max_gap, tune.gap_limit))
    return value


def _feasibility(gap: float, max_gap: float, limit: str) -> str:
    verdict = "**feasible**" if gap <= max_gap else "**infeasible**"
    sign = "<=" if gap <= max_gap else ">"
    return f"{verdict}: honest gap {gap:.4f} {sign} {limit}"


def _study_note(study: optuna.Study, tune: Tune, best: optuna.trial.FrozenTrial | None,
                confirmed_in: str | None = None, end: str | None = "accuracy",
                final: bool = True) -> None:
    """What optuna-dashboard shows on the study page: its winner, or that it has none (the
    dashboard's own "Best Trial" ignores constraints). A study whose best trials are confirmed
    at full length names the study that holds its winner instead. `final`: False while a later
    trial may still beat `best` (a confirmation not done): then it is the best so far."""
    if confirmed_in is not None:
        which = (f"the {tune.confirm} with the smallest honest gap on the Pareto front"
                 if len(study.directions) > 1 and end == "gap" else f"the best {tune.confirm}")
        within, limit = (("", "") if tune.max_gap is None else
                         (f" within the gap limit {tune.gap_limit}",
                          f" within tune.max_gap {tune.max_gap}"))
        save_note(study, f"Short trials: {which}{within} are trained again at the pipeline's "
                  f"length in the study **{confirmed_in}**, whose best validation accuracy"
                  f"{limit} is this study's winner.")
        return
    if tune.max_gap is None:
        return
    if best is None:
        body = (f"**No winner**: no complete trial has an honest gap within {tune.gap_limit}. "
                "The \"Best Trial\" shown here ignores that constraint; "
                "each trial's note says whether it is feasible.")
    else:
        gap = best.user_attrs.get("honest_gap", float("nan"))
        lead = (f"**Winner: trial {best.number}**" if final else
                f"**Best so far: trial {best.number}** (no winner until every confirmation is "
                "done)")
        body = (f"{lead}, the best validation accuracy "
                f"({_accuracy(best):.4f}) among trials with an honest gap within "
                f"{tune.gap_limit} (its gap {gap:.4f}). The \"Best Trial\" shown here ignores "
                "that constraint.")
    save_note(study, body)


def _tag_best(studies: list[optuna.Study], best: optuna.trial.FrozenTrial | None) -> None:
    """`optuna.best` on every trial's MLflow run: true on the winner's only."""
    client = mlflow.tracking.MlflowClient()
    winner = best.user_attrs.get("mlflow_run_id") if best is not None else None
    for study in studies:
        for trial in study.get_trials(deepcopy=False):
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                client.set_tag(run_id, "optuna.best", str(run_id == winner).lower())


def _counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n)


def best(study: optuna.Study, end: str = "accuracy") -> optuna.trial.FrozenTrial | None:
    """The study's best trial within its gap limit (`ranked`), if any."""
    candidates = ranked(study, end)
    return candidates[0] if candidates else None


def report(study: optuna.Study, tune: Tune, end: str | None = "accuracy", label: str = "study",
           confirmed_in: str | None = None, title: str = "best trial", final: bool = True
           ) -> optuna.trial.FrozenTrial | None:
    """Log the study report to the active (parent) run, its files under `label` (its metrics
    prefixed by it unless it is "study"); return its best trial (printed as `title`) or None.
    `end`: the end of a multi-objective study's Pareto front its best trial is taken from
    (None: the highest val accuracy, no end to choose). `confirmed_in`: the companion study
    that confirms this one's best trials (confirmation.py). `final`: False while a later trial
    may beat the best one (a confirmation not done): the study's note says so."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = _counts(study)
    prefix = "" if label == "study" else f"{label}_"
    mlflow.log_metrics({f"{prefix}trials_{name}": n for name, n in counts.items()})
    leader = best(study, end or "accuracy")
    # a study whose best trials are confirmed has no winner of its own: its best short trial
    # is labelled as what it is
    title = "best short trial" if confirmed_in else title
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        if complete:
            _plots(study, complete, folder, tune, leader, title)
        mlflow.log_artifacts(tmp, artifact_path=label)
    # starting points, retries of a dead worker's trials, points cut by --timeout or Ctrl-C,
    # confirmations: a rerun trains them, within its budget
    queued = ("" if not counts.get("waiting")
              else "; waiting: queued confirmations that a rerun trains" if label == "confirm"
              else "; waiting: queued points that a rerun trains (a larger --n-trials once the "
                   "budget is spent)")
    print(f"tune: study {study.study_name!r}: {_summary(counts)}{queued}")
    _study_note(study, tune, leader, confirmed_in, end, final)
    if leader is None:
        if complete:
            trials = "confirmed trial" if label == "confirm" else "complete trial"
            print(f"tune: no {trials} meets the gap limit {tune.gap_limit}")
        return None
    if len(study.directions) > 1:
        print("tune: Pareto front (trial: val accuracy, honest gap):")
        for trial in sorted(study.best_trials, key=_accuracy, reverse=True):
            print(f"  {trial.number}: {trial.values[0]:.4f}, {trial.values[1]:.4f}")
        if end is not None:
            other = "gap" if end == "accuracy" else "accuracy"
            taken = "trials confirmed" if confirmed_in else "best trial taken"
            print(f"tune: {taken} from the front's {end} end "
                  f"({'highest val accuracy' if end == 'accuracy' else 'smallest honest gap'}"
                  f"); --front-end {other} takes the other end")
    added = leader.user_attrs.get("added_run")
    print(f"tune: {title} {leader.number}: val accuracy {_accuracy(leader):.4f}, "
          f"honest gap {leader.user_attrs.get('honest_gap', float('nan')):.4f}"
          + (f" (the run {added}, added)" if added else ""))
    return leader


def point_of(trial: optuna.trial.FrozenTrial, tune: Tune) -> dict[str, Any]:
    """A trial's point as trained (the rate after batch scaling), as the trial recorded it; an
    added run's params are its own, as it trained."""
    return trial.user_attrs.get("as_trained") or overrides(
        {key: trial.params[key] for key in tune.space}, tune)


WINNER_TAGS = ("optuna.best_trial", "optuna.best_study", "optuna.best_measured")
WINNER_METRICS = ("best_val_accuracy", "best_honest_gap")


def _forget_winner() -> None:
    """Take an earlier winner off the active (parent) run once the study has none (a rerun
    with a larger budget, a confirmation pending): its tags deleted, its `best_*` metrics
    logged as NaN (MLflow keeps a metric's history), so that the runs table never shows a
    winner the note denies."""
    client = mlflow.tracking.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    data = client.get_run(run_id).data
    for key in data.tags:
        if key in WINNER_TAGS or key.startswith("best."):
            client.delete_tag(run_id, key)
    stale = [key for key in WINNER_METRICS if key in data.metrics]
    if stale:
        mlflow.log_metrics({key: float("nan") for key in stale})


def declare(studies: list[optuna.Study], tune: Tune, winner: optuna.trial.FrozenTrial | None,
            holder: str, name: str, measured: str, why: str | None
            ) -> dict[str, Any] | None:
    """Record the study's winner on the active (parent) run and its trials' runs: its point as
    `best.*` tags, its scores as `best_*` metrics, its trial and study, at what length it was
    measured, and the description shown in the MLflow UI. `studies`: the study, then its
    companion if any; `holder` names the study that holds the winner, `name` says which trial
    it is, `measured` how it was trained; `why` why there is no winner."""
    _tag_best(studies, winner)
    trials = _summary(_counts(studies[0])) + "".join(
        f"; its confirmations: {_summary(_counts(study))}" for study in studies[1:])
    if winner is None:
        _forget_winner()
        verdict = f"No winner: {why}."
        mlflow.set_tag(tracking.NOTE, f"Optuna study `{studies[0].study_name}`, one child run "
                       f"per trial ({trials}). {verdict}")
        return None
    point = point_of(winner, tune)
    accuracy, gap = _accuracy(winner), winner.user_attrs.get("honest_gap", float("nan"))
    # not params: the best trial changes as the study goes on. Its point as tags (values of
    # any type, once each), its scores as metrics (figures, rounded as evaluate rounds them)
    mlflow.set_tags({"optuna.best_trial": str(winner.number), "optuna.best_study": holder,
                     "optuna.best_measured": measured,
                     **{f"best.{key}": str(value) for key, value in point.items()}})
    mlflow.log_metrics(tracking.rounded({"best_val_accuracy": accuracy,
                                         "best_honest_gap": gap}))
    limit = f" (tune.max_gap {tune.max_gap})" if tune.max_gap is not None else ""
    mlflow.set_tag(tracking.NOTE, (
        f"Optuna study `{studies[0].study_name}`, one child run per trial ({trials}). Winner: "
        f"{name}, {measured}: val_accuracy {accuracy:.4f}, honest_gap {gap:.4f}{limit}. "
        "Chosen on validation accuracy; its point is in the best.* tags."))
    return point
