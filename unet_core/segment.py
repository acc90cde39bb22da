"""Instance segmentation from class probabilities: threshold + connected components.

Axis order: probabilities ``(C, *spatial)`` with class 1 = cell interior; labels ``(*spatial)``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.morphology import remove_small_objects
from tqdm.auto import tqdm

from . import io

__all__ = ["instances_from_probabilities", "segment_image"]


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


def segment_image(probabilities_path: str | Path, output_path: str | Path, *, threshold: float = 0.5,
                  min_size: int = 0) -> Path:
    """Segment a probability OME-Zarr into an NGFF label image (uint32), plane by plane for 2D models."""
    probs = io.open_image(probabilities_path)
    meta = probs.attrs.get("unet_core", {})
    ndim = int(meta.get("model_ndim", 2))
    scale = float(meta.get("probability_scale", 1.0))
    spatial = "yx" if ndim == 2 else "zyx"
    loop_axes = [a for a in probs.axes if a not in spatial and a != "c"]
    axes = probs.axes.replace("c", "")
    shape = [probs.shape[probs.axes.index(a)] for a in axes]
    attributes = {"image-label": {"version": io.NGFF_VERSION, "source": {"image": str(probabilities_path)}},
                  "unet_core": {"method": "threshold+connected-components", "threshold": threshold,
                                "min_size": min_size}}
    with io.atomic_image(output_path, axes, shape, dtype="uint32", scale=probs.scale_for(axes),
                         attributes=attributes) as out:
        positions = list(itertools.product(*[range(probs.shape[probs.axes.index(a)]) for a in loop_axes]))
        for position in tqdm(positions, desc=f"segment {Path(probabilities_path).name}", unit="plane"):
            where = dict(zip(loop_axes, position))
            foreground = probs.read({**where, "c": 1}, order=tuple(spatial)).astype(np.float32) / scale
            out.write(where, instances_from_probabilities(foreground, threshold=threshold, min_size=min_size),
                      order=tuple(spatial))
    return Path(output_path)
