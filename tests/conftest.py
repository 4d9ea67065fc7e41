"""Shared fixtures: a tiny CIFAR-10 archive in the official binary layout, a loopback HTTP server
that can misbehave on purpose, and a temporary copy of the project with params.yaml shrunk."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import cifar
from params import update_yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("src", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
                 ".gitignore", "pyproject.toml")


def make_archive(path: Path, per_batch: int = 60, test: int = 60, seed: int = 0,
                 batches: dict[str, bytes] | None = None) -> str:
    """Write a tiny archive (5 training batches + test batch); return its md5.

    Images are class-dependent colour blobs plus noise, so a tiny model can learn something.
    `batches` replaces members' payloads by name (for corrupt-archive tests).
    """
    rng = np.random.default_rng(seed)

    def batch(n: int) -> bytes:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        base = (labels[:, None, None, None] * 25).astype(np.int16)
        images = np.clip(base + rng.integers(0, 60, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        return cifar.encode_batch(images, labels)

    members = {name: batch(per_batch) for name in cifar.TRAIN_MEMBERS}
    members[cifar.TEST_MEMBER] = batch(test)
    members.update(batches or {})
    with tarfile.open(path, "w:gz") as out:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            out.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("archive") / "cifar-10-binary.tar.gz"
    return path, make_archive(path)


@dataclass
class Faults:
    """How the server misbehaves; counters go down as requests are served."""
    cut_after: int | None = None   # close the connection after this many body bytes (once)
    ranges: bool = True            # honour Range requests with 206
    errors: list[int] = field(default_factory=list)  # statuses to answer first, in order
    requests: list[str] = field(default_factory=list)  # Range headers seen ("" when none)


class ArchiveServer:
    def __init__(self, payload: bytes):
        self.payload = payload
        self.faults = Faults()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                faults = server.faults
                faults.requests.append(self.headers.get("Range", ""))
                if self.path != "/cifar-10-binary.tar.gz":
                    self.send_error(404)
                    return
                if faults.errors:
                    self.send_error(faults.errors.pop(0))
                    return
                start = 0
                if faults.ranges and self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(server.payload):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    size = len(server.payload)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                body = server.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if faults.cut_after is not None:
                    cut, faults.cut_after = faults.cut_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/cifar-10-binary.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """One JAX compilation cache per test worker (JAX's own JAX_COMPILATION_CACHE_DIR, inherited
    by every subprocess): the tiny model's programs compile once, not once per stage and run."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))


@pytest.fixture
def server(tiny_archive):
    with ArchiveServer(tiny_archive[0].read_bytes()) as running:
        yield running


TINY = {  # the real params.yaml, shrunk: a small model, few images, two epochs
    "data.val_size": 60,
    "model.filters": [8, 16, 16, 16],
    "model.dense_units": [16, 16, 16, 16],
    "train.epochs": 2,
    "evaluate.batch_size": 64,
}


# a small space and a recipe inside it, for the tests of what a study starts from
SPACE = {"model.dropout": {"low": 0.0, "high": 0.5},
         "augment.crop": {"choices": [0, 4]},
         "train.learning_rate": {"low": 0.005, "high": 0.05, "log": True},
         "train.batch_size": {"choices": [32, 64]}}
RECIPE = {"model.dropout": 0.25, "augment.crop": 4, "train.learning_rate": 0.02,
          "train.batch_size": 64}

# no enqueued trials (the recipe and its variants), so that a study samples from the start
NO_STARTING_POINTS = {"tune.recipe": None, "tune.variants": []}


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this venv's python and dvc first, no outside MLflow server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a hung child killed with SIGABRT prints its stacks
    for role in ("AUTHOR", "COMMITTER"):  # dvc exp run commits; CI may have no git identity
        env.setdefault(f"GIT_{role}_NAME", "test")
        env.setdefault(f"GIT_{role}_EMAIL", "test@localhost")
    return env | extra


def runs_while_running(project: Path, experiment: str) -> list:
    """`experiment`'s runs in the project's MLflow store ([] before it exists): for a
    test that polls the store while a tool is starting. Read under the lock the tools create
    the store under (tracking.configure): a read that creates it beside them races their
    schema creation, and one of the two fails on a table the other made."""
    import mlflow

    import tracking

    uri = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with tracking.store_lock(uri):
        return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def training(project: Path, tag: str) -> bool:
    """Whether a run of the project's tuning experiment tagged `tag` (optuna.trial: a trial,
    optuna.confirms: a confirmation) has finished an epoch, so it is inside its training."""
    return any(run.data.tags.get(tag) and "loss" in run.data.metrics
               for run in runs_while_running(project, "cifar10-alexnet-tune"))


def sh(*args: str, cwd: Path, check: bool = True, **extra_env: str
       ) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=tool_env(**extra_env), capture_output=True,
                            text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


BLOCK_TENSORFLOW = textwrap.dedent("""
    import sys

    class NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ImportError(f"{name} is blocked: this process must not import it")
            return None

    sys.meta_path.insert(0, NoTensorFlow())
""")


@pytest.fixture
def no_tensorflow(tmp_path) -> dict[str, str]:
    """Environment whose Python processes fail on any import of TensorFlow (the jax backend,
    and a tune.py that trains nothing, never import it)."""
    folder = tmp_path / "block"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
    return {"PYTHONPATH": str(folder)}


@pytest.fixture
def project(tmp_path, tiny_archive) -> Path:
    """A git + DVC copy of the project in tmp_path whose params read the tiny archive."""
    return make_project(tmp_path / "project", tiny_archive)


def make_project(root: Path, tiny_archive: tuple[Path, str]) -> Path:
    """A git + DVC copy of the project at `root` whose params read the tiny archive."""
    archive, md5 = tiny_archive
    for name in PROJECT_FILES:
        source, target = ROOT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    (root / "mlruns").mkdir()
    update_yaml(root / "params.yaml", TINY | {"data.source": archive.as_uri(), "data.md5": md5})
    sh("git", "init", "-q", "-b", "main", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "init", cwd=root)
    return root


FLAGS = {"avx2": "fpu sse2 avx avx2 fma", "avx512_bf16": "fpu avx2 avx512f avx512_bf16",
         "amx": "fpu avx2 avx512f amx_bf16 amx_tile", "arm": None}


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """Point devices at a /proc/cpuinfo of the given flags (None: an Arm `Features` line)."""
    def make(kind: str):
        flags = FLAGS[kind]
        line = f"flags\t\t: {flags}" if flags else "Features\t: fp asimd bf16 i8mm"
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: fake\n{line}\n\n"
                        f"processor\t: 1\n{line}\n")
        import devices

        monkeypatch.setattr(devices, "CPUINFO", path)
    return make


@pytest.fixture
def restore_policy():
    """Keras' global dtype policy as it was before the test."""
    import keras

    previous = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(previous)
