"""Segmentation metrics on arrays: overlap scores and QC statistics without ground truth.

Arrays: ``(*spatial)`` masks or instance label images; 2D or 3D alike.
"""

from __future__ import annotations

import numpy as np

__all__ = ["foreground_scores", "object_sizes", "probability_qc"]


def foreground_scores(truth: np.ndarray, prediction: np.ndarray) -> dict:
    """IoU (Jaccard) and Dice of the foreground (nonzero) of two masks or label images.

    Both empty: IoU = Dice = 1 (perfect agreement on an empty image), documented so.
    """
    truth, prediction = np.asarray(truth) != 0, np.asarray(prediction) != 0
    if truth.shape != prediction.shape:
        raise ValueError(f"truth and prediction must have the same shape, got {truth.shape} and {prediction.shape}")
    intersection = int(np.count_nonzero(truth & prediction))
    union = int(np.count_nonzero(truth | prediction))
    total = int(np.count_nonzero(truth)) + int(np.count_nonzero(prediction))
    return {
        "iou": intersection / union if union else 1.0,
        "dice": 2 * intersection / total if total else 1.0,
        "intersection": intersection, "union": union, "total": total,
    }


def object_sizes(labels: np.ndarray) -> np.ndarray:
    """Pixel counts of every nonzero label."""
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64))
    return counts[1:][counts[1:] > 0]


def probability_qc(foreground: np.ndarray, *, low: float = 0.2, high: float = 0.8, bins: int = 20) -> dict:
    """Fraction of uncertain pixels (``low < p < high``), mean probability, histogram."""
    foreground = np.asarray(foreground, np.float32)
    histogram, _ = np.histogram(foreground, bins=bins, range=(0.0, 1.0))
    return {
        "uncertain_fraction": float(np.mean((foreground > low) & (foreground < high))),
        "mean_probability": float(foreground.mean()),
        "histogram": histogram.tolist(),
    }
