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
from .weights import instances_from_binary, weight_map

__all__ = ["prepare_targets"]


def prepare_targets(image_path: str | Path, output_path: str | Path, *, ndim: int = 2,
                    w0: float = 10.0, sigma: float = 5.0, binary: bool = False) -> Path:
    """Compute target classes and weight maps of an ingested stack into ``output_path``.

    ``binary``: the ground truth is a binary interior mask (e.g. ISBI 2012: 255 = interior,
    0 = membrane); its 4-connected (2D) / 6-connected (3D) components are the cells.
    """
    labels = io.read_labels(image_path)
    if labels is None:
        raise ValueError(f"{image_path}: has no ground truth (labels/ground_truth); cannot compute weight maps")
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    spatial = "yx" if ndim == 2 else "zyx"
    if not set(spatial) <= set(labels.axes):
        raise ValueError(f"{image_path}: labels axes {labels.axes!r} lack the spatial axes {spatial!r}")
    loop_axes = [a for a in labels.axes if a not in spatial]
    spacing = [labels.scale.get(a, 1.0) for a in spatial]
    output_path = Path(output_path)
    with io.atomic_directory(output_path) as tmp:
        import zarr
        group = zarr.open_group(tmp, mode="w", zarr_format=2)
        chunks = io.default_chunks(labels.axes, labels.shape)
        target = group.create_array("target", shape=labels.shape, dtype="uint8", chunks=chunks,
                                    compressors=io._COMPRESSOR, fill_value=0)
        weight = group.create_array("weight", shape=labels.shape, dtype="float32", chunks=chunks,
                                    compressors=io._COMPRESSOR, fill_value=0)
        group.attrs.update({"axes": labels.axes, "w0": w0, "sigma": sigma, "ndim": ndim, "spacing": spacing,
                            "source": str(image_path)})
        positions = list(itertools.product(*[range(labels.shape[labels.axes.index(a)]) for a in loop_axes]))
        for position in tqdm(positions, desc=f"weight maps {Path(image_path).name}", unit="plane"):
            where = dict(zip(loop_axes, position))
            instance = labels.read(where, order=tuple(spatial)).astype(np.int64)
            if binary:
                instance = instances_from_binary(instance)
            index = tuple(where[a] if a in where else slice(None) for a in labels.axes)
            target[index] = (instance > 0).astype(np.uint8)
            weight[index] = weight_map(instance, w0=w0, sigma=sigma, spacing=spacing if ndim == 3 else None)
    return output_path
