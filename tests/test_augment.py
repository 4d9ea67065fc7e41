"""Host-side augmentation and the numpy input pipeline: resumable, training-only, per param."""

from __future__ import annotations

import numpy as np
import pytest

import dataset
from augment import augment
from cifar import Split
from params import Augment

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
LABELS = RNG.integers(0, 10, 64).astype(np.uint8)
SPLIT = Split(IMAGES, LABELS)
OFF = dataset.NO_AUGMENTATION
EACH = {"flip": True, "crop": 4, "shift": 0.125, "cutout": 8, "mixup": 0.4, "cutmix": 1.0}


def batches(params: Augment, first_epoch: int = 0) -> dataset.TrainBatches:
    return dataset.TrainBatches(SPLIT, 16, seed=7, first_epoch=first_epoch, epochs=3,
                                params=params)


def test_every_batch_is_a_function_of_seed_epoch_and_index():
    params = OFF.model_copy(update=EACH)
    full, resumed = batches(params), batches(params, first_epoch=1)
    assert len(full) == 12 and len(resumed) == 8
    for index in range(8):  # a run resumed after epoch 1 sees the same batches
        for a, b in zip(full[index + 4], resumed[index], strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(full[0][0], full[4][0])  # each epoch its own order


def test_epoch_order_is_a_permutation_keyed_on_seed_and_epoch():
    order = dataset.epoch_order(64, 7, 2)
    assert sorted(order) == list(range(64))
    np.testing.assert_array_equal(order, dataset.epoch_order(64, 7, 2))
    assert not np.array_equal(order, dataset.epoch_order(64, 8, 2))


@pytest.mark.parametrize("key", sorted(EACH))
def test_each_param_changes_training_batches_only(key):
    params = OFF.model_copy(update={key: EACH[key]})
    plain, augmented = batches(OFF)[0], batches(params)[0]
    assert augmented[0].dtype == np.uint8 and augmented[0].shape == plain[0].shape
    assert not np.array_equal(plain[0], augmented[0])
    np.testing.assert_allclose(augmented[1].sum(axis=1), 1, rtol=1e-6)
    if key not in ("mixup", "cutmix"):
        np.testing.assert_array_equal(plain[1], augmented[1])  # labels untouched
    # evaluation batches never see augmentation
    evaluation = dataset.EvalBatches(SPLIT, 16)
    np.testing.assert_array_equal(evaluation[0][0], IMAGES[:16])


def test_flip_mirrors_or_keeps_each_image():
    flipped, _ = augment(IMAGES, np.eye(10)[LABELS], OFF.model_copy(update={"flip": True}),
                         np.random.default_rng(1))
    mirrored = [np.array_equal(f, i[:, ::-1]) for f, i in zip(flipped, IMAGES, strict=True)]
    kept = [np.array_equal(f, i) for f, i in zip(flipped, IMAGES, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 0 < sum(mirrored) < len(IMAGES)


def test_crop_pads_with_zeros_by_at_most_its_pixels():
    white = np.full((256, 32, 32, 3), 255, np.uint8)
    cropped, _ = augment(white, np.eye(10)[np.zeros(256, int)],
                         OFF.model_copy(update={"crop": 4}), np.random.default_rng(2))
    assert (cropped[:, 4:28, 4:28] == 255).all()  # the centre always stays image
    assert (cropped == 0).any() and (cropped == 0).mean() < 0.3


def test_cutout_zeroes_a_square():
    white = np.full((8, 32, 32, 3), 255, np.uint8)
    cut, _ = augment(white, np.eye(10)[np.zeros(8, int)], OFF.model_copy(update={"cutout": 8}),
                     np.random.default_rng(3))
    zeroed = (cut == 0).all(axis=-1).sum(axis=(1, 2))
    assert ((zeroed > 0) & (zeroed <= 64)).all()


def test_the_model_holds_no_augmentation():
    import keras

    from model import build_model
    from params import load_params

    model = build_model(load_params().model, seed=0)
    assert not [layer for layer in model.layers
                if isinstance(layer, keras.layers.RandomFlip | keras.layers.RandomTranslation)]
