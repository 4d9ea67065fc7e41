"""What survives what: killed, terminated, diverging and concurrent runs of the pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from cifar import Split
from conftest import ROOT, TINY, sh, tool_env
from params import parse_params, read_yaml, update_yaml, with_overrides

pytestmark = pytest.mark.slow


def runs_of(project):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["cifar10-alexnet"], output_format="list")


def start(project, *command, **extra_env):
    return subprocess.Popen(command, cwd=project, env=tool_env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_epoch(project, epoch, process, timeout=300):
    """Block until the train stage has checkpointed `epoch` epochs."""
    state = project / "checkpoints/train/state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.exists():
            try:
                if json.loads(state.read_text())["epochs_done"] >= epoch:
                    return
            except ValueError:
                pass  # being replaced right now
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def assert_same_as_uninterrupted(project, other):
    """Train the project's config again in `other`, uninterrupted: the same figures, exactly."""
    sh("cp", "-a", f"{project}/.", str(other), cwd=project)
    for path in ("mlflow.db", "mlruns", "reports", "models", "checkpoints"):
        sh("rm", "-rf", str(other / path), cwd=other)
    sh("dvc", "repro", "-f", "train", "evaluate", cwd=other)
    pd.testing.assert_frame_equal(pd.read_csv(project / "reports/history.csv"),
                                  pd.read_csv(other / "reports/history.csv"))
    assert json.loads((project / "reports/metrics.json").read_text()) == \
        json.loads((other / "reports/metrics.json").read_text())


def test_sigkill_then_repro_resumes_the_same_run_exactly(project, tmp_path_factory):
    update_yaml(project / "params.yaml", {"train.epochs": 4, "train.deterministic": True})
    sh("git", "commit", "-qam", "4 deterministic epochs", cwd=project)
    sh("dvc", "repro", "preprocess", cwd=project)
    lock_before = (project / "dvc.lock").read_text()

    process = start(project, "dvc", "repro")
    wait_for_epoch(project, 1, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (project / "dvc.lock").read_text() == lock_before  # nothing committed
    done = json.loads((project / "checkpoints/train/state.json").read_text())["epochs_done"]
    assert 1 <= done < 4

    resumed = sh("dvc", "repro", cwd=project)
    assert f"resuming after epoch {done}" in resumed.stdout
    (run,) = runs_of(project)
    assert run.info.status == "FINISHED"
    client = mlflow.tracking.MlflowClient()
    for key in ("loss", "val_accuracy", "gap"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4]

    # an uninterrupted run of the same config ends with exactly the same figures
    assert_same_as_uninterrupted(project, tmp_path_factory.mktemp("uninterrupted"))


def test_sigterm_marks_the_run_killed(project):
    update_yaml(project / "params.yaml", {"train.epochs": 30})
    sh("dvc", "repro", "preprocess", cwd=project)
    process = start(project, "python", "src/train.py")
    wait_for_epoch(project, 1, process)
    process.send_signal(signal.SIGTERM)
    status, output = process.wait(timeout=120), process.stdout.read()
    assert status == 143, output
    assert "train: terminated" in output
    (run,) = runs_of(project)
    assert run.info.status == "KILLED"
    assert not (project / "models/model.keras").exists()


def test_diverging_loss_fails_the_run_and_commits_nothing(project):
    sh("dvc", "repro", cwd=project)
    lock_before = (project / "dvc.lock").read_text()
    outputs = ("models/model.keras", "reports/history.csv", "reports/train.json",
               "reports/metrics.json")
    before = {path: (project / path).read_bytes() for path in outputs}
    # the largest rate and weight decay params allow, deterministic: the loss turns NaN
    update_yaml(project / "params.yaml", {"train.learning_rate": 10.0, "train.momentum": 0.9,
                                          "model.l2": 1.0, "model.dropout": 0.0,
                                          "train.epochs": 3, "train.deterministic": True})
    failed = sh("dvc", "repro", cwd=project, check=False)
    assert failed.returncode != 0
    assert "train: error: loss became" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert (project / "dvc.lock").read_text() == lock_before
    statuses = sorted(r.info.status for r in runs_of(project))
    assert statuses == ["FAILED", "FINISHED"]

    # back to the committed params: the last good outputs come back from DVC's run-cache
    update_yaml(project / "params.yaml", {"train.learning_rate": 0.01, "train.momentum": 0.0,
                                          "model.l2": 0.0, "model.dropout": 0.1,
                                          "train.epochs": 2, "train.deterministic": False})
    again = sh("dvc", "repro", cwd=project)
    assert "Running stage" not in again.stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in again.stdout
    assert {path: (project / path).read_bytes() for path in outputs} == before
    assert (project / "dvc.lock").read_text() == lock_before
    assert len(runs_of(project)) == 2


def test_second_repro_gets_the_lock_and_changes_nothing(project):
    update_yaml(project / "params.yaml", {"train.epochs": 3})
    sh("dvc", "repro", "preprocess", cwd=project)
    first = start(project, "dvc", "repro")
    wait_for_epoch(project, 1, first)
    second = sh("dvc", "repro", cwd=project, check=False)
    assert second.returncode != 0
    assert "lock" in (second.stdout + second.stderr).lower()
    assert first.wait(timeout=300) == 0, first.stdout.read()
    assert len(runs_of(project)) == 1


def test_bad_params_is_one_line_and_no_traceback(project):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("epochs: 2", "epochs: two", 1))
    result = sh("python", "src/train.py", cwd=project, check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: params.yaml: train.epochs: Input should be a valid "
                           "integer") and last.endswith("(got 'two')")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("stage", ["train", "evaluate", "tune"])
