"""Pixel-wise loss weight maps of the U-Net paper (eq. 2) and the cells of each kind of ground truth.

Axis order: ``(Y, X)`` for 2D and ``(Z, Y, X)`` for 3D label images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .defaults import choices, default

__all__ = ["weight_map", "instances_from_binary", "instances_from_dense", "separate_touching", "neighbour_ids",
           "true_boundaries", "cells_of", "LABEL_KINDS", "LABEL_KIND_TARGETS"]

# What a ground-truth label image can hold (config ``weight_map.labels``, sample-sheet column
# ``labels_kind``): instance ids with background 0 between the cells, a binary interior mask, or
# dense instance ids (every voxel belongs to a cell, as in tissue: the borders must be made from
# the ids). The one list of kinds is the config schema's; targets, evaluation and the report read it.
LABEL_KINDS = choices("weight_map", "labels")
# How each kind becomes training targets (:func:`cells_of`), in words for the report.
LABEL_KIND_TARGETS = {
    "instances": "instance ids; touching objects get a border between them",
    "binary": "a binary interior mask; its components are the objects",
    "dense": "dense ids (tissue); every boundary becomes the border class",
}

# The border term is dropped where it is below this absolute value; the cut-off distance it
# implies bounds the neighbourhood in which a cell's distance transform is evaluated.
_BORDER_TOLERANCE = 1e-6


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be a 2D (Y, X) or 3D (Z, Y, X) array, got shape {labels.shape}")
    if labels.dtype == bool:
        raise ValueError(
            "labels must be an integer instance image, got a boolean mask; use "
            "instances_from_binary() to turn a binary mask into instances"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype (instance ids), got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0 (0 = background), got minimum {labels.min()}")
    return labels


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing}")
    return spacing


def instances_from_binary(binary: np.ndarray) -> np.ndarray:
    """Turn a binary cell mask into instance labels by connected components.

    ``binary`` is nonzero on cell interiors and 0 on borders/background (e.g. ISBI 2012
    labels: 255 = interior, 0 = membrane). Components are 4-connected in 2D and 6-connected
    in 3D, so cells touching only diagonally stay apart. Returns int32 labels, 0 = border.

    Examples
    --------
    >>> int(instances_from_binary(np.array([[1, 0, 1], [0, 1, 0]])).max())
    3
    """
    binary = np.asarray(binary)
    if binary.ndim not in (2, 3):
        raise ValueError(f"binary must be a 2D or 3D array, got shape {binary.shape}")
    structure = ndimage.generate_binary_structure(binary.ndim, 1)
    labels, _ = ndimage.label(binary != 0, structure=structure)
    return labels.astype(np.int32, copy=False)


def true_boundaries(labels: np.ndarray) -> np.ndarray:
    """The boundary voxels of an instance image: those whose 4- (2D) or 6-neighbourhood (3D)
    holds another id (background 0 counts as an id). Both sides of a contact are boundary.

    Examples
    --------
    >>> true_boundaries(np.array([[1, 1, 2, 2]])).astype(int).tolist()
    [[0, 1, 1, 0]]
    """
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be a 2D or 3D array, got shape {labels.shape}")
    return find_boundaries(labels, connectivity=1, mode="thick")


def instances_from_dense(labels: np.ndarray) -> np.ndarray:
    """Separate densely packed cells: their boundary voxels (:func:`true_boundaries`) become 0.

    Dense ground truth (every voxel belongs to a cell, e.g. plant tissue) has no background
    between touching cells, so a class target "cell interior" would be all ones. As in the
    U-Net paper's touching cells, the boundary becomes the background class, two voxels thick
    (one on each side), and the weight map emphasises it. Returns int64 labels.
    """
    labels = _check_labels(labels).astype(np.int64)
    return np.where(true_boundaries(labels), 0, labels)


def neighbour_ids(labels: np.ndarray, footprint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest and the smallest nonzero id within ``footprint`` of each voxel (outside the
    image counts as background); where no nonzero id is near, the smallest is ``labels.max() + 1``.

    Two different objects are near a voxel exactly where the two differ and both are ids.

    Examples
    --------
    >>> [a.tolist() for a in neighbour_ids(np.array([[1, 0, 2, 0]]), np.ones((1, 3), bool))]
    [[[1, 2, 2, 2]], [[1, 1, 2, 2]]]
    """
    labels = np.asarray(labels)
    top = int(labels.max()) + 1  # above every id (ndimage's cval is a double: no iinfo.max)
    largest = ndimage.maximum_filter(labels, footprint=footprint, mode="constant", cval=0)
    smallest = ndimage.minimum_filter(np.where(labels > 0, labels, top), footprint=footprint, mode="constant",
                                      cval=top)
    return largest, smallest


def separate_touching(labels: np.ndarray) -> np.ndarray:
    """Give touching instances a border: voxels whose 4- (2D) or 6-neighbourhood (3D) holds
    another nonzero id become 0 (background), on both sides of each contact.

    Instance ground truth of touching nuclei usually has no background between them (Cell
    Tracking Challenge, Cellpose and StarDist data): as a class target "interior" the two would
    be one blob, and the network would never learn to separate them. The U-Net paper separates
    touching cells in the ground truth first (its Fig. 3); the border then gets the high weights
    of eq. 2. Instances with background between them are returned unchanged. Unlike
    :func:`instances_from_dense`, the outer edge of an object next to background stays in it.

    Examples
    --------
    >>> separate_touching(np.array([[1, 1, 2, 2, 0, 3]])).tolist()
    [[1, 0, 0, 2, 0, 3]]
    """
    labels = _check_labels(labels)
    if labels.size == 0:
        return labels.copy()
    # A contact where the largest or the smallest nonzero id around differs from the voxel's own.
    largest, smallest = neighbour_ids(labels, ndimage.generate_binary_structure(labels.ndim, 1))
    contact = (labels > 0) & ((largest != labels) | (smallest != labels))
    return np.where(contact, 0, labels).astype(labels.dtype, copy=False)


