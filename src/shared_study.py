"""An Optuna study shared by many workers: storage, creation, MLflow parent run, the trial loop.

Workers may start at the same instant on an empty database. Creating the tables and the study,
finding or creating the study's MLflow parent run, and checking the budget before taking a trial
run under one lock of the storage's database (dblock.py), so the workers make one schema, one
study and one parent run, and never start more trials than the budget.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

import cli
import known_runs
import tracking
from dblock import DatabaseLock
from params import CONFIRM_SUFFIX, Tune

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what the trial budget counts
MAX_FAILURES_IN_A_ROW = 5
STALE_POLL_S = 5  # seconds between looks at other workers' running trials

# Experimental in Optuna for years and still the supported way to do these; a user cannot act on
# the warning. Only these exact features are silenced, every other warning stays.
for _feature in ("RetryHeartbeatStaleTrialCallback", "fail_stale_trials", "set_metric_names"):
    warnings.filterwarnings("ignore", message=rf"(\S+\.)?{_feature} is experimental",
                            category=ExperimentalWarning)
warnings.filterwarnings("ignore", message="Argument ``heartbeat_interval`` is an experimental",
                        category=ExperimentalWarning)


def storage_url(tune: Tune) -> str:
    return tune.storage or f"sqlite:///{tracking.project_root() / 'optuna.db'}"


def exists(tune: Tune) -> bool:
    """Whether the storage holds the study (a missing SQLite file is not created). A storage
    URL of an unsupported kind, or a database out of reach, is a one-line error (dblock.py)."""
    url = storage_url(tune)
    lock = study_lock(tune)
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.drivername.startswith("sqlite") and not (
            parsed.database and Path(parsed.database).is_file()):
        return False
    with lock:
        return tune.study_name in optuna.get_all_study_names(url)


def shown(url: str) -> str:
    """A storage URL as printed: without its password."""
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def study_lock(tune: Tune) -> DatabaseLock:
    """What every worker of the study serializes its setup and its budget check on."""
    return DatabaseLock(storage_url(tune), "optuna-study")


class RetryFromEpochOne(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a dead worker's trial, less the successive-halving rungs the dead
    trial completed. Optuna copies every system attr into the retry; a retry trains from its
    first epoch, and with the dead trial's `completed_rung_0` the pruner would wait for a rung
    past the trial's end and never prune it."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.system_attrs = {key: value for key, value in trial.system_attrs.items()
                              if not key.startswith("completed_rung_")}
        super().__call__(study, trial)


def make_storage(tune: Tune) -> optuna.storages.RDBStorage:
    url = storage_url(tune)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {
        "pool_pre_ping": True}
    retry = RetryFromEpochOne(max_retry=tune.max_retry)
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


def metric_names(tune: Tune) -> list[str]:
    return ["val_accuracy", "honest_gap"] if tune.multi_objective else ["val_accuracy"]


def space(tune: Tune) -> dict[str, dict]:
    """The search space as written in params.yaml (defaults left out)."""
    return {key: spec.model_dump(exclude_defaults=True) for key, spec in tune.space.items()}


IDENTITY = "identity"  # the study's user attr: the settings that say what its trials mean


def identity(tune: Tune, train_images: int | None, fixed: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The settings that change what a trial's value means: trials made under other values
    cannot be compared with these, so a study keeps the ones it was made with. `fixed`: what
    its trials train with besides their points (search_space.fixed_params)."""
    return json.loads(json.dumps({
        "tune.max_gap": tune.max_gap, "tune.lr_reference_batch": tune.lr_reference_batch,
        "tune.epochs": tune.epochs, "tune.train_limit": train_images,
        # after the length: a study of full-length trials records 1.0 (tune.invocation)
        "tune.gap_growth": tune.gap_growth,
        "tune.objectives": metric_names(tune), "tune.space": space(tune), **(fixed or {})}))


def check_identity(study: optuna.Study, tune: Tune, train_images: int | None,
                   fixed: dict[str, Any] | None = None) -> None:
    """Record the study's identity, or refuse an invocation that differs from it in one line.
    A setting the study did not record (made by an earlier version) is not compared, except
    `tune.gap_growth`, which such a study had at 1.0 (its trials held to `tune.max_gap`)."""
    mine = identity(tune, train_images, fixed)
    recorded = study.user_attrs.get(IDENTITY)
    if recorded is None:
        study.set_user_attr(IDENTITY, mine)
        return
    recorded = {"tune.gap_growth": 1.0, **recorded}
    for key, value in mine.items():
        unknown = key == "tune.train_limit" and None in (value, recorded.get(key))
        if key in recorded and recorded[key] != value and not unknown:
            what, before = ("training images" if key == "tune.train_limit" else key), recorded[key]
            if key == "tune.epochs" and tune.study_name.endswith(CONFIRM_SUFFIX):
                what = "train.epochs"  # a companion study trains at the pipeline's length
            if key == "tune.space":  # name the first key that differs, not the whole space
                what = min(k for k in {*before, *value} if before.get(k) != value.get(k))
                before, value = before.get(what, "absent"), value.get(what, "absent")
                what = f"tune.space {what}"
            raise cli.UserError(
                f"study {tune.study_name!r} was made with {what} {json.dumps(before)}, "
                f"this invocation has {json.dumps(value)}: use the study's value, or "
                "--study-name for a new study")