def test_bad_params_fail_before_keras_loads(project, stage):
    """The stage refuses params.yaml before it imports Keras or TensorFlow (seconds of start-up):
    a spy module in their place would be imported otherwise."""
    update_yaml(project / "params.yaml", {"model.dropout": 2})
    spy = project / "spy"
    for name in ("keras", "tensorflow", "jax"):
        (spy / name).mkdir(parents=True)
        (spy / name / "__init__.py").write_text(f"raise SystemExit('{name} was imported')\n")
    result = sh("python", f"src/{stage}.py", cwd=project, check=False,
                PYTHONPATH=f"{spy}{os.pathsep}{project / 'src'}")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (f"{stage}: error: params.yaml: model.dropout: Input should "
                                     "be less than 1 (got 2)")


def test_nan_loss_stops_training_with_a_clear_error():
    from cli import StageError
    from fitting import StopOnNaN

    StopOnNaN().on_epoch_end(0, {"loss": 1.5})
    with pytest.raises(StageError, match="loss became nan in epoch 3"):
        StopOnNaN().on_epoch_end(2, {"loss": float("nan")})


def test_a_code_change_drops_the_checkpoint_and_says_why(project):
    update_yaml(project / "params.yaml", {"train.epochs": 30})
    sh("dvc", "repro", "preprocess", cwd=project)
    first = start(project, "python", "src/train.py")
    wait_for_epoch(project, 1, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    with open(project / "src/model.py", "a") as source:  # say, a fix in the architecture
        source.write("\n# changed\n")

    second = start(project, "python", "src/train.py")
    seen = []
    for line in second.stdout:  # the verdict comes before the first epoch starts
        seen.append(line)
        if line.startswith(("train: checkpoint ignored", "train: resuming", "epoch ")):
            break
    os.killpg(second.pid, signal.SIGKILL)
    second.wait()
    assert seen[-1] == "train: checkpoint ignored: params, data, code or device settings " \
                       "changed; training from the start\n", "".join(seen)


class LastEpochPredictsNine(keras.callbacks.Callback):
    """Makes the last epoch the worst: its model answers class 9, which no validation image is."""

    def __init__(self, last_epoch: int):
        super().__init__()
        self.last_epoch = last_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.last_epoch:
            output = [layer for layer in self.model.layers
                      if getattr(layer, "bias", None) is not None][-1]
            output.bias.assign(output.bias + np.eye(10, dtype="float32")[9] * 1000)


def _blobs(n: int, classes: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    base = (labels[:, None, None, None] * 25).astype(np.int16)
    images = np.clip(base + rng.integers(0, 60, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return Split(images, labels)


def test_early_stopping_without_a_stop_reports_the_saved_model():
    """Patience on, no stop: the model fit returns (saved as models/model.keras, summarized in
    train.json from the last history row) is the last epoch's, not the best epoch's."""
    from fitting import fit
    from scoring import measure

    params = parse_params(with_overrides(read_yaml(ROOT / "params.yaml"), TINY | {
        "train.epochs": 3, "train.early_stopping_patience": 5, "train.deterministic": True}))
    val = _blobs(60, 9, seed=1)
    result = fit(params, _blobs(120, 10, seed=0), val, verbose=0,
                 callbacks=[LastEpochPredictsNine(last_epoch=2)])
    accuracies = [row["val_accuracy"] for row in result.history]
    assert len(accuracies) == 3 and accuracies[-1] < max(accuracies)  # the best is not the last
    assert not result.stopped_early
    assert measure(result.model, val, params.evaluate.batch_size)[1] == \
        pytest.approx(accuracies[-1], abs=1e-6)
