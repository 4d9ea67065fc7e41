"""What optuna-dashboard shows of a study with a gap limit: each trial's constraint and a note
saying whether it is feasible, and a study note naming the winner or saying there is none."""

from __future__ import annotations

import io
import json
import wsgiref.util

import optuna
import pytest
from optuna_dashboard import wsgi

import study_report
from conftest import ROOT
from params import parse_tune, read_yaml, with_overrides

TUNE = parse_tune(with_overrides(read_yaml(ROOT / "params.yaml"),
                                  {"tune.max_gap": 0.1, "tune.gap_growth": 1.6}))


def api(storage: str, path: str) -> dict:
    """GET `path` from optuna-dashboard's own WSGI app, in process."""
    environ = {"PATH_INFO": path, "QUERY_STRING": "after=0", "REQUEST_METHOD": "GET",
               "wsgi.input": io.BytesIO()}
    wsgiref.util.setup_testing_defaults(environ)
    status = []
    body = b"".join(wsgi(storage)(environ, lambda s, headers, *_: status.append(s)))
    assert status[0].startswith("200"), status
    return json.loads(body)


def study_with_gaps(tmp_path, gaps: list[float]) -> tuple[str, optuna.Study]:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="gaps", direction="maximize")

    def objective(trial):
        gap = gaps[trial.number]
        study_report.record_constraint(trial, gap, TUNE)
        trial.set_user_attr("honest_gap", gap)
        return 0.5 + trial.number / 10  # the last trial has the best accuracy

    study.optimize(objective, n_trials=len(gaps))
    return storage, study


@pytest.mark.parametrize(("gaps", "winner"), [([0.05, 0.3], 0), ([0.2, 0.3], None)])
def test_the_dashboard_shows_feasibility_and_the_winner(tmp_path, gaps, winner):
    storage, study = study_with_gaps(tmp_path, gaps)
    best = study_report.best(study)
    assert (best.number if best else None) == winner
    study_report._study_note(study, TUNE, best)
    detail = api(storage, f"/api/studies/{study._study_id}")
    trials = {t["number"]: t for t in detail["trials"]}
    for number, gap in enumerate(gaps):
        assert trials[number]["constraints"] == [pytest.approx(gap - TUNE.trial_max_gap)]
        verdict, sign = ("**feasible**", "<=") if gap <= TUNE.trial_max_gap else (
            "**infeasible**", ">")
        # a short trial's limit: tune.max_gap over tune.gap_growth, said so
        assert trials[number]["note"]["body"] == (
            f"{verdict}: honest gap {gap:.4f} {sign} 0.0625 (tune.max_gap 0.1 / "
            "tune.gap_growth 1.6)")
    note = detail["note"]["body"]
    if winner is None:
        assert note.startswith("**No winner**: no complete trial has an honest gap within "
                               "0.0625 (tune.max_gap 0.1 / tune.gap_growth 1.6).")
    else:
        assert note.startswith(f"**Winner: trial {winner}**")
    # Optuna itself reads the same constraint: feasibility is one fact in both
    assert [all(v <= 0 for v in t.constraints.values()) for t in study.trials] == \
        [gap <= TUNE.trial_max_gap for gap in gaps]


def test_the_accuracy_gap_figure_labels_the_winner_only(tmp_path, monkeypatch):
    # a number beside every point overlapped wherever trials scored alike
    storage, study = study_with_gaps(tmp_path, [0.03, 0.04, 0.05, 0.3, 0.3])
    best = study_report.best(study)
    labels = {}

    def keep_labels(figure, path):
        figure = getattr(figure, "figure", figure)
        labels[path.name] = [text.get_text() for axes in figure.axes for text in axes.texts]
        study_report.plt.close(figure)

    monkeypatch.setattr(study_report, "_save", keep_labels)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    study_report._plots(study, complete, tmp_path, TUNE, best, "best trial")
    assert labels["accuracy_vs_gap.png"] == [f"trial {best.number}"] == ["trial 2"]


def test_a_best_trial_that_a_pending_confirmation_may_beat_is_not_called_the_winner(tmp_path):
    storage, study = study_with_gaps(tmp_path, [0.05, 0.3])
    study_report._study_note(study, TUNE, study.trials[0], final=False)
    note = api(storage, f"/api/studies/{study._study_id}")["note"]["body"]
    assert note.startswith("**Best so far: trial 0** (no winner until every confirmation is "
                           "done)")
    assert "Winner" not in note

