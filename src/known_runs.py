"""Finished pipeline runs as complete trials of a study (Optuna's `study.add_trial`).

A 50-epoch `dvc exp run` takes an hour on a CPU; a study whose trials train the same 50 epochs on
the same images counts it instead of training it again:

    python src/tune.py --epochs 50 --train-limit 40000 --study-name full-length \\
        --add-run recipe-cutmix     # the DVC experiment's name (its MLflow run name) or a run id

The run is looked up in the pipeline's MLflow experiment and must be a point of the study: the
params it logged are those a trial of the study at that point trains with (same seed, data,
images, epochs and every param outside the space; only how it ran, the backend and device
settings, may differ) and its space values lie inside the space. The trial's value is the run's
last validation accuracy, each epoch's is an intermediate value (what pruners compare), and the
run's honest gap (evaluate's, on all the training images it trained on, as a sampled trial's) is
its gap constraint (`Tune.trial_max_gap`). The run must have been trained by the same training
code as the study's trials (its `code.training` tag, see tracking.TRAINING_CODE);
`--allow-other-code` adds one trained by other code anyway. Added
to a new study before the recipe and its variants are enqueued, a run that is one of them takes
its place: the study does not train it again.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState
from ruamel.yaml import YAML

import tracking
from cli import UserError
from params import TUNABLE, Params, ParamsError, Tune, flatten, parse_params, with_overrides
from search_space import HOW, as_sampled, distributions, trial_params


def find_run(name: str, experiment: str) -> mlflow.entities.Run:
    """The newest finished, evaluated run named `name` (or with that id) in `experiment`."""
    client = mlflow.tracking.MlflowClient()
    found = mlflow.get_experiment_by_name(experiment)
    runs = []
    if found is not None:
        by = (f"attributes.run_id = '{name}'" if re.fullmatch(r"[0-9a-f]{32}", name)
              else f"attributes.run_name = '{name}'" if "'" not in name else None)
        runs = [run for run in client.search_runs(
            [found.experiment_id], by, order_by=["attributes.start_time DESC"])
            if run.info.status == "FINISHED" and "honest_gap" in run.data.metrics] if by else []
    if not runs:
        raise UserError(f"--add-run {name}: no finished, evaluated run of that name or id in "
                        f"the MLflow experiment {experiment!r} ({mlflow.get_tracking_uri()})")
    return runs[0]


def length(run: mlflow.entities.Run) -> tuple[int | None, int | None]:
    """How long the run trained: its epochs and training images, as it logged them."""
    logged = run.data.params
    return tuple(int(logged[key]) if str(logged.get(key, "")).isdigit() else None
                 for key in ("train.epochs", "data.train_images"))


def _run_params(run: mlflow.entities.Run, raw: dict) -> Params:
    """The params the run trained with, as the schema types them."""
    load = YAML(typ="safe", pure=True).load
    logged = {key: load(value) for key, value in run.data.params.items()
              if key == "seed" or key.partition(".")[0] in TUNABLE}
    try:
        return parse_params(with_overrides(raw, logged))
    except ParamsError as error:
        raise UserError(f"run {run.info.run_id}: its params are not this project's: {error}"
                        ) from None


def _trained(params: Params) -> dict:
    """What decides a run's training, as dotted keys: the seed and the tunable sections."""
    return flatten({"seed": params.seed, **params.model_dump(include=set(TUNABLE))})


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and \
            not isinstance(a, bool) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _same_code(run: mlflow.entities.Run, name: str) -> None:
    """Refuse a run trained by other training code than this study's trials (the digest of
    tracking.TRAINING_CODE that train.py tags each run with)."""
    theirs, ours = run.data.tags.get(tracking.CODE_TAG), tracking.training_code()
    if theirs != ours:
        raise UserError(f"{name}: trained by other training code ({tracking.CODE_TAG} "
                        f"{theirs or 'not recorded'}, this study's {ours}); add "
                        "--allow-other-code to count it anyway")


def _point(run: mlflow.entities.Run, raw: dict, tune: Tune, train_images: int,
           val_images: int, allow_other_code: bool = False) -> dict:
    """The study's point that `run` trained; a UserError saying how it is not one."""
    name = f"--add-run {run.info.run_name or run.info.run_id}"
    if not allow_other_code:
        _same_code(run, name)
    trained = _trained(_run_params(run, raw))
    point = as_sampled({key: trained[key] for key in tune.space}, tune)
    outside = [f"{key}={value!r}" for key, value in point.items() if not tune.contains(key, value)]
    if outside:
        raise UserError(f"{name}: outside the study's space: {', '.join(outside)}")
    logged = run.data.params
    data = {"data.md5": raw["data"]["md5"], "data.train_images": str(train_images),
            "data.val_images": str(val_images)}
    differ = [f"{key} {logged.get(key)} (study: {value})" for key, value in data.items()
              if logged.get(key) != value]
    study = _trained(trial_params(raw, point, tune))
    differ += [f"{key} {value!r} (study: {study[key]!r})" for key, value in trained.items()
               if key not in HOW and not _same(value, study[key])]
    if differ:
        raise UserError(f"{name}: not a point of this study: it differs in {'; '.join(differ)}")
    return point


