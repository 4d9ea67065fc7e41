"""Predict the class of image files with the pipeline's model.

    python src/predict.py cat.png dog.jpg                 # the champion (or models/model.keras)
    python src/predict.py --top 3 --json photos/*.jpg
    python src/predict.py --model models:/cifar10-alexnet/2 cat.png   # a version, an alias, a path

Each file (PNG, JPEG or anything else Pillow reads, any size) is converted to RGB and resized to
32x32 with Pillow, as CIFAR-10's images are, and the model answers the probability of each class.
Prints one line per file: its top class and probability (`--top K`: the K best). A file that is
not an image gets a one-line error naming it on stderr, the others are still predicted, and the
exit status is then 1.

Default model: `models:/<mlflow.experiment>@champion` when the registry has a champion
(registry.py), otherwise `models/model.keras` (the train stage's output).
"""

from __future__ import annotations

import backend  # noqa: F401  (first: sets KERAS_BACKEND from params.yaml)

# isort: split

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

import cli
import registry
import tracking
from cifar import CLASSES, IMAGE_SHAPE
from params import load_params


def read_image(path: str) -> np.ndarray:
    """The file as a uint8 (32, 32, 3) RGB image; a UserError naming it when it is not one."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize(IMAGE_SHAPE[:2][::-1], Image.Resampling.BICUBIC)
            return np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise cli.UserError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        reason = "not an image Pillow can read" if isinstance(error, UnidentifiedImageError) \
            else str(error)
        raise cli.UserError(f"{path}: {reason}") from None


def default_model(experiment: str, model_path: str) -> str:
    if registry.champion(experiment) is not None:
        return f"models:/{experiment}@{registry.ALIAS}"
    if Path(model_path).is_file():
        return model_path
    raise cli.UserError(f"no model: the registry has no {experiment}@{registry.ALIAS} and "
                        f"{model_path} is missing; run `dvc repro` or pass --model")


def load_predictor(uri: str):
    """A function from uint8 images (n, 32, 32, 3) to class probabilities (n, 10)."""
    if "://" not in uri and not uri.startswith("models:/"):
        if not Path(uri).is_file():
            raise cli.UserError(f"--model {uri}: no such file")
        import keras

        model = keras.models.load_model(uri, safe_mode=True)
        return lambda images: np.asarray(model.predict(images, verbose=0))
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as error:
        raise cli.UserError(f"--model {uri}: {str(error).splitlines()[0]}") from None
    import keras

    # the Keras flavor predicts with Keras' progress bar, which would mix into stdout (--json)
    keras.utils.disable_interactive_logging()
    return lambda images: np.asarray(model.predict(images))


def predict(args: argparse.Namespace) -> int:
    params = load_params()
    tracking.use_store()
    uri = args.model or default_model(params.mlflow.experiment, params.paths.model)
    images, names, failed = [], [], 0
    for path in args.images:
        try:
            images.append(read_image(path))
            names.append(path)
        except cli.UserError as error:
            print(f"predict: error: {error}", file=sys.stderr)
            failed += 1
    results = []
    if images:
        probabilities = load_predictor(uri)(np.stack(images))
        for name, row in zip(names, probabilities, strict=True):
            best = np.argsort(row)[::-1][:args.top]
            results.append({"file": name, "top": [
                {"class": CLASSES[i], "probability": round(float(row[i]), 4)} for i in best]})
    if args.json:
        print(json.dumps({"model": uri, "predictions": results}, indent=2))
    else:
        print(f"predict: model {uri}")
        for result in results:
            top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
            print(f"{result['file']}: {top}")
    return failed


def positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= len(CLASSES):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to {len(CLASSES)}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., "
                        "or a .keras file (default: the champion, else models/model.keras)")
    parser.add_argument("--top", type=positive, default=1, help="classes per image (default 1)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser.parse_args(argv)


def main() -> None:
    if predict(parse_args()):
        sys.exit(1)


if __name__ == "__main__":
    cli.run("predict", main)
