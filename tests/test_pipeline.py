"""`dvc repro` end to end in a temporary copy of the project: tiny archive, shrunk config."""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pandas as pd
import pytest

from cifar import Split, load_split
from conftest import ROOT, TINY, sh
from params import load_params, parse_params, read_yaml, update_yaml, with_overrides

pytestmark = pytest.mark.slow

METRIC_KEYS = {"test_loss", "test_accuracy", "val_loss", "val_accuracy",
               "train_accuracy_inference", "honest_gap", "worst_gap"}


def runs_of(project, experiment="cifar10-alexnet"):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def axis_titles(spec) -> dict[str, set[str]]:
    """The x and y axis titles anywhere in a Vega-Lite spec (layers included)."""
    titles = {"x": set(), "y": set()}
    nodes = [spec]
    while nodes:
        node = nodes.pop()
        if isinstance(node, dict):
            for axis, titled in titles.items():
                channel = (node.get("encoding") or {}).get(axis)
                if isinstance(channel, dict) and "title" in channel:
                    titled.add(channel["title"])
            nodes += node.values()
        elif isinstance(node, list):
            nodes += node
    return titles


def test_repro_end_to_end(project):
    commit = sh("git", "rev-parse", "--short", "HEAD", cwd=project).stdout.strip()
    out = sh("dvc", "repro", cwd=project)
    for stage in ("fetch", "preprocess", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout
    # the log through a pipe (a log file, CI): one line per epoch, no terminal codes
    assert re.search(r"^epoch 2/2: .*val_accuracy \d\.\d{4}", out.stdout, re.MULTILINE), out
    assert "\x1b[" not in out.stdout, out.stdout

    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics.keys() == METRIC_KEYS  # final_gap was the history's last gap again
    # rounded: a difference of accuracies is 0.01, not 0.010000000000000009
    assert all(value == round(value, 6) for value in metrics.values())
    per_class = json.loads((project / "reports/per_class.json").read_text())["test_accuracy"]
    assert 0 <= metrics["test_accuracy"] <= 1 and len(per_class) == 10
    history = pd.read_csv(project / "reports/history.csv")
    assert list(history["epoch"]) == [1, 2]
    # evaluation from the saved model measures what the last epoch's validation measured
    assert metrics["val_accuracy"] == pytest.approx(history["val_accuracy"].iloc[-1], abs=1e-6)
    assert metrics["worst_gap"] == pytest.approx(history["gap"].max(), abs=1e-6)
    # the honest gap is scoring's, the tuning trials' own: inference-mode train minus validation
    assert metrics["honest_gap"] == pytest.approx(
        metrics["train_accuracy_inference"] - metrics["val_accuracy"], abs=2e-6)
    assert (project / "reports/figures/confusion_matrix.png").stat().st_size > 0

    (run,) = runs_of(project)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == commit  # a clean worktree: the commit alone
    client = mlflow.tracking.MlflowClient()
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "gap"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]
    experiment = client.get_experiment_by_name("cifar10-alexnet")  # opens on the runs table
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "dvc repro" in experiment.tags["mlflow.note.content"]
    # MLflow 3.17's UI opens on GenAI traces unless the URL says workflowType=machine_learning;
    # the view the URL names shows the key figures as columns
    url = (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
           "?workflowType=machine_learning&viewStateShareKey=pipeline-columns")
    assert f"evaluate: runs in the MLflow UI (`mlflow ui`): {url}" in out.stdout
    view = json.loads(experiment.tags["mlflow.sharedViewState.pipeline-columns"])
    assert view["selectedColumns"][:3] == ["metrics.`val_accuracy`", "metrics.`honest_gap`",
                                           "metrics.`test_accuracy`"]
    assert view["orderByKey"] == "metrics.`val_accuracy`"  # chosen on validation, never test
    assert "params.`model.dropout`" in view["selectedColumns"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    # the same names in MLflow as in the reports
    assert {key for key in run.data.metrics if "." in key} == {
        f"test_accuracy.{cls}" for cls in per_class}
    assert run.data.metrics["train_accuracy_inference"] == metrics["train_accuracy_inference"]
    assert "final_gap" not in run.data.metrics and "train_accuracy" not in run.data.metrics
    # the run's description: its key figures and what differs from the seed
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith(f"test_accuracy {metrics['test_accuracy']:.4f}, honest_gap ")
    assert "train.epochs=2" in description and "model.dropout" not in description
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.dropout"] == "0.1"
    tags = run.data.tags
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert tags["data.md5"] == load_params(project / "params.yaml").data.md5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"history.csv", "metrics.json", "per_class.json", "confusion.csv",
            "figures"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/confusion_matrix.png", "figures/learning_curves.png"}
    assert (project / "mlruns").is_dir() and (project / "mlflow.db").is_file()

    # the logged model predicts on raw uint8 images
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = load_split(project / "data/processed", "test").images[:4]
    probabilities = np.asarray(model.predict(images))
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)

    # nothing changed: nothing runs
    again = sh("dvc", "repro", cwd=project)
    assert "Running stage" not in again.stdout
    assert len(runs_of(project)) == 1

    # tracking-only and inference-only settings leave training up to date
    update_yaml(project / "params.yaml", {"mlflow.experiment": "renamed",
                                          "evaluate.batch_size": 32})
    status = json.loads(sh("dvc", "status", "--json", cwd=project).stdout)
    assert set(status) == {"evaluate"}
    update_yaml(project / "params.yaml", {"mlflow.experiment": "cifar10-alexnet",
                                          "evaluate.batch_size": 64})

    # a train.* change reruns train and evaluate only; its run is named after what changed
    update_yaml(project / "params.yaml", {"train.epochs": 1})
    partial = sh("dvc", "repro", cwd=project)
    assert "Running stage 'train'" in partial.stdout
    assert "Running stage 'evaluate'" in partial.stdout
    assert "Running stage 'fetch'" not in partial.stdout
    assert "Running stage 'preprocess'" not in partial.stdout
    names = sorted(r.info.run_name for r in runs_of(project))
    assert names == [commit, f"{commit}-dirty epochs=1"]

    assert "test_accuracy" in sh("dvc", "metrics", "show", cwd=project).stdout
    sh("dvc", "plots", "show", "--out", str(project.parent / "plots_out"), cwd=project)
    assert (project.parent / "plots_out" / "index.html").is_file()
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=project).stdout)["data"]
    assert set(plots) == {"accuracy", "loss", "generalization_gap", "reports/confusion.csv"}
    for plot in plots.values():
        titles = axis_titles(plot[0]["content"])
        assert titles["x"] and titles["y"] and not (titles["x"] | titles["y"]) & {"", "x", "y"}

    # stages share code through libraries, so train and evaluate do not depend on
    # src/preprocess.py: a change there reruns preprocess, whose data files come out the same
    script = project / "src/preprocess.py"
    script.write_text(script.read_text().replace(
        '"train_pixel_std":', '"train_pixel_std":  # rounded to 6 places\n       ', 1))
    status = json.loads(sh("dvc", "status", "--json", cwd=project).stdout)
    assert sorted(status) == ["preprocess"], status
    again = sh("dvc", "repro", cwd=project).stdout
    assert "Running stage 'preprocess'" in again
    assert "Running stage 'train'" not in again and "Running stage 'evaluate'" not in again
    assert json.loads(sh("dvc", "status", "--json", cwd=project).stdout) == {}

    # a DVC experiment from that baseline lands in the same MLflow store
    # (the commands docs/reproducing.md gives: everything the baseline needs is committed)
    sh("git", "add", "dvc.lock", "params.yaml", "reports/metrics.json", "reports/confusion.csv",
       "src/preprocess.py", "*.gitignore", cwd=project)
    sh("git", "commit", "-qm", "baseline", cwd=project)
    assert sh("git", "status", "--porcelain", cwd=project).stdout == ""
    sh("dvc", "metrics", "diff", "HEAD", cwd=project)  # reads the committed metrics
    sh("dvc", "exp", "run", "-S", "train.epochs=3", "--temp", "-n", "three-epochs", cwd=project)
    show = sh("dvc", "exp", "show", "--no-pager", "--csv", cwd=project).stdout
    assert "three-epochs" in show
    # the columns a user compares come first, the data summary is not among them
    header = show.splitlines()[0].split(",")
    first = header.index("test_accuracy")
    assert header[first:first + 3] == ["test_accuracy", "honest_gap", "val_accuracy"]
    assert not any(column.startswith(("counts", "per_class.")) for column in header)
    # what never varies stays out of the table: no paths among the params, no per-class
    # figures among the metrics; the knobs a user compares are there
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    baseline = shown[0]["data"]
    assert set(baseline["metrics"]) == {"reports/metrics.json"}
    assert set(baseline["metrics"]["reports/metrics.json"]["data"]) == METRIC_KEYS
    assert set(baseline["params"]) == {"params.yaml"}
    params = baseline["params"]["params.yaml"]["data"]
    assert "paths" not in params and {"model", "augment", "train"} <= params.keys()
    runs = runs_of(project)
    assert len(runs) == 3
    # a DVC experiment's run is named after it, in MLflow as in `dvc exp show`
    assert "three-epochs" in {r.info.run_name for r in runs}
    by_name = {r.data.tags.get("dvc.exp_name"): r for r in runs}
    assert "three-epochs" in by_name
    assert by_name["three-epochs"].data.params["train.epochs"] == "3"


def test_test_loss_is_plain_cross_entropy_whatever_the_training_loss():
    """Label smoothing and L2 change the training objective, not the reported test_loss."""
    from fitting import compile_model
    from model import build_model
    from scoring import measure

    params = parse_params(with_overrides(read_yaml(ROOT / "params.yaml"), TINY | {
        "model.l2": 0.01, "train.label_smoothing": 0.2}))
    model = build_model(params.model, params.seed)
    compile_model(model, params, steps=1, xla=False)
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
                  rng.integers(0, 10, 50).astype(np.uint8))
    model.fit(split.images, np.eye(10)[split.labels], epochs=1, verbose=0)

    test_loss, test_accuracy = measure(model, split, batch_size=16)
    probabilities = model.predict(split.images, verbose=0).astype(np.float64)
    assert test_loss == pytest.approx(
        -np.log(probabilities[np.arange(50), split.labels]).mean(), rel=1e-5)
    assert test_accuracy == np.mean(probabilities.argmax(axis=1) == split.labels)
    trained_objective = model.evaluate(split.images, np.eye(10)[split.labels], verbose=0)[0]
    assert trained_objective != pytest.approx(test_loss, rel=1e-2)
