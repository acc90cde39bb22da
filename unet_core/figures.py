"""The report's figures, as base64 PNG: representative planes with their segmentation outlined,
probability and object-size histograms, and the training curves."""

from __future__ import annotations

import base64
import csv
import io as _io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import io

__all__ = ["plane_images", "histogram_figure", "training_figure", "representative_planes", "figure_png", "array_png"]

_MAX_PLANE_PIXELS = 512  # longest edge of a plane image in the report (strided above that)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure) -> str:
    plt = _pyplot()
    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def array_png(array: np.ndarray, **kwargs) -> str:
    from matplotlib.image import imsave

    buffer = _io.BytesIO()
    imsave(buffer, array, format="png", **kwargs)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def representative_planes(counts: Sequence[int], n_planes: int) -> list[tuple[int, str]]:
    """Up to three plane indices: most objects, the middle plane, fewest objects."""
    if n_planes <= 1:
        return [(0, "the only plane")]
    picks: dict[int, list[str]] = {}
    if len(counts) == n_planes:
        picks.setdefault(int(np.argmax(counts)), []).append(f"most objects ({max(counts)})")
    picks.setdefault(n_planes // 2, []).append("middle plane")
    if len(counts) == n_planes:
        picks.setdefault(int(np.argmin(counts)), []).append(f"fewest objects ({min(counts)})")
    return [(index, ", ".join(reasons)) for index, reasons in sorted(picks.items())]


def plane_images(image_path: Path, segmentation_path: Path, counts: Sequence[int]) -> list[dict]:
    """Raw and predicted-boundary overlay of a few representative planes, one plane read at a time."""
    from skimage.segmentation import find_boundaries

    image = io.open_image(image_path)
    labels = io.open_image(segmentation_path)
    loop_axes = [a for a in labels.axes if a not in "yx"]
    loop_shape = [labels.shape[labels.axes.index(a)] for a in loop_axes]
    planes = []
    for index, reason in representative_planes(counts, int(np.prod(loop_shape)) if loop_shape else 1):
        where = {a: int(i) for a, i in zip(loop_axes, np.unravel_index(index, loop_shape))} if loop_axes else {}
        raw = image.read({**where, **({"c": 0} if "c" in image.axes else {})}, order=("y", "x"))
        segmentation = labels.read(where, order=("y", "x"))
        step = max(1, math.ceil(max(raw.shape) / _MAX_PLANE_PIXELS))
        raw = raw[::step, ::step].astype(np.float32)
        segmentation = segmentation[::step, ::step]
        low, high = np.percentile(raw, [1, 99.5])
        raw = np.clip((raw - low) / max(high - low, 1e-6), 0, 1)
        overlay = np.repeat(raw[..., None], 3, axis=-1)
        overlay[find_boundaries(segmentation, mode="inner")] = (1.0, 0.2, 0.1)
        position = ", ".join(f"{a}={i}" for a, i in where.items()) or "2D image"
        planes.append({
            "position": position, "reason": reason, "objects": int(counts[index]) if index < len(counts) else None,
            "channel": "channel 0" if "c" in image.axes else None, "step": step,
            "raw": array_png(raw, cmap="gray", vmin=0.0, vmax=1.0), "overlay": array_png(overlay),
        })
    return planes


def histogram_figure(result: dict) -> str:
    """Probability histogram, object size histogram, and per-plane objects and intensity."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator, NullFormatter

    qc = result["qc"]
    per_plane = len(qc.get("objects_per_plane", [])) > 1
    figure, axes = plt.subplots(1, 3 if per_plane else 2, figsize=(13 if per_plane else 9, 2.8))
    histogram = np.asarray(qc.get("probability_histogram", []), float)
    if histogram.size:
        edges = np.linspace(0, 1, histogram.size + 1)
        axes[0].bar(edges[:-1], np.maximum(histogram, 0.5), width=np.diff(edges), align="edge", color="#4a7ab5")
        axes[0].set_yscale("log")
    axes[0].set_xlabel("foreground probability")
    axes[0].set_ylabel("pixels")
    axes[0].set_title("probability histogram")
    sizes = np.asarray(qc.get("object_sizes", []), float)
    sizes = sizes[sizes > 0]
    if sizes.size and sizes.max() > 10 * sizes.min():
        axes[1].hist(sizes, bins=np.geomspace(sizes.min(), sizes.max(), 30), color="#5a9e6f")
        axes[1].set_xscale("log")
        axes[1].xaxis.set_minor_formatter(NullFormatter())
    elif sizes.size:
        axes[1].hist(sizes, bins=30 if sizes.max() > sizes.min() else 1, color="#5a9e6f")
    else:
        axes[1].text(0.5, 0.5, "no objects", ha="center", va="center", transform=axes[1].transAxes)
    axes[1].set_xlabel("object size (px)")
    axes[1].set_ylabel("objects")
    axes[1].set_title("object sizes")
    if per_plane:
        counts = qc["objects_per_plane"]
        axes[2].plot(range(len(counts)), counts, "o-", color="#b35900", label="objects")
        axes[2].set_xlabel("plane")
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2].set_ylabel("objects", color="#b35900")
        intensity = qc.get("mean_intensity_per_plane") or []
        if len(intensity) == len(counts):
            twin = axes[2].twinx()
            twin.plot(range(len(intensity)), intensity, "s--", color="#555555", markersize=3)
            twin.set_ylabel("mean intensity", color="#555555")
        axes[2].set_title("per plane")
    figure.tight_layout()
    return figure_png(figure)


def training_figure(log_path: Path) -> str | None:
    if not log_path.exists():
        return None
    with open(log_path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    steps = [int(r["step"]) for r in rows]
    axes[0].plot(steps, [float(r["loss"]) for r in rows], label="training loss")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        axes[0].plot(*zip(*val), "o-", label="validation loss")
    iou = [(int(r["step"]), float(r["val_iou"])) for r in rows if r.get("val_iou")]
    if iou:
        axes[1].plot(*zip(*iou), "o-", color="#5a9e6f")
        axes[1].set_ylabel("validation foreground IoU")
    else:
        axes[1].text(0.5, 0.5, "no validation stacks", ha="center", va="center", transform=axes[1].transAxes)
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].set_ylabel("weighted cross-entropy")
    axes[0].legend()
    figure.tight_layout()
    return figure_png(figure)


