"""Instance segmentation from class probabilities.

Two methods (config ``segment.method``):

- ``components``: threshold + connected components, blockwise (any size). For cells on a
  background, where the predicted borders between touching cells are clear.
- ``watershed``: a seeded watershed of the boundary map (1 - interior probability), seeds at
  its h-minima. Every voxel goes to a cell: for densely packed cells (tissue), where a border
  missed by a few voxels would merge two cells under ``components``. Holds one volume in memory.

Axis order: probabilities ``(C, *spatial)`` with class 1 = cell interior; labels ``(*spatial)``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import dask.array as da
import numpy as np
from dask_image.ndmeasure import label as dask_label
from scipy import ndimage
from skimage.morphology import h_minima, remove_small_objects
from skimage.segmentation import relabel_sequential, watershed
from tqdm.auto import tqdm

from . import io

__all__ = ["instances_from_probabilities", "seeded_watershed", "segment_image", "SEGMENT_METHODS"]

SEGMENT_METHODS = ("components", "watershed")

# The watershed method holds one volume (a plane for 2D models) and its labels in memory; above
# this many voxels (about 24 GB of working arrays) it refuses and names the blockwise method.
_WATERSHED_MAX_VOXELS = 1 << 30


def instances_from_probabilities(foreground: np.ndarray, *, threshold: float = 0.5, min_size: int = 0) -> np.ndarray:
    """Label the connected components (4-/6-connected) of ``foreground > threshold``.

    Thin predicted borders between touching cells separate them; components smaller than
    ``min_size`` pixels are dropped. Returns uint32 labels numbered from 1.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    mask = np.asarray(foreground) > threshold
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    labels, _ = ndimage.label(mask, structure=structure)
    if min_size > 1:
        labels = remove_small_objects(labels, max_size=min_size - 1)
        labels, _ = ndimage.label(labels > 0, structure=structure)
    return labels.astype(np.uint32)


def seeded_watershed(boundary: np.ndarray, *, sigma: float = 1.0, h: float = 0.1, min_size: int = 0) -> np.ndarray:
    """Cells of a boundary map (high on cell boundaries, any scale): a seeded watershed.

    The map is smoothed by a Gaussian of ``sigma`` pixels; every regional minimum deeper than
    ``h`` (skimage ``h_minima``, in the map's units) seeds one cell, and the watershed floods
    the smoothed map from the seeds, so every pixel joins a cell and cells meet on the ridges.
    Seeds of cells smaller than ``min_size`` pixels are dropped and their pixels flooded again
    by the neighbours. Returns uint32 labels numbered from 1 (2D or 3D, like ``boundary``).

    The same function segments the learned boundary map and, as the classical baseline, the
    smoothed boundary stain (:mod:`unet_core.evaluate`), so the two differ only by the map.
    """
    if not sigma >= 0 or not h > 0:
        raise ValueError(f"sigma must be >= 0 and h > 0, got sigma={sigma!r}, h={h!r}")
    surface = np.asarray(boundary, np.float32)
    if sigma:
        surface = ndimage.gaussian_filter(surface, sigma)
    seeds, _ = ndimage.label(h_minima(surface, h))
    labels = watershed(surface, seeds)
    if min_size > 1:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        if small.any() and not small[1:].all():
            seeds[small[seeds]] = 0
            labels = watershed(surface, seeds)
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(np.uint32)


def _relabel_blockwise(array, selection, keep: np.ndarray) -> None:
    """Map the labels of ``array[selection]`` through ``keep`` (old id -> new id), chunk by chunk."""
    view = da.from_zarr(array)[selection]
    mapped = view.map_blocks(lambda block: keep[block], dtype=np.uint32)
    da.store(mapped, array, regions=selection, lock=False)


