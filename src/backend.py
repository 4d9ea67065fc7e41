"""The Keras backend of a run, `train.backend` in params.yaml, chosen before Keras is imported.

Every entry point that uses Keras imports this module before anything that imports Keras:

    import backend  # noqa: F401  (first: sets KERAS_BACKEND from params.yaml)
    # isort: split

params.yaml wins: a `KERAS_BACKEND` in the environment that disagrees is overridden, with a line
on stderr saying so. This module only peeks at that one key of `./params.yaml`; the stage validates
the whole file when it loads its params, and `check()` then confirms that Keras runs the backend
the params name. TensorFlow's C++ start-up logging (CUDA probing on a CPU-only machine) is quieted
unless `TF_CPP_MIN_LOG_LEVEL` is set.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

from params import ParamsError, read_yaml

BACKENDS = ("tensorflow", "jax")
DEFAULT = "tensorflow"


def requested(path: str = "params.yaml") -> str:
    """The backend that `path` names; the default when it names none or cannot be read."""
    try:
        value = (read_yaml(path) or {}).get("train", {}).get("backend", DEFAULT)
    except (ParamsError, AttributeError):
        return DEFAULT  # the stage's own params validation reports the problem
    return value if value in BACKENDS else DEFAULT


def select(path: str = "params.yaml") -> str:
    name = requested(path)
    environment = os.environ.get("KERAS_BACKEND")
    if environment and environment != name:
        print(f"KERAS_BACKEND={environment} ignored: {path} sets train.backend: {name}",
              file=sys.stderr)
    os.environ["KERAS_BACKEND"] = name
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return name


def check(name: str) -> None:
    """Refuse to run when Keras was loaded with another backend than the params name."""
    import keras

    if keras.backend.backend() != name:
        raise ParamsError(f"train.backend is {name}, but Keras runs on "
                          f"{keras.backend.backend()}: run the stage from the repository root")


def version(name: str) -> str:
    """`jax 0.10.2`: the backend package and its version, for run tags."""
    return f"{name} {importlib.metadata.version(name)}"


if "keras" not in sys.modules:
    select()
