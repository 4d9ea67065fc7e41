"""Scoring a trained model in inference mode: probabilities, loss and accuracy, the honest gap.

The library the evaluate stage and the tuning trials share (one definition of the honest gap for
both): the accuracy on the images the model trained on, in inference mode (no dropout, no
augmentation), minus its validation accuracy.
"""

from __future__ import annotations

import keras
import numpy as np

import dataset
from cifar import Split

EPSILON = 1e-7  # Keras' clip of probabilities in cross-entropy


def predict(model: keras.Model, split, batch_size: int) -> np.ndarray:
    """Class probabilities of every image of `split`, in order, in inference mode."""
    return model.predict(dataset.eval_dataset(split, batch_size), verbose=0)


def scores(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(plain categorical cross-entropy, accuracy) of predicted probabilities."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    picked = probabilities[np.arange(len(labels)), labels] / probabilities.sum(axis=1)
    loss = -np.log(np.clip(picked, EPSILON, 1 - EPSILON)).mean()
    return float(loss), float(np.mean(np.argmax(probabilities, axis=1) == labels))


def measure(model: keras.Model, split, batch_size: int) -> tuple[float, float]:
    """(plain cross-entropy, accuracy) of the model on `split` in inference mode."""
    return scores(predict(model, split, batch_size), split.labels)


def gap(train_accuracy: float, val_accuracy: float) -> float:
    """The honest gap: accuracy on the training images in inference mode (no dropout, no
    augmentation) minus validation accuracy. The one definition evaluate and trials use."""
    return train_accuracy - val_accuracy


def honest_gap(model: keras.Model, train_split, val_accuracy: float, batch_size: int) -> float:
    return gap(measure(model, train_split, batch_size)[1], val_accuracy)


def final_scores(result, train_split: Split, batch_size: int) -> tuple[float, float]:
    """(validation accuracy, honest gap) of a trained model at the end of its run.

    The saved model is the last epoch's, whose validation the history holds; the gap is
    evaluate's: its accuracy in inference mode on all the images it trained on, minus that.
    """
    val_accuracy = result.history[-1]["val_accuracy"]
    return val_accuracy, honest_gap(result.model, train_split, val_accuracy, batch_size)
