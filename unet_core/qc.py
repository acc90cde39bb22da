"""Quality control without ground truth: of one stack, plane by plane, and of a batch.

A stack's QC (:class:`StackQC`) is what ``evaluate`` records for every predicted stack and the
report shows: objects per plane and their sizes, how uncertain the probabilities are, and how
the mean raw intensity drifts along t or z. Across a batch, :func:`flag_outlier_stacks` marks
the stacks whose QC stands out (robust z-scores), for the report's QC flags. Arrays are 2D
planes ``(Y, X)``; a stack is fed one plane at a time, so memory stays that of one plane.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["StackQC", "object_sizes", "probability_qc", "relative_drift", "flag_outlier_stacks"]

# Pixels with a foreground probability in (UNCERTAIN_LOW, UNCERTAIN_HIGH) count as uncertain.
UNCERTAIN_LOW, UNCERTAIN_HIGH = 0.2, 0.8
HISTOGRAM_BINS = 20
# Object sizes recorded per stack (for the report's histogram), at most.
MAX_SIZES = 5000


def object_sizes(labels: np.ndarray) -> np.ndarray:
    """Pixel counts of every nonzero label."""
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64))
    return counts[1:][counts[1:] > 0]


def probability_qc(foreground: np.ndarray, *, low: float = UNCERTAIN_LOW, high: float = UNCERTAIN_HIGH,
                   bins: int = HISTOGRAM_BINS) -> dict:
    """Fraction of uncertain pixels (``low < p < high``), mean probability, histogram."""
    foreground = np.asarray(foreground, np.float32)
    histogram, _ = np.histogram(foreground, bins=bins, range=(0.0, 1.0))
    return {
        "uncertain_fraction": float(np.mean((foreground > low) & (foreground < high))),
        "mean_probability": float(foreground.mean()),
        "histogram": histogram.tolist(),
    }


def relative_drift(means) -> float:
    """The least-squares change of ``means`` from first to last plane, as a fraction of their mean.

    ``slope x max(n - 1, 1) / mean``; 0 for a single plane or a zero mean.

    >>> round(relative_drift([10.0, 12.0, 14.0, 16.0]), 4)  # slope 2 over 3 steps, mean 13
    0.4615
    """
    means = [float(m) for m in means]
    mean = float(np.mean(means)) if means else 0.0
    if not mean:
        return 0.0
    slope = float(np.polyfit(np.arange(len(means)), means, 1)[0]) if len(means) >= 2 else 0.0
    return slope * max(len(means) - 1, 1) / mean


class StackQC:
    """The QC of one stack, accumulated plane by plane (:meth:`add`), as :meth:`result`."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.sizes: list[int] = []
        self.histogram = np.zeros(HISTOGRAM_BINS, np.int64)
        self.uncertain: list[float] = []
        self.intensity: list[float] = []

    def add(self, labels: np.ndarray, foreground: np.ndarray, raw: np.ndarray) -> None:
        """One plane: its instance labels, foreground probability in [0, 1] and raw intensities."""
        self.intensity.append(float(raw.mean()))
        plane_sizes = object_sizes(labels)
        self.counts.append(int(len(plane_sizes)))
        self.sizes.extend(plane_sizes.tolist())
        qc = probability_qc(foreground)
        self.histogram += np.asarray(qc["histogram"])
        self.uncertain.append(qc["uncertain_fraction"])

    def result(self) -> dict:
        """``objects_per_plane``, ``mean_objects_per_plane``, ``object_size_median``,
        ``object_sizes`` (the first :data:`MAX_SIZES`), ``uncertain_fraction`` (mean over
        planes), ``probability_histogram``, ``mean_intensity_per_plane`` and
        ``relative_intensity_drift`` (:func:`relative_drift`)."""
        return {
            "objects_per_plane": self.counts,
            "mean_objects_per_plane": float(np.mean(self.counts)) if self.counts else 0.0,
            "object_size_median": float(np.median(self.sizes)) if self.sizes else 0.0,
            "object_sizes": self.sizes[:MAX_SIZES],
            "uncertain_fraction": float(np.mean(self.uncertain)) if self.uncertain else 0.0,
            "probability_histogram": self.histogram.tolist(),
            "mean_intensity_per_plane": self.intensity,
            "relative_intensity_drift": relative_drift(self.intensity),
        }


def flag_outlier_stacks(summaries: Mapping[str, Mapping[str, float]], *, threshold: float = 3.5,
                        min_stacks: int = 4) -> dict:
    """Flag stacks whose QC summary is an outlier against the rest of the batch.

    Parameters
    ----------
    summaries : mapping
        ``{stack: {feature: value}}``, e.g. scalar QC features per stack.
    threshold : float
        A feature is an outlier when its modified z-score exceeds this in absolute value
        (Iglewicz & Hoaglin's 3.5).
    min_stacks : int
        Fewer stacks with a finite value of a feature than this: no judgement on it (z = 0).

    Returns
    -------
    dict
        ``{stack: {"outlier": bool, "reasons": [features], "z_scores": {feature: z}}}``.

    Notes
    -----
    Modified z-score ``z = 0.6745 (x - median) / MAD`` per feature over the batch (robust to
    the outliers it looks for). When MAD = 0, the mean absolute deviation is used,
    ``z = (x - median) / (1.2533 meanAD)``; when that is 0 too, all values are equal and z = 0.
    Non-finite values are not judged. Reference: Iglewicz B., Hoaglin D. (1993) How to detect
    and handle outliers. ASQC Quality Press.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    for stack, values in summaries.items():
        for feature, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ValueError(f"summary of stack {stack!r}: feature {feature!r} must be a number, got {value!r}")
    names = sorted({feature for values in summaries.values() for feature in values})
    result = {stack: {"outlier": False, "reasons": [], "z_scores": {}} for stack in summaries}
    for feature in names:
        stacks = [s for s, values in summaries.items() if feature in values and np.isfinite(float(values[feature]))]
        x = np.array([float(summaries[s][feature]) for s in stacks])
        z = np.zeros(x.size)
        if x.size >= max(min_stacks, 2):
            median = np.median(x)
            mad = np.median(np.abs(x - median))
            mean_ad = np.mean(np.abs(x - median))
            if mad > 0:
                z = 0.6745 * (x - median) / mad
            elif mean_ad > 0:
                z = (x - median) / (1.253314 * mean_ad)
        for stack, score in zip(stacks, z):
            result[stack]["z_scores"][feature] = float(score)
            if abs(score) > threshold:
                result[stack]["outlier"] = True
                result[stack]["reasons"].append(feature)
    return result
