"""A small synthetic microscopy data set: touching irregular cells, noise, uneven light.

Nothing is downloaded: every stack is generated from a seed, so the demo and the tests
run anywhere. Stacks are written as multi-page (ImageJ hyperstack) TIFFs, instance ground
truth beside them as ``<name>_labels.tif``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from skimage.segmentation import find_boundaries

from .defaults import default

__all__ = ["synthetic_cells", "synthetic_nuclei", "write_demo_data", "DEMO_STACKS"]

# name: (kind, shape, has ground truth)
DEMO_STACKS = {
    "timelapse_a": ("2d+t", (6, 192, 192), True),
    "timelapse_b": ("2d+t", (6, 192, 192), True),
    "timelapse_c": ("2d+t", (4, 192, 192), True),
    "timelapse_d": ("2d+t", (4, 256, 256), True),
    "timelapse_e": ("2d+t", (4, 256, 256), False),
    "volume_3d": ("3d", (24, 128, 128), True),
}


def _cell_labels(shape, n_cells, radius, centres, rng, roughness):
    """Voronoi cells of ``centres``, limited to an irregular radius, separated by 1-px gaps."""
    ndim = len(shape)
    grid = np.indices(shape, dtype=np.float32)
    distances = np.stack([
        np.sqrt(sum((grid[a] - c[a]) ** 2 for a in range(ndim))) for c in centres
    ])
    noise = ndimage.gaussian_filter(rng.standard_normal((n_cells, *shape)).astype(np.float32),
                                    sigma=(0,) + (3.0,) * ndim)
    noise /= noise.std() + 1e-6
    distances += roughness * radius.reshape(-1, *[1] * ndim) * noise
    nearest = distances.argmin(axis=0)
    inside = distances.min(axis=0) < radius[nearest]
    labels = np.where(inside, nearest + 1, 0).astype(np.int32)
    touching = find_boundaries(labels, connectivity=1, mode="inner") & (labels > 0)
    labels[touching] = 0
    # Keep only the largest piece of each cell; remove slivers.
    out = np.zeros_like(labels)
    structure = ndimage.generate_binary_structure(ndim, 1)
    components, _ = ndimage.label(labels > 0, structure=structure)
    sizes = np.bincount(components.ravel())
    keep = sizes >= (8 if ndim == 2 else 27)
    keep[0] = False
    out[keep[components]] = labels[keep[components]]
    return out


def _render(labels, rng, *, ndim):
    """Microscope-like image: textured cells, dark gaps, blur, uneven illumination, noise."""
    shape = labels.shape
    brightness = rng.uniform(0.55, 1.0, labels.max() + 1)
    brightness[0] = 0.12
    image = brightness[labels].astype(np.float32)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.5)
    image *= 1.0 + 0.25 * texture / (texture.std() + 1e-6) * (labels > 0)
    image = ndimage.gaussian_filter(image, 0.8)
    ramp = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape[-2:]]
    direction = rng.uniform(-1, 1, 2)
    illumination = 1.0 + 0.35 * (direction[0] * ramp[0][:, None] + direction[1] * ramp[1][None, :])
    image *= illumination
    image += rng.normal(0, 0.06, shape).astype(np.float32)
    image = np.clip(image, 0, None)
    return np.clip(image * 20000 + 500, 0, 65535).astype(np.uint16)


def synthetic_cells(shape: tuple[int, ...], *, seed: int, kind: str = "2d+t") -> tuple[np.ndarray, np.ndarray]:
    """Generate ``(image uint16, labels int32)`` of touching irregular cells.

    ``kind`` is ``"2d+t"`` (shape ``(T, Y, X)``: cells drift slowly between frames) or
    ``"3d"`` (shape ``(Z, Y, X)``: one volume of 3D cells). Deterministic for ``seed``.
    """
    rng = np.random.default_rng(seed)
    if kind == "2d+t":
        frames, height, width = shape
        n_cells = max(4, int(height * width / 700))
        centres = rng.uniform(0, 1, (n_cells, 2)) * (height, width)
        radius = rng.uniform(9, 16, n_cells).astype(np.float32)
        velocity = rng.normal(0, 1.2, (n_cells, 2))
        images, labels = [], []
        for _ in range(frames):
            frame_labels = _cell_labels((height, width), n_cells, radius, centres, rng, roughness=0.12)
            images.append(_render(frame_labels, rng, ndim=2))
            labels.append(frame_labels)
            centres = centres + velocity
        return np.stack(images), np.stack(labels)
    if kind == "3d":
        n_cells = max(4, int(np.prod(shape) / 9000))
        centres = rng.uniform(0, 1, (n_cells, 3)) * shape
        radius = rng.uniform(9, 14, n_cells).astype(np.float32)
        labels = _cell_labels(shape, n_cells, radius, centres, rng, roughness=0.1)
        return _render(labels, rng, ndim=3), labels
    raise ValueError(f"kind must be '2d+t' or '3d', got {kind!r}")


def _place_nuclei(rng, height, width, count, radius_range, cluster_size):
    """Centres, radii and orientations of elliptical nuclei in clusters of touching ones."""
    centres, radii = [], []
    while len(centres) < count:
        anchor = rng.uniform(0, 1, 2) * (height, width)
        first = len(centres)
        for member in range(int(rng.integers(1, cluster_size + 1))):
            r = rng.uniform(*radius_range, 2)
            if member:
                # next to a random member of the cluster, overlapping it a little: they will touch
                k = int(rng.integers(first, len(centres)))
                angle = rng.uniform(0, 2 * np.pi)
                reach = (radii[k].mean() + r.mean()) * rng.uniform(0.75, 0.95)
                anchor = centres[k] + reach * np.array([np.sin(angle), np.cos(angle)])
            if not (0 <= anchor[0] < height and 0 <= anchor[1] < width):
                break
            if centres and np.min(np.linalg.norm(np.asarray(centres) - anchor, axis=1)) < 0.7 * r.min() + 4:
                if member:
                    continue  # would hide most of a neighbour
                break
            centres.append(np.array(anchor, float))
            radii.append(r)
    return np.asarray(centres[:count]), np.asarray(radii[:count]), rng.uniform(0, np.pi, count)


def _nucleus_labels(shape, centres, radii, angles):
    """Each pixel goes to the nucleus of the smallest elliptical distance below 1: touching
    nuclei share a border, with no background between them (as in CTC ground truth)."""
    best = np.full(shape, 1.0, np.float32)
    labels = np.zeros(shape, np.int32)
    for index, (centre, (a, b), angle) in enumerate(zip(centres, radii, angles), start=1):
        reach = int(np.ceil(max(a, b))) + 1
        y0, x0 = max(int(centre[0]) - reach, 0), max(int(centre[1]) - reach, 0)
        y1, x1 = min(int(centre[0]) + reach + 1, shape[0]), min(int(centre[1]) + reach + 1, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - centre[0], xx - centre[1]
        u = dy * np.cos(angle) + dx * np.sin(angle)
        v = -dy * np.sin(angle) + dx * np.cos(angle)
        distance = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        closer = distance < best[y0:y1, x0:x1]
        best[y0:y1, x0:x1][closer] = distance[closer]
        labels[y0:y1, x0:x1][closer] = index
    return labels


def synthetic_nuclei(shape: tuple[int, int, int], *, seed: int, brightness_range: float = 20.0,
                     radius_range: tuple[float, float] = (6.0, 11.0), density: float = 0.35,
                     cluster_size: int = 4, texture: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fluorescence nuclei time-lapse that is hard in the ways real ones are.

    Returns ``(image uint16 (T, Y, X), labels int32 (T, Y, X), brightness)``: ``brightness[k]``
    is the peak intensity of nucleus ``k`` (id k + 1) relative to the brightest, log-uniform over
    ``brightness_range`` (20 = dim nuclei at 1/20 of the brightest). Elliptical nuclei in clusters
    of up to ``cluster_size`` that touch with no background between them (instance ground truth
    as in the Cell Tracking Challenge), covering about ``density`` of each frame; a textured
    background (out-of-focus blobs up to about the dimmest nuclei's level, times ``texture``);
    blur and signal-dependent noise. Nuclei drift between frames. Deterministic for ``seed``.
    """
    rng = np.random.default_rng(seed)
    frames, height, width = shape
    mean_area = np.pi * np.mean(radius_range) ** 2
    count = max(4, int(density * height * width / mean_area))
    centres, radii, angles = _place_nuclei(rng, height, width, count, radius_range, cluster_size)
    brightness = np.exp(rng.uniform(-np.log(brightness_range), 0.0, len(centres))).astype(np.float32)
    velocity = rng.normal(0, 0.8, (len(centres), 2))
    images, labels = [], []
    for _ in range(frames):
        frame = _nucleus_labels((height, width), centres, radii, angles)
        signal = np.concatenate([[0.0], brightness])[frame].astype(np.float32)
        grain = ndimage.gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), 1.2)
        signal *= 1.0 + 0.3 * grain / (grain.std() + 1e-6)
        haze = ndimage.gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), 6.0)
        haze = np.clip(haze / (haze.std() + 1e-6), 0, None) * (0.6 / brightness_range) * texture
        image = ndimage.gaussian_filter(signal + haze * (frame == 0), 1.0)
        photons = image * 4000.0 + 20.0
        noisy = rng.poisson(np.clip(photons, 0, None)).astype(np.float32) + rng.normal(0, 3.0, photons.shape)
        images.append(np.clip(noisy * 8 + 300, 0, 65535).astype(np.uint16))
        labels.append(frame)
        centres = centres + velocity
    return np.stack(images), np.stack(labels), brightness


def write_demo_data(outdir: str | Path, *, seed: int = default("demo", "seed")) -> list[Path]:
    """Write the demo stacks (and their ground truth) as TIFFs into ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (name, (kind, shape, has_truth)) in enumerate(DEMO_STACKS.items()):
        image, labels = synthetic_cells(shape, seed=seed * 1000 + index, kind=kind)
        axes = "TYX" if kind == "2d+t" else "ZYX"
        metadata = {"axes": axes, "unit": "um"}
        if kind == "3d":
            metadata["spacing"] = 1.0
        path = outdir / f"{name}.tif"
        tifffile.imwrite(path, image, imagej=True, metadata=metadata, resolution=(1.0, 1.0))
        written.append(path)
        if has_truth:
            label_path = outdir / f"{name}_labels.tif"
            tifffile.imwrite(label_path, labels.astype(np.uint16), imagej=True, metadata={"axes": axes})
            written.append(label_path)
    return written
