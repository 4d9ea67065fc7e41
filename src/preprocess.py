"""Stage `preprocess`: split the archive into train / validation / test arrays of uint8.

    python src/preprocess.py     # reads `data.val_size`, `data.train_limit` and the paths

As in the seed (Keras `validation_split=0.2`): the last `data.val_size` training images validate,
the ones before them train (the first `data.train_limit` of those when set), and the test batch
tests.
Writes `<processed>/{train,val,test}.npz` (images (n, 32, 32, 3) uint8, labels (n,) uint8; loaded
with `allow_pickle=False`) and a JSON summary: counts per split and class, pixel mean and std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import atomic
import cifar
import cli
from params import load_params

SPLITS = ("train", "val", "test")


def split(train: cifar.Split, test: cifar.Split, val_size: int,
          train_limit: int | None = None) -> dict[str, cifar.Split]:
    if val_size >= len(train):
        raise cifar.ArchiveError(
            f"data.val_size {val_size} leaves no training images ({len(train)} in the archive)")
    cut = len(train) - val_size
    keep = cut if train_limit is None else min(train_limit, cut)
    return {
        "train": cifar.Split(train.images[:keep], train.labels[:keep]),
        "val": cifar.Split(train.images[cut:], train.labels[cut:]),
        "test": test,
    }


def summarize(splits: dict[str, cifar.Split]) -> dict:
    pixels = splits["train"].images.reshape(-1, 3).astype(np.float64) / 255.0
    return {
        "counts": {name: len(s) for name, s in splits.items()},
        "per_class": {
            name: {cls: int(n) for cls, n in zip(
                cifar.CLASSES, np.bincount(s.labels, minlength=len(cifar.CLASSES)), strict=True)}
            for name, s in splits.items()},
        "train_pixel_mean": [round(float(v), 6) for v in pixels.mean(axis=0)],
        "train_pixel_std": [round(float(v), 6) for v in pixels.std(axis=0)],
    }


def preprocess(archive: str | Path, processed: str | Path, summary_path: str | Path,
               val_size: int, train_limit: int | None = None) -> dict:
    train, test = cifar.read_archive(archive)
    splits = split(train, test, val_size, train_limit)
    with atomic.atomic_dir(processed) as tmp:
        for name, s in splits.items():
            np.savez(tmp / f"{name}.npz", images=s.images, labels=s.labels)
    summary = summarize(splits)
    atomic.write_json(summary_path, summary)
    return summary


def main() -> None:
    params = load_params()
    summary = preprocess(params.paths.archive, params.paths.processed, params.paths.data_summary,
                         params.data.val_size, params.data.train_limit)
    print(f"preprocess: {summary['counts']}")


if __name__ == "__main__":
    cli.run("preprocess", main)
