"""PNG figures of a run: learning curves and the confusion matrix (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def learning_curves(history: pd.DataFrame, path: str | Path) -> None:
    """Accuracy and loss per epoch, training against validation (the seed's two plots)."""
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((acc, "accuracy", "Accuracy"), (loss, "loss", "Loss")):
        ax.plot(history["epoch"], history[key], label="train")
        ax.plot(history["epoch"], history[f"val_{key}"], label="validation")
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(matrix: np.ndarray, classes: tuple[str, ...], path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="actual", title="Test confusion matrix")
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, int(count), ha="center", va="center", fontsize=7,
                color="white" if count > matrix.max() / 2 else "black")
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
