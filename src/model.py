"""The seed's AlexNet-style CNN for 32x32 CIFAR-10 images, built from the `model` params.

Four conv blocks (Conv2D 3x3 'same' + ReLU, MaxPool 2, BatchNorm), Flatten, dense blocks (Dense +
ReLU, Dropout, BatchNorm) and a 10-way softmax. The model takes raw uint8 images and scales them
itself, so the saved model needs no preprocessing code to predict. Augmentation happens in the
input pipeline (src/augment.py), never in the model.
"""

from __future__ import annotations

import keras
from keras import layers

from params import Model

NUM_CLASSES = 10


def build_model(params: Model, seed: int, input_shape: tuple[int, int, int] = (32, 32, 3)
                ) -> keras.Model:
    regularizer = keras.regularizers.L2(params.l2) if params.l2 > 0 else None
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    for i, filters in enumerate(params.filters, start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu",
                          kernel_regularizer=regularizer, name=f"conv{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
        x = layers.BatchNormalization(name=f"conv{i}_bn")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(params.dense_units, start=1):
        x = layers.Dense(units, activation="relu", kernel_regularizer=regularizer,
                         name=f"dense{i}")(x)
        x = layers.Dropout(params.dropout, seed=seed + 1 + i, name=f"dense{i}_dropout")(x)
        x = layers.BatchNormalization(name=f"dense{i}_bn")(x)
    # float32 softmax keeps probabilities and the loss stable under mixed precision.
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="alexnet_cifar10")
