"""Training-time augmentation of uint8 image batches, in numpy on the host.

Every transform draws from the generator it is given, which the input pipeline keys on
(seed, epoch, batch): a resumed run augments exactly like an uninterrupted one, on every backend
(in-model random layers cost minutes per epoch on JAX). The saved model holds no augmentation, so
inference is unchanged by any of these settings.

The random draws are made for the whole batch at once; the pixels are then moved image by image
with plain slices (a 32x32 window, a square), which costs a fraction of the fancy-index gathers
and full-batch masks it replaces, and everything stays uint8 except the mixup blend (float32).

- flip: horizontal flip of half the images
- crop: the standard CIFAR pad-and-crop: zero-pad `crop` pixels per side, cut a random 32x32 window
- shift: random translation up to `shift` of the side, filled by reflection
- cutout: a random `cutout`-pixel square of each image set to zero (may overlap the border)
- mixup / cutmix: blend each image (and its one-hot label) with another image of the batch, with a
  weight drawn from Beta(alpha, alpha); with both on, each batch uses one of them at random
"""

from __future__ import annotations

import numpy as np

from params import Augment


def _flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flipped = rng.random(len(images)) < 0.5
    out = images.copy()
    out[flipped] = images[flipped, :, ::-1]
    return out


def _translate(images: np.ndarray, pixels: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by up to `pixels` in x and y; the uncovered border padded with `mode`."""
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pixels, pixels), (pixels, pixels), (0, 0)), mode=mode)
    top = rng.integers(0, 2 * pixels + 1, n)
    left = rng.integers(0, 2 * pixels + 1, n)
    out = np.empty_like(images)
    for i, (y, x) in enumerate(zip(top.tolist(), left.tolist(), strict=True)):
        out[i] = padded[i, y:y + height, x:x + width]
    return out


def _boxes(n: int, size: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 4) boxes (y0, y1, x0, x1) of squares of `side` pixels centred uniformly in the image,
    clipped to it."""
    centre_y, centre_x = rng.integers(0, size, (2, n))
    low_y, low_x = centre_y - side // 2, centre_x - side // 2
    return np.clip(np.stack([low_y, low_y + side, low_x, low_x + side], axis=1), 0, size)


def _cutout(images: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    out = images.copy()
    for i, (y0, y1, x0, x1) in enumerate(_boxes(len(images), images.shape[1], side, rng).tolist()):
        out[i, y0:y1, x0:x1] = 0
    return out


def _mix(images, labels, alpha: float, cut: bool, rng: np.random.Generator):
    n, size = len(images), images.shape[1]
    partner = rng.permutation(n)
    weight = np.float32(rng.beta(alpha, alpha))
    if cut:
        side = int(round(size * np.sqrt(1.0 - float(weight))))
        out = images.copy()
        kept = np.empty((n, 1), np.float32)
        for i, (y0, y1, x0, x1) in enumerate(_boxes(n, size, side, rng).tolist()):
            out[i, y0:y1, x0:x1] = images[partner[i], y0:y1, x0:x1]
            kept[i] = 1.0 - (y1 - y0) * (x1 - x0) / (size * size)
        return out, kept * labels + (1.0 - kept) * labels[partner]
    blended = weight * images.astype(np.float32) + (1 - weight) * images[partner]
    mixed = weight * labels + (1 - weight) * labels[partner]
    return np.rint(blended).astype(np.uint8), mixed


def augment(images: np.ndarray, labels: np.ndarray, params: Augment, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Augmented copies of a batch: uint8 images (n, 32, 32, 3), float32 one-hot labels (n, 10)."""
    if params.flip:
        images = _flip(images, rng)
    if params.crop:
        images = _translate(images, params.crop, "constant", rng)
    if params.shift:
        pixels = int(round(params.shift * images.shape[2]))
        if pixels:
            images = _translate(images, pixels, "reflect", rng)
    if params.cutout:
        images = _cutout(images, params.cutout, rng)
    mixers = [cut for cut, alpha in ((False, params.mixup), (True, params.cutmix)) if alpha > 0]
    if mixers:
        cut = mixers[rng.integers(len(mixers))]
        images, labels = _mix(images, labels, params.cutmix if cut else params.mixup, cut, rng)
    return images, labels