def as_trial(run: mlflow.entities.Run, raw: dict, tune: Tune, train_images: int,
             val_images: int, allow_other_code: bool = False) -> FrozenTrial:
    """The complete trial a study with these settings and splits makes of `run`."""
    point = _point(run, raw, tune, train_images, val_images, allow_other_code)
    client = mlflow.tracking.MlflowClient()
    curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
    if not curve:
        raise UserError(f"--add-run {run.info.run_name}: the run logged no val_accuracy per "
                        "epoch")
    epochs = max(curve)
    val_accuracy, gap = curve[epochs], run.data.metrics["honest_gap"]
    attrs = {"pipeline_run_id": run.info.run_id, "added_run": run.info.run_name,
             tracking.CODE_TAG: run.data.tags.get(tracking.CODE_TAG, "not recorded"),
             "val_accuracy_final": val_accuracy, "honest_gap": gap, "epochs_trained": epochs}
    constraints = None  # in Optuna's and optuna-dashboard's forms (study_report.py)
    if tune.trial_max_gap is not None:
        constraints = {"honest_gap": gap - tune.trial_max_gap}
        attrs["gap_over_max"] = gap - tune.trial_max_gap
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        **({"values": [val_accuracy, gap]} if tune.multi_objective else {"value": val_accuracy}),
        params=point, distributions=distributions(tune.space), user_attrs=attrs,
        intermediate_values=curve, constraints=constraints,
        system_attrs={"constraints": list(constraints.values())} if constraints else None)


def add(study: optuna.Study, trials: Sequence[FrozenTrial]) -> None:
    """Add each trial whose run the study does not hold yet (`replay`); say what was added."""
    held = {t.user_attrs.get("pipeline_run_id"): t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    for trial in trials:
        run_id = trial.user_attrs["pipeline_run_id"]
        if run_id in held:
            print(f"tune: run {trial.user_attrs['added_run']} ({run_id}) is trial {held[run_id]} "
                  "already")
            continue
        number = replay(study, trial)
        held[run_id] = number
        print(f"tune: run {trial.user_attrs['added_run']} ({run_id}) added as trial {number}: "
              f"val accuracy {trial.user_attrs['val_accuracy_final']:.4f}, "
              f"honest gap {trial.user_attrs['honest_gap']:.4f}")
        for queued in cancel_queued(study, trial.params, trial.user_attrs["added_run"]):
            print(f"tune: trial {queued} of {study.study_name!r}, queued to train the same "
                  f"point, is cancelled: the run {trial.user_attrs['added_run']} is that point")


def cancel_queued(study: optuna.Study, point: dict, run_name: str) -> list[int]:
    """Fail the study's queued (WAITING) trials of `point`, which an added run now holds: a
    queued confirmation of the point, or an enqueued starting point, would train it again.
    Each keeps a `superseded_by` user attr naming the run. Call it under the study lock, where
    no worker takes a queued trial meanwhile; returns their numbers."""
    cancelled = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if trial.system_attrs.get("fixed_params") == point:
            study._storage.set_trial_user_attr(trial._trial_id, "superseded_by", run_name)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            cancelled.append(trial.number)
    return cancelled


def replay(study: optuna.Study, trial: FrozenTrial) -> int:
    """Add the complete `trial` as if it had trained in the study: its curve is reported epoch
    by epoch to the study's pruner, which records the rungs it reaches (Hyperband compares
    trials there), then its values are told. The pruner's answers are ignored: the run
    finished. A multi-objective study has no pruner and takes no reports: the trial is added
    as it is. Call it under the study lock (the new trial is the study's last); returns its
    number."""
    if len(study.directions) > 1:
        study.add_trial(trial)
        return study.get_trials(deepcopy=False)[-1].number
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.RUNNING, params=trial.params, distributions=trial.distributions,
        user_attrs=trial.user_attrs, system_attrs=trial.system_attrs))
    added = study.get_trials(deepcopy=False)[-1]
    live = optuna.Trial(study, added._trial_id)
    with warnings.catch_warnings():  # about heartbeats, which an added trial does not need
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        try:
            for step, value in sorted(trial.intermediate_values.items()):
                live.report(value, step)
                live.should_prune()
            study.tell(live, trial.value)
        except BaseException:  # never left RUNNING: with no heartbeat, nothing would fail it
            study.tell(live, state=TrialState.FAIL)
            raise
    return added.number