def segment_image(probabilities_path: str | Path, output_path: str | Path, *, threshold: float = 0.5,
                  min_size: int = 0, method: str = "components", sigma: float = 1.0, h: float = 0.1) -> Path:
    """Segment a probability OME-Zarr into an NGFF label image (uint32).

    ``method="watershed"``: :func:`seeded_watershed` of ``1 - interior probability`` with
    ``sigma``, ``h`` and ``min_size``, one volume (a 3D model's, per t) or plane (a 2D model's)
    at a time in memory. ``threshold`` is not used.

    ``method="components"``, blockwise:
    Connected components are found chunk by chunk with ``dask_image.ndmeasure.label``,
    which merges components across chunk faces, so ids are consistent over the whole image
    and the result equals whole-image labelling up to a renumbering; memory is bounded by the
    chunks. A 2D model's output is labelled plane by plane (per t and z), a 3D model's per t.
    Objects smaller than ``min_size`` pixels are removed using sizes counted over the whole
    image, then ids are renumbered 1..n.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if method not in SEGMENT_METHODS:
        raise ValueError(f"segment method must be one of {SEGMENT_METHODS}, got {method!r}")
    probs = io.open_image(probabilities_path)
    meta = probs.attrs.get("unet_core", {})
    ndim = int(meta.get("model_ndim", 2))
    scale = float(meta.get("probability_scale", 1.0))
    spatial = "yx" if ndim == 2 else "zyx"
    loop_axes = [a for a in probs.axes if a not in spatial and a != "c"]
    axes = probs.axes.replace("c", "")
    shape = [probs.shape[probs.axes.index(a)] for a in axes]
    chunks = [1 if a in loop_axes else probs.array.chunks[probs.axes.index(a)] for a in axes]
    if method == "watershed":
        settings = {"method": "seeded watershed of 1 - interior probability (h-minima seeds)",
                    "sigma": sigma, "h": h, "min_size": min_size, "model_ndim": ndim}
        voxels = int(np.prod([probs.shape[probs.axes.index(a)] for a in spatial]))
        if voxels > _WATERSHED_MAX_VOXELS:
            raise ValueError(f"{probabilities_path}: the watershed method holds one {len(spatial)}D volume in memory "
                             f"and this one has {voxels:,} voxels (limit {_WATERSHED_MAX_VOXELS:,}); use "
                             "segment.method 'components', which works blockwise")
    else:
        settings = {"method": "threshold + connected components (blockwise, merged across chunks)",
                    "threshold": threshold, "min_size": min_size, "model_ndim": ndim}
    attributes = {"image-label": {"version": io.NGFF_VERSION, "source": {"image": str(probabilities_path)}},
                  "unet_core": settings}
    structure = ndimage.generate_binary_structure(len(spatial), 1)
    source = da.from_zarr(probs.array)
    with io.atomic_image(output_path, axes, shape, dtype="uint32", scale=probs.scale_for(axes), chunks=chunks,
                         attributes=attributes) as out:
        positions = list(itertools.product(*[range(probs.shape[probs.axes.index(a)]) for a in loop_axes]))
        unit = "volume" if method == "watershed" and len(spatial) == 3 else "plane"
        for position in tqdm(positions, desc=f"segment {Path(probabilities_path).name}", unit=unit):
            where = dict(zip(loop_axes, position))
            selection = tuple(where[a] if a in where else slice(None) for a in axes)
            if method == "watershed":
                foreground = probs.read({**where, "c": 1}, order=tuple(spatial)).astype(np.float32) / scale
                out.array[selection] = seeded_watershed(1.0 - foreground, sigma=sigma, h=h, min_size=min_size)
                continue
            index = tuple(where[a] if a in where else 1 if a == "c" else slice(None) for a in probs.axes)
            # Threshold before indexing: dask-image's label fails on a graph that starts with an
            # integer index into a zarr-backed array (dask 2026.8); the chunks read are the same.
            mask = (source > threshold * scale)[index]
            labels, _ = dask_label(mask, structure=structure)
            da.store(labels.astype(np.uint32), out.array, regions=selection, lock=False)
            stored = da.from_zarr(out.array)[selection]
            sizes = da.bincount(stored.ravel()).compute()
            keep = (sizes >= max(min_size, 1)) & (np.arange(len(sizes)) > 0)
            mapping = np.zeros(len(sizes), np.uint32)
            mapping[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
            if not np.array_equal(mapping, np.arange(len(sizes))):
                _relabel_blockwise(out.array, selection, mapping)
    return Path(output_path)
