"""Data augmentation of the U-Net paper: elastic deformation, flips/rotations, gray values.

Axis order: images ``(C, *spatial)``; label-like maps (targets, weights) ``(*spatial)``.
All randomness comes from the ``numpy.random.Generator`` passed in, so every sample is
reproducible from a seed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["elastic_field", "deform", "random_flip_rotate", "gray_value", "augment_sample"]


def elastic_field(shape: tuple[int, ...], *, sigma: float, grid: int, rng: np.random.Generator) -> np.ndarray:
    """Dense displacement field ``(ndim, *shape)`` from random vectors on a coarse grid.

    As in the paper (Section 3.1): displacements drawn from N(0, sigma^2) pixels on a
    ``grid``^ndim grid (3x3 in the paper, sigma = 10 px), interpolated bicubically to every
    pixel (cubic spline zoom, which passes through the grid values).
    """
    ndim = len(shape)
    coarse = rng.normal(0.0, sigma, (ndim,) + (grid,) * ndim)
    if sigma == 0:
        return np.zeros((ndim, *shape), np.float32)
    factors = [s / grid for s in shape]
    field = np.stack([ndimage.zoom(c, factors, order=3, mode="nearest", grid_mode=True) for c in coarse])
    return field.astype(np.float32)


def deform(array: np.ndarray, field: np.ndarray, *, order: int) -> np.ndarray:
    """Resample ``array`` (``(*spatial)``) at ``x + field(x)``, mirrored at the edges."""
    coords = np.indices(array.shape, dtype=np.float32) + field
    return ndimage.map_coordinates(array, coords, order=order, mode="mirror", prefilter=order > 1)


def random_flip_rotate(arrays: list[np.ndarray], spatial_ndim: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Apply one random flip/rotation (of the square last two axes) to all ``arrays`` alike."""
    flips = [axis for axis in range(spatial_ndim) if rng.random() < 0.5]
    k = int(rng.integers(4))
    out = []
    for array in arrays:
        offset = array.ndim - spatial_ndim
        if flips:
            array = np.flip(array, axis=[offset + a for a in flips])
        if k and array.shape[-1] == array.shape[-2]:
            array = np.rot90(array, k, axes=(array.ndim - 2, array.ndim - 1))
        out.append(np.ascontiguousarray(array))
    return out


def gray_value(image: np.ndarray, *, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random contrast (x (1 +- strength)) and brightness (+- strength) on a normalised image."""
    if strength == 0:
        return image
    scale = 1.0 + rng.uniform(-strength, strength)
    shift = rng.uniform(-strength, strength)
    return (image * scale + shift).astype(np.float32)


def augment_sample(image: np.ndarray, target: np.ndarray, weight: np.ndarray, *, rng: np.random.Generator,
                   elastic_sigma: float = 10.0, elastic_grid: int = 3, flip_rotate: bool = True,
                   gray_strength: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augment one training tile: image cubic, target nearest (ids never mixed), weight linear."""
    spatial = target.shape
    if elastic_sigma > 0:
        field = elastic_field(spatial, sigma=elastic_sigma, grid=elastic_grid, rng=rng)
        image = np.stack([deform(channel, field, order=3) for channel in image])
        target = deform(target, field, order=0)
        weight = deform(weight, field, order=1)
    if flip_rotate:
        image, target, weight = random_flip_rotate([image, target, weight], len(spatial), rng)
    image = gray_value(image, strength=gray_strength, rng=rng)
    return image.astype(np.float32, copy=False), target, weight.astype(np.float32, copy=False)