def cells_of(labels: np.ndarray, kind: str, *, separate: bool = True) -> np.ndarray:
    """Instance labels with 0 between cells, from ground truth of ``kind`` (:data:`LABEL_KINDS`).

    ``instances``: touching instances get a border (:func:`separate_touching`; ``separate=False``
    keeps them as they are, for ablations); ``binary``: the 4-/6-connected components of the
    mask; ``dense``: the boundaries of every id become 0.
    """
    if kind == "instances":
        return separate_touching(labels) if separate else np.asarray(labels)
    if kind == "binary":
        return instances_from_binary(labels)
    if kind == "dense":
        return instances_from_dense(labels)
    raise ValueError(f"ground-truth kind must be one of {LABEL_KINDS}, got {kind!r}")


def class_balance(labels: np.ndarray) -> np.ndarray:
    """w_c(x) = N / (K * N_class(x)) for the classes background (0) and cell (> 0)."""
    foreground = labels > 0
    n_fg = int(foreground.sum())
    n_bg = labels.size - n_fg
    k = (n_fg > 0) + (n_bg > 0)
    w = np.empty(labels.shape, np.float32)
    if n_fg:
        w[foreground] = labels.size / (k * n_fg)
    if n_bg:
        w[~foreground] = labels.size / (k * n_bg)
    return w


def weight_map(
    labels: np.ndarray,
    w0: float = default("weight_map", "w0"),
    sigma: float = default("weight_map", "sigma"),
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """The paper's weight map w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)).

    Parameters
    ----------
    labels : ndarray of int, 2D (Y, X) or 3D (Z, Y, X)
        Instance labels; 0 is background (including the borders between touching cells).
    w0, sigma : float
        Weight and width (in ``spacing`` units) of the border term; 10 and 5 px in the paper.
    spacing : sequence of float, optional
        Physical size of a pixel along each axis, for anisotropic 3D stacks. Default 1.

    Returns
    -------
    ndarray of float32, same shape as ``labels``.

    Notes
    -----
    Eq. 2 of Ronneberger et al. (2015). ``d1`` and ``d2`` are the Euclidean distances to the
    border of the nearest and the second-nearest cell; the border term is added on background
    pixels only (inside a cell d1 = 0 and the term would only blur the class balance), and is 0
    where fewer than two cells exist. ``w_c(x) = N / (K * N_class(x))`` balances the class
    frequencies: N pixels, K classes present (1 or 2), N_class(x) pixels of x's class, so
    every present class carries the same total weight and the mean of w_c is 1.

    Instead of one distance transform of the whole image per cell (the definition), each
    cell's transform is evaluated only within the distance ``T`` beyond which the border term
    is below 1e-6 (``w0 * exp(-T^2 / 2 sigma^2) = 1e-6``), and the two smallest distances are
    kept in running arrays. That is exact up to 1e-6 and costs about (cell size + 2T)^d per
    cell instead of the whole image (measured in bench/weight_map.py).

    Examples
    --------
    >>> labels = np.zeros((8, 9), int); labels[:, :4] = 1; labels[:, 5:] = 2
    >>> w = weight_map(labels, w0=10, sigma=5)
    >>> bool(w[0, 4] > w[0, 0])
    True
    """
    labels = _check_labels(labels)
    spacing = _check_spacing(spacing, labels.ndim)
    if not w0 >= 0 or not sigma > 0:
        raise ValueError(f"w0 must be >= 0 and sigma > 0, got w0={w0!r}, sigma={sigma!r}")
    weights = class_balance(labels)
    background = labels == 0
    if w0 == 0 or not background.any():
        return weights
    d1, d2 = _two_nearest_distances(labels, w0=w0, sigma=sigma, spacing=spacing)
    if d1 is None:
        return weights
    total = d1[background] + d2[background]
    weights[background] += (w0 * np.exp(-(total**2) / (2.0 * sigma**2))).astype(np.float32)
    return weights


def _two_nearest_distances(labels, *, w0, sigma, spacing):
    """Distances to the nearest and second-nearest cell, exact where the border term matters."""
    dense = labels
    if labels.max() > 4 * labels.size:
        # find_objects returns a list as long as the largest id: make sparse ids dense.
        _, inverse = np.unique(labels, return_inverse=True)
        dense = inverse.reshape(labels.shape)
    if dense.dtype.itemsize > 4 or dense.dtype.kind == "u":
        dense = dense.astype(np.int64 if dense.max() > 2**31 - 1 else np.int32)
    boxes = ndimage.find_objects(dense)
    if sum(box is not None for box in boxes) < 2:
        return None, None
    cutoff = sigma * math.sqrt(2.0 * math.log(max(w0 / _BORDER_TOLERANCE, 1.0 + 1e-12)))
    pad = [math.ceil(cutoff / s) + 1 for s in spacing]
    d1 = np.full(labels.shape, np.inf, np.float64)
    d2 = np.full(labels.shape, np.inf, np.float64)
    for index, box in enumerate(boxes, start=1):
        if box is None:
            continue
        crop = tuple(slice(max(b.start - p, 0), min(b.stop + p, n))
                     for b, p, n in zip(box, pad, labels.shape))
        distance = ndimage.distance_transform_edt(dense[crop] != index, sampling=spacing)
        near, second = d1[crop], d2[crop]
        np.minimum(second, np.maximum(near, distance), out=second)
        np.minimum(near, distance, out=near)
    return d1, d2
