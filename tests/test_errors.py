"""Errors a user can fix end in one line and exit 1; anything else keeps its traceback."""

from __future__ import annotations

import json
import os

import pytest

import cifar
import cli
import fetch
from conftest import sh
from preprocess import load_split


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