def make_study(tune: Tune, known: Sequence[optuna.trial.FrozenTrial] = (),
               train_images: int | None = None, fixed: dict[str, Any] | None = None
               ) -> optuna.Study:
    """Create or load the study; tables and study are created by one worker at a time.

    `known` are complete trials made elsewhere (known_runs.py), added unless the study holds
    them; in a new study before the starting points, so that one of them is not trained again.
    The study keeps the settings that say what its trials mean (`identity`): a later invocation
    with another value of one of them is refused, never mixed in.
    """
    # Unseeded: workers sharing a study would otherwise sample the same points.
    directions = ["maximize", "minimize"] if tune.multi_objective else ["maximize"]
    sampler = (optuna.samplers.TPESampler() if tune.sampler == "tpe"
               else optuna.samplers.RandomSampler())
    with study_lock(tune):
        study = optuna.create_study(storage=make_storage(tune), study_name=tune.study_name,
                                    sampler=sampler, pruner=make_pruner(tune),
                                    directions=directions, load_if_exists=True)
        if [d.name.lower() for d in study.directions] != directions:
            made = json.dumps(len(study.directions) > 1)
            raise cli.UserError(
                f"study {tune.study_name!r} was made with tune.multi_objective {made}, this "
                f"invocation has {json.dumps(tune.multi_objective)}: use the study's value, or "
                "--study-name for a new study")
        if study.metric_names != metric_names(tune):  # shown by optuna-dashboard and plots
            study.set_metric_names(metric_names(tune))
        check_identity(study, tune, train_images, fixed)
        new = not study.get_trials(deepcopy=False)
        known_runs.add(study, known)
        if new:
            # a new study starts from the hand recipe, the point every later trial must beat,
            # and the recipe with each standard regularizer added (unless a known run is one)
            for number, point in enumerate(tune.starting_points()):
                study.enqueue_trial(point, user_attrs={"recipe_variant": number} if number
                                    else {"recipe": True}, skip_if_exists=True)
    return study


def parent_run_id(study: optuna.Study, tune: Tune, experiment: str, train_images: int) -> str:
    """The study's one MLflow parent run in the current experiment, created by the first worker.

    Under the study lock: workers started together find the run the first one made. The study's
    settings are params, logged once: a later invocation with another budget or epoch count
    shows in the `tune.*` tags instead (MLflow refuses to change a param).
    """
    client = mlflow.tracking.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    name = study.study_name
    with study_lock(tune):
        known = study.user_attrs.get("mlflow_run_id")
        found = client.search_runs([experiment_id], f"attributes.run_id = '{known}'") if known \
            else []
        if not found and "'" not in name:
            found = [run for run in client.search_runs(
                [experiment_id], f"tags.`optuna.study` = '{name}'", order_by=["start_time ASC"])
                if "mlflow.parentRunId" not in run.data.tags]
        if found:
            run = found[0]
        else:
            run = client.create_run(experiment_id, run_name=name,
                                    tags={"optuna.study": name, "optuna.role": "study"})
        study.set_user_attr("mlflow_run_id", run.info.run_id)
        settings = study_settings(tune, train_images)
        new = {k: v for k, v in settings.items() if k not in run.data.params}
        if new:
            client.log_batch(run.info.run_id, params=[
                mlflow.entities.Param(key, value) for key, value in new.items()])
    return run.info.run_id


def study_settings(tune: Tune, train_images: int) -> dict[str, str]:
    """What defines the study's trials, as the parent run's params: `tune.train_limit` is the
    number of training images each trial uses (fewer than configured when fewer exist)."""
    return {"tune.sampler": tune.sampler, "tune.pruner": tune.pruner,
            "tune.epochs": str(tune.epochs), "tune.train_limit": str(train_images),
            "tune.max_gap": json.dumps(tune.max_gap), "tune.gap_growth": str(tune.gap_growth),
            "tune.min_epochs": str(tune.min_epochs),
            "tune.objectives": ",".join(metric_names(tune)),
            "tune.space": json.dumps(space(tune))}


