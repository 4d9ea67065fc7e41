"""Errors a user can fix end in one line and exit 1; anything else keeps its traceback."""

from __future__ import annotations

import json
import os

import pytest

import cifar
import cli
import fetch
from cifar import load_split
from conftest import sh


def test_user_error_is_one_line_and_exit_1(capsys):
    def main():
        raise cli.StageError("data/raw/a.tar.gz: md5 0 does not match\n data.md5 1")

    with pytest.raises(SystemExit) as exit_:
        cli.run("fetch", main)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "fetch: error: data/raw/a.tar.gz: md5 0 does not match " \
                                      "data.md5 1\n"


@pytest.mark.parametrize("bug", [ValueError("bad shape"), OSError("disk"), KeyError("x")])
def test_unexpected_exception_propagates_with_its_traceback(bug, capsys):
    def main():
        raise bug

    with pytest.raises(type(bug)):
        cli.run("train", main)
    assert capsys.readouterr().err == ""


def test_a_bug_inside_a_real_entry_point_is_not_turned_into_a_message(project, monkeypatch):
    """A ValueError from a bug (here: in the checksum) must not pass for a user's error."""
    def broken(path):
        raise ValueError("bug in md5sum")

    monkeypatch.chdir(project)
    monkeypatch.setattr(fetch, "md5sum", broken)
    with pytest.raises(ValueError, match="bug in md5sum"):
        cli.run("fetch", fetch.main)


def test_project_errors_are_user_errors(tmp_path):
    from params import ParamsError

    assert issubclass(ParamsError, cli.UserError) and issubclass(cifar.ArchiveError, cli.UserError)
    with pytest.raises(cifar.ArchiveError, match="no such file: run `dvc repro fetch`"):
        cifar.read_archive(tmp_path / "missing.tar.gz")
    with pytest.raises(cli.StageError, match="train.npz is missing: run `dvc repro preprocess`"):
        load_split(tmp_path, "train")


@pytest.mark.slow
def test_evaluate_of_a_run_the_store_lacks_is_one_line(project):
    """A clone gets reports/train.json from git, but not the MLflow store that names its run."""
    train_run = project / "reports/train.json"
    missing = sh("python", "src/evaluate.py", cwd=project, check=False)
    assert missing.returncode == 1, missing.stderr
    assert missing.stderr.splitlines()[-1] == \
        "evaluate: error: reports/train.json is missing: run `dvc repro train`"

    train_run.parent.mkdir(parents=True, exist_ok=True)
    train_run.write_text(json.dumps({"mlflow_run_id": "0" * 32}))
    unknown = sh("python", "src/evaluate.py", cwd=project, check=False)
    assert unknown.returncode == 1, unknown.stderr
    assert "Traceback" not in unknown.stderr
    last = unknown.stderr.splitlines()[-1]
    assert last.startswith(f"evaluate: error: reports/train.json names MLflow run {'0' * 32}, "
                           "which the tracking store sqlite:///")
    assert not (project / "reports/metrics.json").exists()  # failed before writing anything
    assert os.listdir(project / "reports") == ["train.json"]


@pytest.mark.parametrize("url", ["mysql://root@127.0.0.1:3306/test",
                                 "mysql+pymysql://root:secret@127.0.0.1/test",
                                 "mssql://sa:secret@db/x"])
def test_a_database_without_a_lock_is_refused_in_one_line(url):
    from dblock import DatabaseLock

    with pytest.raises(cli.UserError) as error:
        DatabaseLock(url, "optuna-study")
    message = str(error.value)
    assert "unsupported database" in message and "sqlite:///PATH or postgresql://" in message
    assert "secret" not in message and "\n" not in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:5000", "file:///tmp/mlruns"])
def test_stores_that_are_not_databases_lock_nothing(url):
    from dblock import DatabaseLock

    with DatabaseLock(url, "mlflow-store") as lock:
        assert not lock.held


@pytest.mark.slow
@pytest.mark.parametrize(("storage", "expected"), [
    ("postgresql://postgres:hunter2@127.0.0.1:1/nowhere",  # no server on port 1
     "tune: error: cannot reach the database postgresql://postgres:***@127.0.0.1:1/nowhere: "),
    ("mysql://root@127.0.0.1:3306/test",
     "tune: error: mysql://root@127.0.0.1:3306/test: unsupported database 'mysql': "),
])
def test_tune_on_a_store_it_cannot_use_is_one_line(project, storage, expected):
    sh("dvc", "repro", "preprocess", cwd=project)
    for only_report in ([], ["--report-only"]):  # which looks for the study first
        result = sh("python", "src/tune.py", "--storage", storage, "--n-trials", "1",
                    *only_report, cwd=project, check=False)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(expected), \
            result.stderr[-2000:]


@pytest.mark.slow
def test_a_tracking_server_that_does_not_answer_is_one_line(project):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sh("dvc", "repro", "preprocess", cwd=project)
    result = sh("python", "src/train.py", cwd=project, check=False,
                MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"train: error: MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: the MLflow tracking server "
        "does not answer (ConnectionError after 15 s)")
