"""The best model where MLflow users look for it: registered per run, `champion` moved by
promote.py, served over REST by `mlflow models serve`, predicted from image files.

One project for the module: two `dvc repro` runs with different params (two versions), then each
test uses them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import requests
from PIL import Image

from cifar import load_split
from conftest import make_project, sh, tool_env
from params import update_yaml

pytestmark = pytest.mark.slow

NAME = "cifar10-alexnet"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_archive):
    """A project whose registry holds two versions: the tiny default, then a second config."""
    project = make_project(tmp_path_factory.mktemp("registry") / "project", tiny_archive)
    # no gap limit: a tiny model's gap says nothing; promote chooses on validation accuracy
    update_yaml(project / "params.yaml", {"tune.max_gap": None})
    sh("git", "commit", "-qam", "no gap limit", cwd=project)
    first = repro(project)
    update_yaml(project / "params.yaml", {"augment.flip": True, "train.epochs": 3})
    second = repro(project)
    return project, first, second


def repro(project) -> str:
    """`dvc repro`'s output: the stages' stdout, then their stderr (MLflow's log lines)."""
    result = sh("dvc", "repro", cwd=project)
    return result.stdout + result.stderr


def client(project):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.tracking.MlflowClient()


def versions(project):
    found = client(project).search_model_versions(f"name = '{NAME}'")
    return {int(v.version): v for v in found}


def champion(project) -> int:
    return int(client(project).get_model_version_by_alias(NAME, "champion").version)


def test_every_evaluated_run_is_a_version_and_the_first_is_champion(registered):
    project, first, second = registered
    assert f"evaluate: registered {NAME} version 1 @champion" in first
    assert f"evaluate: registered {NAME} version 2 (models:/{NAME}/2)" in second
    found = versions(project)
    assert sorted(found) == [1, 2] and champion(project) == 1
    assert "has no artifacts at artifact path" not in first + second
    store = client(project)
    for version in found.values():
        run = store.get_run(version.run_id)
        # the model the run logged, by its MLflow 3 id: not found through a fallback that warns
        (output,) = run.outputs.model_outputs
        assert version.source == f"models:/{output.model_id}"
        assert version.tags["git.commit"] == run.data.tags["git.commit"]
        assert version.tags["data.md5"] == run.data.params["data.md5"]
        assert version.tags["keras.backend"].startswith("tensorflow ")
        for key in ("val_accuracy", "honest_gap", "test_accuracy"):
            assert float(version.tags[key]) == pytest.approx(run.data.metrics[key], abs=1e-4)
    # the description says what configuration it is: the params that differ from the seed's
    assert "augment.flip=True" in found[2].description
    assert "augment.flip" not in found[1].description
    assert "train.epochs=2" in found[1].description and "train.epochs=3" in found[2].description
    # re-evaluating a run (as a resumed run does) registers nothing new
    again = sh("dvc", "repro", "--single-item", "--force", "evaluate", cwd=project).stdout
    assert f"evaluate: already registered as {NAME} version 2" in again
    assert sorted(versions(project)) == [1, 2]


def test_promote_moves_the_champion_by_validation_accuracy_and_back(registered):
    project, _, _ = registered
    found = versions(project)
    best = max(found, key=lambda v: (float(found[v].tags["val_accuracy"]),
                                     -float(found[v].tags["honest_gap"]), v))
    dry = sh(sys.executable, "src/promote.py", "--dry-run", cwd=project).stdout
    assert champion(project) == 1  # a dry run moves nothing
    assert ("would stay at version 1" if best == 1 else f"to version {best}") in dry
    out = sh(sys.executable, "src/promote.py", cwd=project).stdout
    assert champion(project) == best
    moved = "stays at version 1" if best == 1 else f"to version {best}"  # tiny models: either
    assert f"{moved} (val_accuracy {found[best].tags['val_accuracy']}" in out
    assert "(best validation accuracy)" in out  # tune.max_gap is null here
    back = sh(sys.executable, "src/promote.py", "--version", "1", cwd=project).stdout
    assert champion(project) == 1
    assert ("stays at version 1" if best == 1 else "to version 1") in back
    for dry_run in ([], ["--dry-run"]):  # a dry run refuses it as the move would
        missing = sh(sys.executable, "src/promote.py", "--version", "9", *dry_run, cwd=project,
                     check=False)
        assert missing.returncode == 1
        assert missing.stderr.strip() == (f"promote: error: '{NAME}' has no version 9 "
                                          "(versions: 1, 2)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_champion_served_over_rest_answers_as_in_process(registered, tmp_path):
    project, _, _ = registered
    port = free_port()
    uri = f"models:/{NAME}@champion"
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port)], cwd=project, stdout=log, stderr=subprocess.STDOUT,
        env=tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}"),
        start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail("no answer from mlflow models serve")
        images = load_split(project / "data/processed", "test").images[:8]
        answer = requests.post(f"http://127.0.0.1:{port}/invocations",
                               json={"inputs": images.tolist()}, timeout=60)
        assert answer.status_code == 200, answer.text
        served = np.asarray(answer.json()["predictions"])
        assert served.shape == (8, 10)
        client(project)
        local = np.asarray(mlflow.pyfunc.load_model(uri).predict(images))
        np.testing.assert_array_equal(served.argmax(axis=1), local.argmax(axis=1))
        np.testing.assert_allclose(served, local, atol=1e-5)
        # values a uint8 cannot hold, and a wrong shape: MLflow's 400 naming what is wrong
        too_large = np.full_like(images, 256, dtype=int)
        refusals = {"Python integer 256 out of bounds for uint8": too_large,
                    "Shape of input (8, 16, 32, 3) does not match expected shape (-1, 32, 32, 3)":
                    images[:, :16]}
        for message, bad in refusals.items():
            refused = requests.post(f"http://127.0.0.1:{port}/invocations",
                                    json={"inputs": bad.tolist()}, timeout=60)
            assert refused.status_code == 400, refused.text
            assert message in refused.json()["message"]
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def test_predict_reads_image_files_and_names_a_file_that_is_not_one(registered, tmp_path):
    project, _, _ = registered
    images = load_split(project / "data/processed", "test").images[:2]
    small = tmp_path / "small.png"
    Image.fromarray(images[0]).save(small)
    large = tmp_path / "large.jpg"
    Image.fromarray(images[1]).resize((97, 61)).convert("L").save(large)  # any size, grey
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    result = sh(sys.executable, "src/predict.py", str(small), str(text), str(large), "--top", "2",
                "--json", cwd=project, check=False)
    assert result.returncode == 1  # one file failed; the others were predicted
    assert result.stderr.strip().splitlines()[-1] == \
        f"predict: error: {text}: not an image Pillow can read"
    answer = json.loads(result.stdout)
    assert answer["model"] == f"models:/{NAME}@champion"
    assert [p["file"] for p in answer["predictions"]] == [str(small), str(large)]
    for prediction in answer["predictions"]:
        top = prediction["top"]
        assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
    # the same model in-process on the same pixels gives the same top class
    client(project)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    expected = np.asarray(model.predict(images[:1])).argmax(axis=1)[0]
    from cifar import CLASSES

    assert answer["predictions"][0]["top"][0]["class"] == CLASSES[expected]
    plain = sh(sys.executable, "src/predict.py", str(small), "--model", "models/model.keras",
               cwd=project).stdout.splitlines()
    assert plain[0] == "predict: model models/model.keras"
    assert plain[1].startswith(f"{small}: ") and len(plain) == 2


def test_dvc_lists_the_model_as_a_model_artifact(registered):
    """dvc.yaml declares models/model.keras under `artifacts:`, which DVC's tooling reads."""
    project, _, _ = registered
    # in a process of its own: DVC's Repo in this one leaves pytest's capture streams closed
    read = ("import json; from dvc.repo import Repo\n"
            "with Repo('.') as repo:\n"
            f"    print(json.dumps(repo.artifacts.read()['dvc.yaml']['{NAME}'].to_dict()))")
    artifact = json.loads(sh(sys.executable, "-c", read, cwd=project).stdout)
    assert (artifact["path"], artifact["type"]) == ("models/model.keras", "model")
    assert "uint8" in artifact["desc"] and "cifar10" in artifact["labels"]
    assert (project / artifact["path"]).is_file()  # the train stage's output, where it says
