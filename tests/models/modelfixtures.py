"""Images the model tests train on."""

import numpy as np


def digits_like(n=64, seed=0):
    """Asymmetric shapes: an L in a random corner, so rotation is learnable."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, 32, 32, 3), np.uint8)
    for i in range(n):
        r, c = rng.integers(2, 10, 2)
        img[i, r : r + 18, c : c + 4] = 255
        img[i, r + 14 : r + 18, c : c + 14] = 255
    return img
