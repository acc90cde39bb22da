"""Training targets of one stack: class targets and weight maps from instance ground truth.

Reads the ``labels/ground_truth`` image of an ingested OME-Zarr stack and writes a zarr
group with ``target`` (uint8: 1 = cell interior, 0 = background/border) and ``weight``
(float32, eq. 2 of the paper). A 2D model gets one weight map per plane (t or z); a 3D
model one per volume, with distances in physical units (anisotropic spacing).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import io
from .atomic import atomic_directory
from .defaults import default
from .weights import LABEL_KINDS, cells_of, weight_map

__all__ = ["prepare_targets"]


def prepare_targets(image_path: str | Path, output_path: str | Path, *, ndim: int = default("model", "ndim"),
                    w0: float = default("weight_map", "w0"), sigma: float = default("weight_map", "sigma"),
                    labels: str = default("weight_map", "labels"),
                    separate_touching: bool = default("weight_map", "separate_touching")) -> Path:
    """Compute target classes and weight maps of an ingested stack into ``output_path``.

    ``labels`` says what the ground truth holds (:data:`unet_core.weights.LABEL_KINDS`):
    ``instances`` (ids, 0 = background; touching instances get a border, the voxels next to
    another id, unless ``separate_touching`` is False), ``binary`` (an interior mask, e.g.
    ISBI 2012: 255 = interior, 0 = membrane; its 4-/6-connected components are the cells) or
    ``dense`` (ids with no background, e.g. tissue: the voxels whose 4-/6-neighbourhood holds
    another id become the border class).
    """
    if labels not in LABEL_KINDS:
        raise ValueError(f"labels must be one of {LABEL_KINDS}, got {labels!r}")
    truth = io.read_labels(image_path)
    if truth is None:
        raise ValueError(f"{image_path}: has no ground truth (labels/ground_truth); cannot compute weight maps")
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    spatial = "yx" if ndim == 2 else "zyx"
    if not set(spatial) <= set(truth.axes):
        raise ValueError(f"{image_path}: labels axes {truth.axes!r} lack the spatial axes {spatial!r}")
    loop_axes = [a for a in truth.axes if a not in spatial]
    spacing = [truth.scale.get(a, 1.0) for a in spatial]
    output_path = Path(output_path)
    with atomic_directory(output_path) as tmp:
        import zarr
        group = zarr.open_group(tmp, mode="w", zarr_format=2)
        chunks = io.default_chunks(truth.axes, truth.shape)
        target = group.create_array("target", shape=truth.shape, dtype="uint8", chunks=chunks,
                                    compressors=io.COMPRESSOR, fill_value=0)
        weight = group.create_array("weight", shape=truth.shape, dtype="float32", chunks=chunks,
                                    compressors=io.COMPRESSOR, fill_value=0)
        group.attrs.update({"axes": truth.axes, "w0": w0, "sigma": sigma, "ndim": ndim, "spacing": spacing,
                            "labels": labels, "source": str(image_path)})
        if labels == "instances":
            group.attrs["separate_touching"] = separate_touching
        positions = list(itertools.product(*[range(truth.shape[truth.axes.index(a)]) for a in loop_axes]))
        for position in tqdm(positions, desc=f"weight maps {Path(image_path).name}", unit="plane"):
            where = dict(zip(loop_axes, position))
            instance = cells_of(truth.read(where, order=tuple(spatial)).astype(np.int64), labels,
                                separate=separate_touching)
            index = tuple(where[a] if a in where else slice(None) for a in truth.axes)
            target[index] = (instance > 0).astype(np.uint8)
            weight[index] = weight_map(instance, w0=w0, sigma=sigma, spacing=spacing if ndim == 3 else None)
    return output_path
