"""The Keras backend of a run, `train.backend` in params.yaml, chosen before Keras is imported.

Every entry point that uses Keras imports this module before anything that imports Keras; it
loads Keras on the backend the params name:

    import backend  # noqa: F401  (first: sets KERAS_BACKEND from params.yaml, loads Keras)
    # isort: split

params.yaml wins: a `KERAS_BACKEND` in the environment that disagrees is overridden, with a line
on stderr saying so. When a stage script runs (`python src/<stage>.py`), this module first
validates the whole of `./params.yaml` (no TensorFlow yet: a bad value fails in about a second,
with the stage's one-line error); `check()` later confirms that Keras runs the backend the params
name.

TensorFlow's native start-up lines that nobody can act on (the oneDNN notice, CUDA probing on a
machine without a GPU: "Could not find cuda drivers", "failed call to cuInit") are dropped while it
loads and looks for devices; every other line it prints then is passed on.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.metadata
import os
import sys
import tempfile

from params import ParamsError, read_yaml

BACKENDS = ("tensorflow", "jax")
DEFAULT = "tensorflow"
START_UP_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations",
                  "Could not find cuda drivers", "failed call to cuInit")


def requested(path: str = "params.yaml") -> str | None:
    """The backend that `path` names (the default when it names none); None without the file."""
    if not os.path.isfile(path):
        return None
    try:
        value = (read_yaml(path) or {}).get("train", {}).get("backend", DEFAULT)
    except (ParamsError, AttributeError):
        return DEFAULT  # the stage's own params validation reports the problem
    return value if value in BACKENDS else DEFAULT


def select(path: str = "params.yaml") -> str | None:
    """Set KERAS_BACKEND from `path`; leave it as it is where there is no such file."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    name = requested(path)
    if name is None:
        return None
    environment = os.environ.get("KERAS_BACKEND")
    if environment and environment != name:
        print(f"KERAS_BACKEND={environment} ignored: {path} sets train.backend: {name}",
              file=sys.stderr)
    os.environ["KERAS_BACKEND"] = name
    if name == "jax" and _deterministic(path):
        deterministic_xla()
    return name


XLA_DETERMINISM = "--xla_gpu_deterministic_ops=true"


def _deterministic(path: str) -> bool:
    try:
        return (read_yaml(path) or {}).get("train", {}).get("deterministic") is True
    except (ParamsError, AttributeError):
        return False


def deterministic_xla() -> None:
    """`train.deterministic` on JAX: XLA's deterministic GPU kernels (no atomics in reductions and
    scatters), which must be in XLA_FLAGS before JAX starts. JAX on a CPU is deterministic
    without it: the same program on the same inputs gives the same bits."""
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_DETERMINISM not in flags.split():
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_DETERMINISM}".strip()


@contextlib.contextmanager
def _without_start_up_noise():
    """Capture what native code writes to file descriptor 2; pass on all but START_UP_NOISE."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not any(noise in line for noise in START_UP_NOISE):
                    sys.stderr.write(line)


# What TensorFlow and Keras import, where installed, for features the pipeline never uses:
# TensorFlow Lite's conversion of JAX functions (`jax`), Keras' scikit-learn wrappers (`sklearn`,
# which MLflow installs). Each import is inside a `try: ... except ImportError`; hidden while
# they load, these packages cost a stage nothing (2.6 s of its start-up on a 2-core CPU:
# docs/performance.md, "Start-up").
UNUSED_ON_TENSORFLOW = ("jax", "jaxlib", "sklearn")
UNUSED_ON_JAX = ("sklearn",)


def load_keras_on_tensorflow() -> None:
    with _without_start_up_noise(), hidden(UNUSED_ON_TENSORFLOW, "unused here"):
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")


def load_keras_on_jax() -> None:
    hide_tensorflow()
    with hidden(UNUSED_ON_JAX, "unused here"):
        import keras  # noqa: F401


def check(name: str) -> None:
    """Refuse to run when Keras was loaded with another backend than the params name."""
    import keras

    if keras.backend.backend() != name:
        raise ParamsError(f"train.backend is {name}, but Keras runs on "
                          f"{keras.backend.backend()}: run the stage from the repository root")


def version(name: str) -> str:
    """`jax 0.10.2`: the backend package and its version, for run tags."""
    return f"{name} {importlib.metadata.version(name)}"


class _Hidden(importlib.abc.MetaPathFinder):
    """Makes the packages `names` (and their modules) look not installed."""

    def __init__(self, names: tuple[str, ...], why: str):
        self.names, self.why = names, why

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} ({self.why})", name=name)
        return None


@contextlib.contextmanager
def hidden(names: tuple[str, ...], why: str):
    """While inside: the packages `names` look not installed, unless already imported."""
    finder = _Hidden(tuple(n for n in names if n not in sys.modules), why)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def hide_tensorflow() -> None:
    """On JAX nothing needs TensorFlow, but Keras imports it where it is installed (to seed it,
    to serialize), seconds and hundreds of MB per run: make it look not installed, as on a GPU
    machine with JAX alone."""
    sys.meta_path.insert(0, _Hidden(("tensorflow",), "train.backend: jax"))


def validate_first(path: str = "params.yaml") -> None:
    """When a stage script runs, validate its params.yaml before Keras and the backend load
    (seconds): a bad value fails in a second, with the stage's one-line error and status 1."""
    from pathlib import Path

    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or script.parent != Path(__file__).resolve().parent \
            or not os.path.isfile(path):
        return
    from params import load_params

    try:
        load_params(path)
    except ParamsError as error:
        print(f"{script.stem}: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(1)


if "keras" not in sys.modules:
    validate_first()
    chosen = select()
    if chosen == "tensorflow":
        load_keras_on_tensorflow()
    elif chosen == "jax":
        load_keras_on_jax()
