"""Segmentation metrics on arrays: ISBI 2012 scores, instance scores and QC statistics.

Arrays: masks, class maps or instance label images ``(*spatial)``, 2D or 3D alike (0 =
background, one positive integer per object); stacks are ``(Z, Y, X)`` or ``(T, Y, X)`` where a
function works slice by slice. A list of arrays is a sequence of frames, scored pooled.

* With ground truth: :func:`isbi_scores` and the other ISBI 2012 scores (from
  :mod:`unet_core.isbi`), :func:`seg_score` (Cell Tracking Challenge SEG),
  :func:`average_precision` (AP at IoU thresholds), :func:`panoptic_quality`,
  :func:`class_scores` and :func:`foreground_scores` (Dice and IoU); for dense 3D ground truth
  :func:`instance_agreement` (adapted Rand error, VOI split/merge) and
  :func:`boundary_average_precision` (how well a map ranks the true boundary voxels).
* Without ground truth (QC): :func:`object_statistics`, :func:`probability_statistics`,
  :func:`intensity_drift`, :func:`qc_statistics` and :func:`flag_outlier_stacks`, plus the
  per-slice helpers :func:`object_sizes` and :func:`probability_qc`.

Definitions and references: docs/metrics.md. Metrics judge arrays, never networks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .isbi import (ISBI_THRESHOLDS, WARPING_THRESHOLDS, isbi_scores, pixel_error, rand_error,
                   splits_and_mergers_error, thin_borders, v_info, v_rand, warp_ground_truth, warping_error)

__all__ = [
    "foreground_scores", "object_sizes", "probability_qc",
    "isbi_scores", "v_rand", "v_info", "rand_error", "pixel_error", "warping_error",
    "splits_and_mergers_error", "thin_borders", "warp_ground_truth", "ISBI_THRESHOLDS", "WARPING_THRESHOLDS",
    "seg_score", "average_precision", "merges_and_splits", "panoptic_quality", "class_scores", "AP_THRESHOLDS",
    "instance_agreement", "boundary_average_precision",
    "object_statistics", "probability_statistics", "intensity_drift", "qc_statistics", "flag_outlier_stacks",
]

#: IoU thresholds of :func:`average_precision`: 0.5, 0.55, ..., 0.95.
AP_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


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


# ----------------------------------------------------------------------------- instance metrics
def _label_image(labels, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError(f"{name} is empty (shape {labels.shape})")
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label image (0 = background), got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"{name} must hold labels >= 0 (0 = background), got minimum {labels.min()}")
    return labels


def _frames(labels_true, labels_pred) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs of (truth, prediction) frames: one array is one frame, a list is several."""
    true_is_list, pred_is_list = isinstance(labels_true, (list, tuple)), isinstance(labels_pred, (list, tuple))
    if true_is_list != pred_is_list:
        raise ValueError("labels_true and labels_pred must both be arrays or both be lists of frames")
    if not true_is_list:
        labels_true, labels_pred = [labels_true], [labels_pred]
    if len(labels_true) != len(labels_pred):
        raise ValueError(f"got {len(labels_true)} ground-truth frames and {len(labels_pred)} predicted frames")
    if not labels_true:
        raise ValueError("no frames given: pass an array or a non-empty list of arrays")
    pairs = []
    for k, (truth, pred) in enumerate(zip(labels_true, labels_pred)):
        truth, pred = _label_image(truth, "labels_true"), _label_image(pred, "labels_pred")
        if truth.shape != pred.shape:
            raise ValueError(
                f"frame {k}: labels_true and labels_pred must have the same shape, got {truth.shape} and {pred.shape}")
        pairs.append((truth, pred))
    return pairs


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel objects 1..n (0 stays background); return the relabelled image and n."""
    flat = labels.ravel()
    if int(flat.max()) < 4 * flat.size + 4096:
        present = np.flatnonzero(np.bincount(flat))
        lookup = np.zeros(int(flat.max()) + 1, np.int64)
        objects = present[present > 0]
        lookup[objects] = np.arange(1, objects.size + 1)
        return lookup[flat], int(objects.size)
    ids, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.astype(np.int64) + (0 if ids[0] == 0 else 1)
    return inverse, int(ids.size - (ids[0] == 0))


def _overlaps(truth: np.ndarray, pred: np.ndarray):
    """Object sizes and intersections: (true index, pred index, intersection), sizes_true, sizes_pred."""
    t, n_true = _compact(truth)
    p, n_pred = _compact(pred)
    sizes_true = np.bincount(t, minlength=n_true + 1)[1:]
    sizes_pred = np.bincount(p, minlength=n_pred + 1)[1:]
    both = (t > 0) & (p > 0)
    keys = (t[both] - 1) * max(n_pred, 1) + (p[both] - 1)
    keys, counts = np.unique(keys, return_counts=True)
    width = max(n_pred, 1)
    return keys // width, keys % width, counts, sizes_true, sizes_pred


def seg_score(labels_true, labels_pred) -> float:
    """Cell Tracking Challenge SEG: mean Jaccard index of the ground-truth objects.

    Parameters
    ----------
    labels_true, labels_pred : ndarray or list of ndarray
        Instance label images (0 = background), one array per image or volume (2D or 3D); a
        list of arrays is a sequence of frames, whose objects are pooled.

    Returns
    -------
    float
        A ground-truth object R is matched by the predicted object S that covers more than
        half of it (``|R & S| > 0.5 |R|``, so at most one S); its score is the Jaccard index
        ``|R & S| / |R | S|``, and 0 when no object matches. SEG is the mean over all
        ground-truth objects of all frames: 1 = perfect, 0 = no match. NaN when the ground
        truth holds no object at all (SEG is undefined; py-ctcmetrics reports 0 there).

    References
    ----------
    Maška M. et al. (2014) A benchmark for comparison of cell tracking algorithms.
    Bioinformatics 30(11):1609-1617; Ulman V. et al. (2017) Nat. Methods 14:1141-1152.

    Examples
    --------
    >>> seg_score(np.array([[1, 1, 1, 1, 0]]), np.array([[2, 2, 2, 0, 0]]))
    0.75
    """
    total, n_objects = 0.0, 0
    for truth, pred in _frames(labels_true, labels_pred):
        rows, cols, inter, sizes_true, sizes_pred = _overlaps(truth, pred)
        n_objects += sizes_true.size
        matched = 2 * inter > sizes_true[rows]
        total += float(np.sum(inter[matched] / (sizes_true[rows] + sizes_pred[cols] - inter)[matched]))
    return total / n_objects if n_objects else math.nan


def _matches(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """Largest one-to-one matching among pairs with IoU >= threshold."""
    ok = iou >= threshold
    rows, cols = rows[ok], cols[ok]
    if np.unique(rows).size == rows.size and np.unique(cols).size == cols.size:
        return int(rows.size)  # always so above 0.5: an object has at most one partner with IoU > 0.5
    true_ids, r = np.unique(rows, return_inverse=True)
    pred_ids, c = np.unique(cols, return_inverse=True)
    allowed = np.zeros((true_ids.size, pred_ids.size))
    allowed[r, c] = 1.0
    assigned_rows, assigned_cols = linear_sum_assignment(allowed, maximize=True)
    return int(allowed[assigned_rows, assigned_cols].sum())


def average_precision(labels_true, labels_pred, thresholds: Sequence[float] = AP_THRESHOLDS) -> dict:
    """Average precision of instance segmentations at IoU thresholds, one-to-one matching.

    Parameters
    ----------
    labels_true, labels_pred : ndarray or list of ndarray
        Instance label images (0 = background), 2D or 3D; lists are frames, counts pooled.
    thresholds : sequence of float
        IoU thresholds in (0, 1]; default 0.5, 0.55, ..., 0.95.

    Returns
    -------
    dict
        ``thresholds``; per threshold (lists in the same order) ``ap`` = TP / (TP + FP + FN),
        ``tp``, ``fp``, ``fn``, ``precision`` = TP / n_pred, ``recall`` = TP / n_true, ``f1``;
        ``mean_ap`` (the mean of ``ap`` over the thresholds); ``n_true``, ``n_pred``.
        A prediction and a ground-truth object match when their IoU >= threshold, each object
        at most once (the largest such matching: unique above 0.5, Hungarian otherwise). No
        objects in either: every score is 1 (perfect agreement on empty images).

    Notes
    -----
    "AP" as used for cell and nucleus segmentation (DSB 2018, StarDist, Cellpose): there are
    no confidence scores, so the precision at one IoU threshold is TP / (TP + FP + FN).

    Examples
    --------
    >>> result = average_precision(np.array([[1, 1, 0, 2, 2]]), np.array([[1, 1, 0, 0, 0]]), thresholds=[0.5])
    >>> result["ap"], result["tp"], result["fn"]
    ([0.5], [1], [1])
    """
    thresholds = [float(t) for t in np.atleast_1d(np.asarray(thresholds, np.float64))]
    if not thresholds or not all(0.0 < t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds must be a non-empty sequence of IoU values in (0, 1], got {thresholds}")
    tp = np.zeros(len(thresholds), np.int64)
    n_true = n_pred = 0
    for truth, pred in _frames(labels_true, labels_pred):
        rows, cols, inter, sizes_true, sizes_pred = _overlaps(truth, pred)
        iou = inter / (sizes_true[rows] + sizes_pred[cols] - inter)
        n_true, n_pred = n_true + sizes_true.size, n_pred + sizes_pred.size
        tp += [_matches(rows, cols, iou, t) for t in thresholds]
    fp, fn = n_pred - tp, n_true - tp
    ap = _ratios(tp, tp + fp + fn)
    return {
        "thresholds": thresholds, "ap": ap, "mean_ap": float(np.mean(ap)),
        "tp": tp.tolist(), "fp": fp.tolist(), "fn": fn.tolist(),
        "precision": _ratios(tp, np.full_like(tp, n_pred)), "recall": _ratios(tp, np.full_like(tp, n_true)),
        "f1": _ratios(2 * tp, np.full_like(tp, n_true + n_pred)), "n_true": n_true, "n_pred": n_pred,
    }


def merges_and_splits(labels_true, labels_pred) -> dict:
    """Count the ways an instance segmentation goes wrong, pooled over frames.

    Parameters
    ----------
    labels_true, labels_pred : ndarray or list of ndarray
        Instance label images (0 = background), 2D or 3D; lists are frames.

    Returns
    -------
    dict
        ``merges``: predicted objects that hold more than half of each of two or more
        ground-truth objects (SEG's matching rule); ``merged_true``: the ground-truth objects
        inside them; ``splits``: ground-truth objects that hold more than half of each of two
        or more predicted objects; ``missed``: ground-truth objects that no predicted object
        covers by more than half (SEG counts them 0); ``spurious``: predicted objects that hold
        no ground-truth object and lie by at most half in any (noise, fragments of background);
        ``n_true``, ``n_pred``.

    Examples
    --------
    >>> merges_and_splits(np.array([[1, 1, 2, 2, 0, 3]]), np.array([[5, 5, 5, 5, 0, 0]]))["merges"]
    1
    """
    counts = dict.fromkeys(("merges", "merged_true", "splits", "missed", "spurious", "n_true", "n_pred"), 0)
    for truth, pred in _frames(labels_true, labels_pred):
        rows, cols, inter, sizes_true, sizes_pred = _overlaps(truth, pred)
        holds = 2 * inter > sizes_true[rows]  # pred cols[k] holds truth rows[k]
        inside = 2 * inter > sizes_pred[cols]  # pred cols[k] lies mostly inside truth rows[k]
        held_by = np.bincount(cols[holds], minlength=sizes_pred.size)
        contains = np.bincount(rows[inside], minlength=sizes_true.size)
        matched_true = np.zeros(sizes_true.size, bool)
        matched_true[rows[holds]] = True
        anywhere = np.zeros(sizes_pred.size, bool)
        anywhere[cols[inside | holds]] = True
        counts["merges"] += int((held_by >= 2).sum())
        counts["merged_true"] += int(held_by[held_by >= 2].sum())
        counts["splits"] += int((contains >= 2).sum())
        counts["missed"] += int((~matched_true).sum())
        counts["spurious"] += int((~anywhere).sum())
        counts["n_true"] += int(sizes_true.size)
        counts["n_pred"] += int(sizes_pred.size)
    return counts


def instance_agreement(truth: np.ndarray, prediction: np.ndarray) -> dict:
    """Adapted Rand error and variation of information (split, merge) of two label images.

    ``adapted_rand_error`` is 1 - the F-score of pairs of voxels put in the same object (CREMI,
    skimage ``adapted_rand_error``, truth background 0 ignored); lower is better. ``voi_split`` is
    H(prediction | truth), the information (in bits) the prediction adds by
    cutting true objects; ``voi_merge`` is H(truth | prediction), lost by merging them. Their sum
    is the variation of information (skimage ``variation_of_information``).
    """
    from skimage.metrics import adapted_rand_error, variation_of_information

    truth, prediction = np.asarray(truth), np.asarray(prediction)
    if truth.shape != prediction.shape:
        raise ValueError(f"truth {truth.shape} and prediction {prediction.shape} differ in shape")
    # Only the error: skimage's precision and recall of the same call are named the other way
    # round from their docstring (a pure split lowers "precision"); VOI tells splits from merges.
    error = adapted_rand_error(truth, prediction)[0]
    split, merge = variation_of_information(truth, prediction)
    return {"adapted_rand_error": float(error), "voi_split": float(split), "voi_merge": float(merge)}


def boundary_average_precision(score: np.ndarray, boundary: np.ndarray) -> float:
    """Average precision of ``score`` (higher = more likely boundary) at finding ``boundary``.

    The area under the precision-recall curve as a step sum, sum_k (R_k - R_(k-1)) P_k, over
    the distinct score values from the highest down; voxels with equal scores enter together
    (as in scikit-learn's ``average_precision_score``). A random map scores the boundary
    fraction. Any monotone rescaling of ``score`` gives the same value.
    """
    score, boundary = np.asarray(score).ravel(), np.asarray(boundary, bool).ravel()
    if score.shape != boundary.shape:
        raise ValueError(f"score ({score.size} voxels) and boundary ({boundary.size}) differ in size")
    positives = int(boundary.sum())
    if positives == 0:
        raise ValueError("boundary holds no boundary voxel: average precision is undefined")
    order = np.argsort(-score, kind="stable")
    ranked = score[order]
    hits = np.cumsum(boundary[order])
    # The last voxel of each run of equal scores closes one threshold.
    last = np.r_[np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1]
    true_positives = hits[last]
    precision = true_positives / (last + 1)
    recall = true_positives / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _ratios(numerators: np.ndarray, denominators: np.ndarray) -> list[float]:
    """Elementwise ratios; 0 / 0 = 1 (nothing to find and nothing found is perfect)."""
    return [float(a / b) if b else 1.0 for a, b in zip(numerators, denominators)]


def panoptic_quality(labels_true, labels_pred) -> dict:
    """Panoptic quality PQ = SQ x RQ of instance segmentations (Kirillov et al. 2019).

    Objects match when IoU > 0.5 (unique). ``sq`` = mean IoU of the matches, ``rq`` =
    TP / (TP + FP/2 + FN/2), ``pq`` = sum of matched IoU / (TP + FP/2 + FN/2); also ``tp``,
    ``fp``, ``fn``. Lists of frames are pooled. No objects in either: all scores 1.
    No match but objects present: ``sq`` = 0.

    Reference: Kirillov A. et al. (2019) Panoptic segmentation. CVPR, arXiv:1801.00868.
    """
    tp = n_true = n_pred = 0
    iou_sum = 0.0
    for truth, pred in _frames(labels_true, labels_pred):
        rows, cols, inter, sizes_true, sizes_pred = _overlaps(truth, pred)
        iou = inter / (sizes_true[rows] + sizes_pred[cols] - inter)
        tp += int(np.count_nonzero(iou > 0.5))
        iou_sum += float(iou[iou > 0.5].sum())
        n_true, n_pred = n_true + sizes_true.size, n_pred + sizes_pred.size
    fp, fn = n_pred - tp, n_true - tp
    if n_true == n_pred == 0:
        return {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    denominator = tp + fp / 2 + fn / 2
    return {"pq": iou_sum / denominator, "sq": iou_sum / tp if tp else 0.0, "rq": tp / denominator,
            "tp": tp, "fp": fp, "fn": fn}


def class_scores(truth: np.ndarray, prediction: np.ndarray, *, classes: Sequence[int] | None = None) -> dict:
    """Dice and IoU of each class of two class maps (semantic segmentation).

    Parameters
    ----------
    truth, prediction : ndarray of int, same shape
        Class index per pixel.
    classes : sequence of int, optional
        Classes to score; default every class present in either map, background included.

    Returns
    -------
    dict
        ``{class: {"iou", "dice", "support"}}`` with ``support`` the ground-truth pixel count.
        A class absent from both maps scores 1 (perfect agreement), as :func:`foreground_scores`.
    """
    truth, prediction = _label_image(truth, "truth"), _label_image(prediction, "prediction")
    if truth.shape != prediction.shape:
        raise ValueError(f"truth and prediction must have the same shape, got {truth.shape} and {prediction.shape}")
    if classes is None:
        classes = np.union1d(np.unique(truth), np.unique(prediction)).tolist()
    result = {}
    for value in classes:
        scores = foreground_scores(truth == value, prediction == value)
        support = int(np.count_nonzero(truth == value))
        result[int(value)] = {"iou": scores["iou"], "dice": scores["dice"], "support": support}
    return result


# ----------------------------------------------------------------------------- QC without ground truth
def _stack(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be a (Y, X) slice or a (Z, Y, X) / (T, Y, X) stack, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    return array[None] if array.ndim == 2 else array


def _percentiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {key: 0.0 for key in ("min", "p5", "p25", "median", "p75", "p95", "max", "mean")}
    p = np.percentile(values, [0, 5, 25, 50, 75, 95, 100])
    return {"min": float(p[0]), "p5": float(p[1]), "p25": float(p[2]), "median": float(p[3]),
            "p75": float(p[4]), "p95": float(p[5]), "max": float(p[6]), "mean": float(values.mean())}


def object_statistics(labels: np.ndarray) -> dict:
    """Object count and size distribution per slice of a label image or stack.

    Parameters
    ----------
    labels : ndarray, shape (Y, X) or (Z, Y, X)
        Instance labels (0 = background), or a bool mask whose 4-connected components per
        slice are the objects.

    Returns
    -------
    dict
        ``objects_per_slice`` and ``median_size_per_slice`` (pixels; 0 for an empty slice),
        ``sizes`` (distribution over all 2D objects of all slices: min, p5, p25, median, p75,
        p95, max, mean), ``n_objects`` (distinct labels in the whole array, i.e. 3D objects;
        for a mask, its 6-connected components).
    """
    stack = _stack(labels, "labels")
    if stack.dtype == bool:
        n_objects = ndimage.label(stack, ndimage.generate_binary_structure(3, 1))[1]
        stack = np.stack([ndimage.label(s, ndimage.generate_binary_structure(2, 1))[0] for s in stack])
    else:
        stack = _label_image(stack, "labels")
        n_objects = np.count_nonzero(np.bincount(stack.ravel().astype(np.int64))[1:])
    per_slice = [object_sizes(s) for s in stack]
    everything = np.concatenate(per_slice)
    return {
        "objects_per_slice": [int(s.size) for s in per_slice],
        "median_size_per_slice": [float(np.median(s)) if s.size else 0.0 for s in per_slice],
        "sizes": _percentiles(everything.astype(np.float64)),
        "n_objects": int(n_objects),
    }


def probability_statistics(probabilities: np.ndarray, *, low: float = 0.2, high: float = 0.8, bins: int = 20) -> dict:
    """Probability histogram and uncertain fraction of a probability map or stack, per slice and overall.

    ``uncertain`` pixels have ``low < p < high``. Returns ``histogram`` (``bins`` counts over
    [0, 1]), ``uncertain_fraction`` and ``mean_probability`` (overall), and
    ``uncertain_fraction_per_slice``, ``mean_probability_per_slice``.
    """
    stack = _stack(probabilities, "probabilities").astype(np.float32, copy=False)
    low_value, high_value = float(stack.min()), float(stack.max())
    if not (0.0 <= low_value and high_value <= 1.0):
        raise ValueError(f"probabilities must be finite values in [0, 1], got range [{low_value}, {high_value}]")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    per_slice = [probability_qc(s, low=low, high=high, bins=bins) for s in stack]
    histogram = np.sum([q["histogram"] for q in per_slice], axis=0)
    return {
        "histogram": histogram.astype(int).tolist(),
        "uncertain_fraction": float(np.mean([q["uncertain_fraction"] for q in per_slice])),
        "mean_probability": float(np.mean([q["mean_probability"] for q in per_slice])),
        "uncertain_fraction_per_slice": [q["uncertain_fraction"] for q in per_slice],
        "mean_probability_per_slice": [q["mean_probability"] for q in per_slice],
    }


def intensity_drift(image: np.ndarray) -> dict:
    """Drift of the mean intensity along the first axis (z or t) of a stack.

    Returns ``slice_means``; ``slope`` (least-squares change of the slice mean per slice);
    ``relative_drift`` = slope x (n_slices - 1) / |mean of the slice means| (the fitted change
    from first to last slice, as a fraction of the mean level); ``max_relative_deviation`` =
    max |slice mean - median| / |median|. A single slice has no drift (all 0); a zero mean
    level gives 0 when the slices agree and ``inf`` otherwise.
    """
    stack = _stack(image, "image")
    if not (np.issubdtype(stack.dtype, np.number) or stack.dtype == bool):
        raise TypeError(f"image must be numeric, got dtype {stack.dtype}")
    means = stack.reshape(stack.shape[0], -1).astype(np.float64).mean(axis=1)
    if not np.all(np.isfinite(means)):
        raise ValueError("image holds NaN or infinite values")
    n = means.size
    x = np.arange(n) - (n - 1) / 2
    slope = float(x @ (means - means.mean()) / (x @ x)) if n > 1 else 0.0
    level, median = abs(float(means.mean())), float(np.median(means))
    spread = float(np.max(np.abs(means - median)))

    def relative(value: float, scale: float) -> float:
        return value / scale if scale else (0.0 if value == 0 else math.inf)

    return {"slice_means": means.tolist(), "slope": slope, "relative_drift": relative(slope * (n - 1), level),
            "max_relative_deviation": relative(spread, abs(median))}


def qc_statistics(*, probabilities: np.ndarray | None = None, labels: np.ndarray | None = None,
                  image: np.ndarray | None = None, low: float = 0.2, high: float = 0.8, bins: int = 20) -> dict:
    """QC statistics of one stack without ground truth, and a flat ``summary`` for batch comparison.

    Parameters
    ----------
    probabilities : ndarray, optional
        Foreground probability, (Y, X) or (Z, Y, X), values in [0, 1].
    labels : ndarray, optional
        Instance labels or a mask, same layout.
    image : ndarray, optional
        Raw intensities, same layout, for the drift along z/t.
    low, high, bins
        Uncertainty band and histogram bins of the probabilities.

    Returns
    -------
    dict
        ``objects`` (:func:`object_statistics`), ``probabilities``
        (:func:`probability_statistics`), ``intensity`` (:func:`intensity_drift`) for the
        inputs given, and ``summary``: scalar features (``mean_objects_per_slice``,
        ``median_object_size``, ``uncertain_fraction``, ``mean_probability``,
        ``mean_intensity``, ``relative_intensity_drift``) for :func:`flag_outlier_stacks`.
    """
    if probabilities is None and labels is None and image is None:
        raise ValueError("give at least one of probabilities, labels or image")
    result: dict = {"summary": {}}
    if labels is not None:
        objects = object_statistics(labels)
        result["objects"] = objects
        result["summary"]["mean_objects_per_slice"] = float(np.mean(objects["objects_per_slice"]))
        result["summary"]["median_object_size"] = objects["sizes"]["median"]
    if probabilities is not None:
        probability = probability_statistics(probabilities, low=low, high=high, bins=bins)
        result["probabilities"] = probability
        result["summary"]["uncertain_fraction"] = probability["uncertain_fraction"]
        result["summary"]["mean_probability"] = probability["mean_probability"]
    if image is not None:
        drift = intensity_drift(image)
        result["intensity"] = drift
        result["summary"]["mean_intensity"] = float(np.mean(drift["slice_means"]))
        result["summary"]["relative_intensity_drift"] = drift["relative_drift"]
    return result


def flag_outlier_stacks(summaries: Mapping[str, Mapping[str, float]], *, threshold: float = 3.5,
                        min_stacks: int = 4) -> dict:
    """Flag stacks whose QC summary is an outlier against the rest of the batch.

    Parameters
    ----------
    summaries : mapping
        ``{stack: {feature: value}}``, e.g. the ``summary`` of :func:`qc_statistics` per stack.
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
