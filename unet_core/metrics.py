"""Segmentation metrics on arrays: ISBI 2012 scores and instance scores against ground truth.

Arrays: masks, class maps or instance label images ``(*spatial)``, 2D or 3D alike (0 =
background, one positive integer per object); stacks are ``(Z, Y, X)`` or ``(T, Y, X)`` where a
function works slice by slice. A list of arrays is a sequence of frames, scored pooled.

* With ground truth: :func:`isbi_scores` and the other ISBI 2012 scores (from
  :mod:`unet_core.isbi`), :func:`seg_score` (Cell Tracking Challenge SEG),
  :func:`average_precision` (AP at IoU thresholds), :func:`panoptic_quality`,
  :func:`class_scores` and :func:`foreground_scores` (Dice and IoU); for dense 3D ground truth
  :func:`instance_agreement` (adapted Rand error, VOI split/merge) and
  :func:`boundary_average_precision` (how well a map ranks the true boundary voxels).
* Without ground truth, the QC of a stack and of a batch: :mod:`unet_core.qc`.

Definitions and references: docs/metrics.md. Metrics judge arrays, never networks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from .isbi import (ISBI_THRESHOLDS, WARPING_THRESHOLDS, isbi_scores, pixel_error, rand_error,
                   splits_and_mergers_error, thin_borders, v_info, v_rand, warp_ground_truth, warping_error)

__all__ = [
    "foreground_scores",
    "isbi_scores", "v_rand", "v_info", "rand_error", "pixel_error", "warping_error",
    "splits_and_mergers_error", "thin_borders", "warp_ground_truth", "ISBI_THRESHOLDS", "WARPING_THRESHOLDS",
    "seg_score", "average_precision", "merges_and_splits", "panoptic_quality", "class_scores", "AP_THRESHOLDS",
    "instance_agreement", "boundary_average_precision",
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