def adopt_orphans(study: optuna.Study, tune: Tune) -> list[int]:
    """Give a first heartbeat to the RUNNING trials that never got one and started more than
    `tune.grace_period` ago; return their numbers.

    Optuna fails a trial whose heartbeat is older than the grace period, but a trial with no
    heartbeat at all is never stale: a worker killed between taking a trial (RUNNING) and its
    heartbeat thread's first beat leaves a trial that would block the study's last places
    forever. Once given a heartbeat, such a trial goes stale a grace period later, and Optuna
    fails it and queues its retry like any dead worker's trial. A live worker's trial whose
    first beat is late loses nothing: its own thread beats on. (Start times are the workers'
    clocks; workers on several machines need clocks closer than the grace period.)
    """
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna wraps it in a cache
    cutoff = datetime.now() - timedelta(seconds=tune.grace_period)
    old = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and t.datetime_start < cutoff]
    if not old or not isinstance(storage, optuna.storages.RDBStorage) \
            or storage.get_heartbeat_interval() is None:
        return []  # no trial older than the grace period: no query of the heartbeats
    query = sqlalchemy.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids"
                            ).bindparams(sqlalchemy.bindparam("ids", expanding=True))
    with storage.engine.connect() as connection:  # Optuna's own table of heartbeats
        beating = set(connection.execute(query, {"ids": [t._trial_id for t in old]}).scalars())
    orphans = [t for t in old if t._trial_id not in beating]
    for trial in orphans:
        storage.record_heartbeat(trial._trial_id)
        print(f"tune: trial {trial.number} of {study.study_name!r} is RUNNING with no heartbeat "
              f"since {trial.datetime_start:%H:%M:%S}: its worker died before its first beat; "
              "it is failed and retried after the grace period")
    return [t.number for t in orphans]


def _failed_as_stale(study: optuna.Study, mine: list[optuna.Trial]) -> bool:
    """Whether this worker's last trial was failed by another worker while it trained (this
    worker was paused, or silent, longer than the grace period): its retry is queued already,
    and Optuna refuses the result. Say so and go on."""
    if not mine:
        return False
    trial = study._storage.get_trial(mine[0]._trial_id)
    if trial.state != TrialState.FAIL:
        return False
    print(f"tune: trial {trial.number} was failed while it trained: this worker was silent "
          "longer than tune.grace_period, so another took it for dead and queued its retry; "
          "its result is dropped, going on")
    return True


def run_study(study: optuna.Study, objective: Callable[[optuna.Trial], object],
              tune: Tune, budget: Callable[[optuna.Study], int] | None = None,
              deadline: float | None = None) -> None:
    """Run trials until the study has `n_trials` finished ones (or the timeout passes);
    `budget(study)`, read under the lock at each turn, replaces `n_trials` where given;
    `deadline` (time.monotonic()) is the invocation's, when its timeout started before.

    Finished means complete or pruned: a pruned trial got its verdict. Failed trials do not
    count; a dead worker's trial is retried. A worker checks the budget and takes its trial
    under the study lock, so workers racing for the last places never start one too many. A
    worker that finds the rest of the budget running in other workers waits until those trials
    finish, or until one of them is found stale (its worker silent for `tune.grace_period`),
    failed and retried here: the study ends with exactly `n_trials` finished trials and none
    left RUNNING.
    """
    if deadline is None and tune.timeout:
        deadline = time.monotonic() + tune.timeout
    lock = study_lock(tune)

    mine: list[optuna.Trial] = []

    def started(trial: optuna.Trial):  # the trial is RUNNING in the storage: others count it
        lock.release()
        mine[:] = [trial]
        result = objective(trial)
        if study._storage.get_trial(trial._trial_id).state.is_finished():
            # failed as stale meanwhile: an error, or Optuna trips on its own assertion
            raise optuna.exceptions.UpdateFinishedTrialError("failed meanwhile")
        return result

    failures = 0
    while True:
        finished: list[TrialState] = []
        with lock:
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL, then retried
            adopt_orphans(study, tune)  # one that died before its first heartbeat: stale later
            n_trials = budget(study) if budget else tune.n_trials
            if len(study.get_trials(deepcopy=False, states=FINISHED)) >= n_trials:
                return
            if deadline and time.monotonic() > deadline:
                return
            # not WAITING: a retry or enqueued point needs a worker
            taken = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
            if len(taken) < n_trials:
                mine.clear()
                try:
                    study.optimize(started, n_trials=1, catch=(Exception,),
                                   callbacks=[lambda _, trial, done=finished:
                                              done.append(trial.state)])
                except ValueError:  # Optuna's "Cannot tell a FAIL trial"
                    if not _failed_as_stale(study, mine):
                        raise
                    continue
        if not finished and len(taken) >= n_trials:
            # The rest of the budget is RUNNING elsewhere. One of those workers may have died:
            # its trial stays RUNNING until its heartbeat is older than the grace period, then
            # fail_stale_trials fails it and the retry needs a worker. Wait for that verdict
            # (each running trial finishes or goes stale within the grace period).
            time.sleep(min(tune.heartbeat_interval, STALE_POLL_S))
            continue
        failures = failures + 1 if finished == [TrialState.FAIL] else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise cli.StageError(f"{failures} trials in a row failed; see the log above")


