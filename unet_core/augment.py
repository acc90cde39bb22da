"""Data augmentation of the U-Net paper: elastic deformation, flips/rotations, gray values.

Axis order: images ``(C, *spatial)``; label-like maps (targets, weights) ``(*spatial)``.
All randomness comes from the ``numpy.random.Generator`` passed in, so every sample is
reproducible from a seed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy import ndimage

__all__ = ["elastic_field", "deform", "random_flip_rotate", "gray_value", "augment_sample"]


@functools.lru_cache(maxsize=32)
def _cubic_upsampling_matrix(size: int, grid: int) -> np.ndarray:
    """``(size, grid)`` matrix M with ``M @ v == ndimage.zoom(v, size / grid, order=3)``.

    Cubic spline zoom is linear in its input and separable over axes, so the dense field is
    a product of one small matrix per axis: microseconds instead of a spline zoom per call.
    """
    return np.stack([
        ndimage.zoom(np.eye(grid)[j], size / grid, order=3, mode="nearest", grid_mode=True) for j in range(grid)
    ], axis=1).astype(np.float32)


def elastic_field(shape: tuple[int, ...], *, sigma: float, grid: int, rng: np.random.Generator) -> np.ndarray:
    """Dense displacement field ``(ndim, *shape)`` from random vectors on a coarse grid.

    As in the paper (Section 3.1): displacements drawn from N(0, sigma^2) pixels on a
    ``grid``^ndim grid (3x3 in the paper, sigma = 10 px), interpolated bicubically to every
    pixel (cubic spline interpolation, which passes through the grid values).
    """
    ndim = len(shape)
    coarse = rng.normal(0.0, sigma, (ndim,) + (grid,) * ndim).astype(np.float32)
    if sigma == 0:
        return np.zeros((ndim, *shape), np.float32)
    field = coarse
    for axis, size in enumerate(shape):
        # A few broadcast multiply-adds instead of a BLAS call: BLAS threads spin after each
        # call and steal cores from the training step on small machines (bench/train.py).
        matrix = _cubic_upsampling_matrix(size, grid)
        shape_out = list(field.shape)
        shape_out[axis + 1] = size
        upsampled = np.zeros(shape_out, np.float32)
        column_shape = [1] * field.ndim
        column_shape[axis + 1] = size
        for j in range(grid):
            upsampled += matrix[:, j].reshape(column_shape) * np.take(field, [j], axis=axis + 1)
        field = upsampled
    return np.ascontiguousarray(field, dtype=np.float32)


def _coordinates(shape, field, angle, crop=None):
    coords = np.indices(shape, dtype=np.float32)
    if angle:
        centre = [(s - 1) / 2 for s in shape[-2:]]
        y, x = coords[-2] - centre[0], coords[-1] - centre[1]
        cos, sin = np.cos(angle), np.sin(angle)
        coords[-2], coords[-1] = cos * y - sin * x + centre[0], sin * y + cos * x + centre[1]
    coords += field
    if crop is not None:
        coords = coords[(slice(None),) + tuple(crop)]
    return coords


def deform(array: np.ndarray, field: np.ndarray, *, order: int, angle: float = 0.0, crop=None) -> np.ndarray:
    """Resample ``array`` (``(*spatial)``) at ``R(x - c) + c + field(x)``, mirrored at the edges.

    ``R`` rotates by ``angle`` (radians) in the plane of the last two axes about the centre c.
    With ``crop`` (a tuple of slices) only that part of the output is computed.
    """
    return _resample(array, _coordinates(array.shape, field, angle, crop), order)


def _resample(array: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """``array`` at ``coords`` (``(ndim, *out)``), mirrored at the edges; order 0, 1 or 3."""
    if order == 3 and array.ndim == 2:
        return _bicubic(array, coords)
    return ndimage.map_coordinates(array, coords, order=order, mode="mirror", prefilter=order > 1)


def _bicubic(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Bicubic convolution (Keys, a = -0.75) of a 2D image, mirrored about the edge pixels.

    torch's ``grid_sample`` instead of ``ndimage.map_coordinates(order=3)``: 1.6 ms against
    17 ms for a 348^2 tile here (the spline prefilter plus 16 taps per pixel in scipy), which
    is what keeps the full augmentation below 10 % of a CPU training step (bench/train.py).
    Both kernels interpolate (samples at integer positions are returned unchanged); there is
    no tricubic ``grid_sample``, so 3D keeps the cubic spline.
    """
    height, width = image.shape
    grid = np.stack([coords[1] * (2.0 / max(width - 1, 1)) - 1.0,
                     coords[0] * (2.0 / max(height - 1, 1)) - 1.0], axis=-1).astype(np.float32)
    out = torch.nn.functional.grid_sample(
        torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None], torch.from_numpy(grid)[None],
        mode="bicubic", padding_mode="reflection", align_corners=True)
    return out[0, 0].numpy()


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
                   rotation: bool = True, gray_strength: float = 0.1,
                   crop: tuple[slice, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augment one training tile: image cubic, target nearest (ids never mixed), weight linear.

    The image is resampled by bicubic convolution in 2D and by a cubic spline in 3D.

    Elastic deformation and a random rotation (uniform angle, last two axes) are combined into
    one resampling; then a random flip/90-degree rotation and a gray-value change. A shift is
    the random tile position chosen by the sampler. With ``crop`` (centred slices, e.g. the
    network's output window) the target and weight are returned for that window only, which
    is all the loss needs, and only that window is resampled.
    """
    spatial = target.shape
    crop = tuple(crop) if crop is not None else tuple(slice(0, s) for s in spatial)
    angle = float(rng.uniform(0, 2 * np.pi)) if rotation else 0.0
    if elastic_sigma > 0 or angle:
        field = elastic_field(spatial, sigma=elastic_sigma, grid=elastic_grid, rng=rng)
        coords = _coordinates(spatial, field, angle)  # once for the image, a window of it for the rest
        image = np.stack([_resample(channel, coords, 3) for channel in image])
        window = coords[(slice(None),) + crop]
        target = _resample(target, window, 0)
        weight = _resample(weight, window, 1)
    else:
        target, weight = target[crop], weight[crop]
    if flip_rotate:
        image, target, weight = random_flip_rotate([image, target, weight], len(spatial), rng)
    image = gray_value(image, strength=gray_strength, rng=rng)
    return image.astype(np.float32, copy=False), target, weight.astype(np.float32, copy=False)
