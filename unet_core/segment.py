"""Instance segmentation from class probabilities.

Three methods (config ``segment.method``):

- ``components``: threshold + connected components, blockwise (any size). For cells on a
  background, where the predicted borders between touching cells are clear.
- ``interior_watershed``: for touching nuclei or cells on a background. Seeds are the maxima of
  the smoothed interior probability ``p`` that stand out by ``h`` and reach ``seed_threshold``,
  and a watershed of ``-p`` floods each seed within ``p > threshold``: touching objects joined by
  a neck of lower interior probability are split, and regions with no seed (noise, texture) are
  dropped. Blockwise with an overlap, ids consistent over the whole image.
- ``watershed``: a seeded watershed of the boundary map (1 - interior probability), seeds at
  its h-minima. Every voxel goes to a cell: for densely packed cells (tissue), where a border
  missed by a few voxels would merge two cells under ``components``. Holds one volume in memory.

Axis order: probabilities ``(C, *spatial)`` with class 1 = cell interior; labels ``(*spatial)``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from pathlib import Path

import dask.array as da
import numpy as np
from dask_image.ndmeasure import label as dask_label
from scipy import ndimage
from skimage.morphology import h_minima, local_maxima, reconstruction, remove_small_objects
from skimage.segmentation import expand_labels, relabel_sequential, watershed
from tqdm.auto import tqdm

from . import io
from .defaults import choices, default
from .weights import neighbour_ids

__all__ = ["instances_from_probabilities", "seeded_watershed", "interior_seeds", "interior_watershed", "close_contacts",
           "segment_image", "SEGMENT_METHODS"]

SEGMENT_METHODS = choices("segment", "method")

# interior_watershed: each chunk is seeded and flooded with this much context (px) from its
# neighbours. A seed's h-maximum and a voxel's flood depend on the object around them, a few px
# to its radius away; with objects smaller than this the blockwise result equals the
# whole-image one (tested).
_HALO = 24
# Touching objects are predicted with a gap where their training targets had a border (one
# voxel each side, weights.separate_touching): gaps up to this wide (Manhattan distance from the
# gap voxel to both objects) are given back to the nearest object.
_CONTACT_GAP = 2

# The watershed method holds one volume (a plane for 2D models) and its labels in memory; above
# this many voxels (about 24 GB of working arrays) it refuses and names the blockwise method.
_WATERSHED_MAX_VOXELS = 1 << 30

_LOG = logging.getLogger(__name__)


def instances_from_probabilities(foreground: np.ndarray, *, threshold: float = default("segment", "threshold"),
                                 min_size: int = 0) -> np.ndarray:
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


def seeded_watershed(boundary: np.ndarray, *, sigma: float = default("segment", "sigma"),
                     h: float = default("segment", "h"), min_size: int = 0) -> np.ndarray:
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


def close_contacts(labels: np.ndarray, *, gap: int = _CONTACT_GAP) -> np.ndarray:
    """Give the background between two touching objects back to them.

    A background voxel within ``gap`` steps (4-/6-connected) of two or more different objects
    joins the nearest of them (skimage ``expand_labels``); background next to only one object
    stays background, so outer edges do not grow. This undoes the border that
    :func:`unet_core.weights.separate_touching` carved into the training targets.

    Examples
    --------
    >>> close_contacts(np.array([[1, 1, 0, 0, 2, 2, 0, 0]])).tolist()
    [[1, 1, 1, 2, 2, 2, 0, 0]]
    """
    labels = np.asarray(labels)
    footprint = ndimage.iterate_structure(ndimage.generate_binary_structure(labels.ndim, 1), gap)
    largest, smallest = neighbour_ids(labels, footprint)
    between = (labels == 0) & (largest > 0) & (smallest <= labels.max()) & (largest != smallest)
    if not between.any():
        return labels
    grown = expand_labels(labels, distance=gap)
    return np.where(between, grown, labels)


def interior_seeds(foreground: np.ndarray, *, sigma: float = default("segment", "sigma"),
                   h: float = default("segment", "h"),
                   seed_threshold: float = default("segment", "seed_threshold")) -> np.ndarray:
    """Where objects are seeded: the top ``h`` of each maximum of the smoothed interior probability
    that rises by more than ``h`` above its surroundings and reaches ``seed_threshold``.

    The maxima are those of the morphological reconstruction of ``surface - h`` under the surface
    (the h-maxima transform); each seed is the whole dome within ``h`` of its peak, one connected
    region (skimage's ``h_maxima`` keeps only the peak voxels, which ties split into several).
    Two objects joined by a neck of interior probability lower by more than ``h`` get one seed
    each; texture inside one object (dips shallower than ``h``, evened out by the Gaussian of
    ``sigma`` px) does not split it; a region whose peak stays below ``seed_threshold`` (noise,
    background texture) gets none. Returns a boolean mask (2D or 3D).
    """
    if not sigma >= 0 or not h > 0:
        raise ValueError(f"sigma must be >= 0 and h > 0, got sigma={sigma!r}, h={h!r}")
    surface = np.asarray(foreground, np.float32)
    if sigma:
        surface = ndimage.gaussian_filter(surface, sigma)
    domes = local_maxima(reconstruction(surface - np.float32(h), surface, method="dilation"), connectivity=1,
                         allow_borders=True)
    structure = ndimage.generate_binary_structure(surface.ndim, 1)
    labels, count = ndimage.label(domes, structure=structure)
    if not count:
        return domes
    peaks = ndimage.maximum(surface, labels, index=np.arange(1, count + 1))
    keep = np.concatenate([[False], peaks > seed_threshold])
    return keep[labels]


def interior_watershed(foreground: np.ndarray, seeds: np.ndarray | None = None, *,
                       threshold: float = default("segment", "threshold"),
                       seed_threshold: float = default("segment", "seed_threshold"),
                       sigma: float = default("segment", "sigma"), h: float = default("segment", "h")) -> np.ndarray:
    """Objects of an interior probability map, touching ones split: a watershed from one seed each.

    ``seeds`` are labelled seeds (:func:`interior_seeds`, 4-/6-connected components; computed here
    when None, given by :func:`segment_image`, which labels them over the whole image). The
    watershed of the smoothed ``-foreground`` floods each seed within ``foreground > threshold``,
    so touching objects are cut where the probability between them is lowest, and a region with
    no seed is left out. Then :func:`close_contacts`. Returns uint32 labels with the seeds' ids.

    Examples
    --------
    >>> p = np.array([[0.1, 0.9, 0.95, 0.9, 0.7, 0.6, 0.9, 0.95, 0.9, 0.1]])
    >>> interior_watershed(p, sigma=0).tolist()
    [[0, 1, 1, 1, 1, 2, 2, 2, 2, 0]]
    """
    if not 0.0 <= threshold <= seed_threshold <= 1.0:
        raise ValueError(f"need 0 <= threshold <= seed_threshold <= 1, got threshold={threshold!r}, "
                         f"seed_threshold={seed_threshold!r}")
    foreground = np.asarray(foreground, np.float32)
    if seeds is None:
        structure = ndimage.generate_binary_structure(foreground.ndim, 1)
        seeds, _ = ndimage.label(interior_seeds(foreground, sigma=sigma, h=h, seed_threshold=seed_threshold),
                                 structure=structure)
    seeds = np.asarray(seeds).astype(np.uint32, copy=False)
    if not seeds.any():
        return np.zeros(foreground.shape, np.uint32)
    surface = ndimage.gaussian_filter(foreground, sigma) if sigma else foreground
    labels = watershed(-surface, seeds, mask=(foreground > threshold) | (seeds > 0))
    return close_contacts(labels.astype(np.uint32, copy=False))


def _relabel_blockwise(array, selection, keep: np.ndarray) -> None:
    """Map the labels of ``array[selection]`` through ``keep`` (old id -> new id), chunk by chunk."""
    view = da.from_zarr(array, chunks=io.write_regions(array))[selection]
    mapped = view.map_blocks(lambda block: keep[block], dtype=np.uint32)
    da.store(mapped, array, regions=selection, lock=False)


def _store(labels: da.Array, array, selection) -> None:
    """``array[selection] = labels`` in parallel, each task writing whole chunks (or shards)."""
    regions = [size for size, index in zip(io.write_regions(array), selection) if isinstance(index, slice)]
    da.store(labels.rechunk(regions), array, regions=selection, lock=False)


def _check_settings(method: str, threshold: float, seed_threshold: float, min_relative_size: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if method not in SEGMENT_METHODS:
        raise ValueError(f"segment method must be one of {SEGMENT_METHODS}, got {method!r}")
    if method == "interior_watershed" and not threshold <= seed_threshold <= 1.0:
        raise ValueError(f"seed_threshold must be in [threshold, 1] = [{threshold}, 1], got {seed_threshold!r}")
    if not min_relative_size >= 0:
        raise ValueError(f"min_relative_size must be >= 0, got {min_relative_size!r}")


def _recorded_settings(method: str, *, threshold: float, seed_threshold: float, sigma: float, h: float) -> dict:
    """What the label image records of its method: the method in words and the settings it used."""
    if method == "watershed":
        return {"method": "seeded watershed of 1 - interior probability (h-minima seeds)", "sigma": sigma, "h": h}
    if method == "interior_watershed":
        return {"method": "watershed of the interior probability from its h-maxima (blockwise)",
                "threshold": threshold, "seed_threshold": seed_threshold, "sigma": sigma, "h": h}
    return {"method": "threshold + connected components (blockwise, merged across chunks)", "threshold": threshold}


def segment_image(probabilities_path: str | Path, output_path: str | Path, *,
                  threshold: float = default("segment", "threshold"), min_size: int = default("segment", "min_size"),
                  method: str = default("segment", "method"), sigma: float = default("segment", "sigma"),
                  h: float = default("segment", "h"), seed_threshold: float = default("segment", "seed_threshold"),
                  min_relative_size: float = default("segment", "min_relative_size")) -> Path:
    """Segment a probability OME-Zarr into an NGFF label image (uint32).

    The defaults are the config's (``segment`` section of the schema).

    ``method="components"``, blockwise:
    Connected components are found chunk by chunk with ``dask_image.ndmeasure.label``,
    which merges components across chunk faces, so ids are consistent over the whole image
    and the result equals whole-image labelling up to a renumbering; memory is bounded by the
    chunks. A 2D model's output is labelled plane by plane (per t and z), a 3D model's per t.

    ``method="interior_watershed"``, blockwise: the seed masks (:func:`interior_seeds` with
    ``sigma``, ``h`` and ``seed_threshold``) are found per chunk with ``_HALO`` px of context and
    labelled like ``components``, over the whole image; then each chunk, with the same context, is
    flooded by :func:`interior_watershed` (dask ``map_overlap``). Every voxel takes the id of the
    seed it is flooded from, so ids agree across chunk faces.

    ``method="watershed"``: :func:`seeded_watershed` of ``1 - interior probability`` with
    ``sigma``, ``h`` and ``min_size``, one volume (a 3D model's, per t) or plane (a 2D model's)
    at a time in memory. ``threshold`` is not used.

    Objects smaller than ``min_size`` pixels are removed using sizes counted over the whole
    image, then ids are renumbered 1..n. ``min_relative_size`` > 0 raises that size to this
    fraction of the median size of the training objects, which the model recorded
    (``training_objects`` in the probabilities' provenance): a filter of fragments that follows
    the data, not a number tuned to one data set.
    """
    _check_settings(method, threshold, seed_threshold, min_relative_size)
    probs = io.open_image(probabilities_path)
    meta = probs.attrs.get("unet_core", {})
    ndim = int(meta.get("model_ndim", 2))
    scale = float(meta.get("probability_scale", 1.0))
    min_size = _smallest_object(probabilities_path, meta, min_size, min_relative_size)
    spatial = "yx" if ndim == 2 else "zyx"
    loop_axes = [a for a in probs.axes if a not in spatial and a != "c"]
    axes = probs.axes.replace("c", "")
    shape = [probs.shape[probs.axes.index(a)] for a in axes]
    chunks = [1 if a in loop_axes else probs.array.chunks[probs.axes.index(a)] for a in axes]
    if method == "watershed":
        voxels = int(np.prod([probs.shape[probs.axes.index(a)] for a in spatial]))
        if voxels > _WATERSHED_MAX_VOXELS:
            raise ValueError(f"{probabilities_path}: the watershed method holds one {len(spatial)}D volume in memory "
                             f"and this one has {voxels:,} voxels (limit {_WATERSHED_MAX_VOXELS:,}); use "
                             "segment.method 'components', which works blockwise")
    settings = {**_recorded_settings(method, threshold=threshold, seed_threshold=seed_threshold, sigma=sigma, h=h),
                "name": method, "min_size": min_size, "min_relative_size": min_relative_size, "model_ndim": ndim}
    structure = ndimage.generate_binary_structure(len(spatial), 1)
    source = da.from_zarr(probs.array)
    # in the probabilities' format; concurrent writes go shard by shard (io.write_regions)
    with io.atomic_image(output_path, axes, shape, dtype="uint32", scale=probs.scale_for(axes), chunks=chunks,
                         attributes={"unet_core": settings}, format=probs.format,
                         image_label={"source": {"image": str(probabilities_path)}}) as out:
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
            if method == "interior_watershed":
                labels = _interior_watershed_blockwise(source, index, scale, structure, threshold=threshold,
                                                       seed_threshold=seed_threshold, sigma=sigma, h=h)
            else:
                # Threshold before indexing: dask-image's label fails on a graph that starts with an
                # integer index into a zarr-backed array (dask 2026.8); the chunks read are the same.
                labels, _ = dask_label((source > threshold * scale)[index], structure=structure)
            _store(labels.astype(np.uint32), out.array, selection)
            _drop_small(out.array, selection, min_size)
    return Path(output_path)


def _interior_watershed_blockwise(source, index, scale: float, structure, **settings):
    """:func:`interior_watershed` of one plane/volume as a dask array: seed masks per chunk (with
    context), seeds labelled over the whole image, then floods per chunk (with context)."""
    # Scale before indexing: dask-image's label fails on a graph that starts with an integer
    # index into a zarr-backed array (dask 2026.8); the chunks read are the same.
    foreground = (source.astype(np.float32) / np.float32(scale))[index]
    depth = {axis: min(_HALO, size) for axis, size in enumerate(foreground.shape)}
    seed_settings = {k: settings[k] for k in ("sigma", "h", "seed_threshold")}
    mask = da.map_overlap(functools.partial(interior_seeds, **seed_settings), foreground, depth=depth,
                          boundary="none", dtype=bool, trim=True)
    seeds, _ = dask_label(mask, structure=structure)

    def flood(block, block_seeds):
        return interior_watershed(block, block_seeds, **settings)

    return da.map_overlap(flood, foreground, seeds.astype(np.uint32), depth=depth, boundary="none",
                          dtype=np.uint32, trim=True)


def _drop_small(array, selection, min_size: int) -> None:
    """Remove objects under ``min_size`` voxels (sizes over the whole plane/volume) and renumber 1..n."""
    stored = da.from_zarr(array)[selection]
    sizes = da.bincount(stored.ravel()).compute()
    keep = (sizes >= max(min_size, 1)) & (np.arange(len(sizes)) > 0)
    mapping = np.zeros(len(sizes), np.uint32)
    mapping[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    if not np.array_equal(mapping, np.arange(len(sizes))):
        _relabel_blockwise(array, selection, mapping)


def _smallest_object(path, meta: dict, min_size: int, min_relative_size: float) -> int:
    """``min_size``, raised to ``min_relative_size`` x the training objects' median size where known."""
    if not min_relative_size:
        return int(min_size)
    median = float(meta.get("training_objects", {}).get("median_size", 0.0))
    if not median:
        _LOG.warning("%s: min_relative_size %s is not applied: the model that predicted it recorded no training "
                     "object sizes (retrain to record them); using min_size %d", path, min_relative_size, min_size)
        return int(min_size)
    return max(int(min_size), int(math.ceil(min_relative_size * median)))
