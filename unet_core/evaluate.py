"""Per-stack evaluation stage: metrics against ground truth where it exists, QC always.

Planes are read one at a time (a 2D plane, or a 3D volume per t for 3D models' outputs as
stored plane-wise on their z axis), so memory follows the plane size; instance and pixel
counts are pooled over planes. The ISBI 2012 scores need the whole (small) stack at once.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from . import io
from .atomic import write_text
from .defaults import default, section
from .isbi import isbi_scores
from .metrics import (average_precision, boundary_average_precision, foreground_scores, instance_agreement,
                      merges_and_splits, seg_score)
from .qc import StackQC
from .segment import seeded_watershed
from .weights import LABEL_KINDS, true_boundaries

__all__ = ["evaluate_stack", "DEFAULT_BASELINE"]

# The classical baseline of dense ground truth: seeded watershed of the boundary stain smoothed
# by a Gaussian of sigma voxels, seeds at its h-minima (h in the stain's grey levels).
DEFAULT_BASELINE = section("evaluate", "baseline")


def _dense_scores(image, probs, segmentation, truth, scale: float, baseline: dict) -> dict:
    """Volume scores against dense instance ground truth, pooled over t (see evaluate_stack)."""
    axes = segmentation.axes
    spatial = tuple(a for a in "zyx" if a in axes)
    loops = [a for a in axes if a not in spatial]
    scores, learned, stain, boundary, truths, predicted, classical = {}, [], [], [], [], [], []
    for position in itertools.product(*[range(segmentation.shape[axes.index(a)]) for a in loops]):
        where = dict(zip(loops, position))
        true_labels = truth.read(where, order=spatial)
        raw = image.read({**where, **({"c": 0} if "c" in image.axes else {})}, order=spatial).astype(np.float32)
        truths.append(true_labels)
        predicted.append(segmentation.read(where, order=spatial))
        classical.append(seeded_watershed(raw, sigma=baseline["sigma"], h=baseline["h"]))
        boundary.append(true_boundaries(true_labels))
        learned.append(1.0 - probs.read({**where, "c": 1}, order=spatial).astype(np.float32) / scale)
        stain.append(raw)
    truths, boundary = np.stack(truths), np.stack(boundary)
    scores.update(instance_agreement(truths, np.stack(predicted)))
    scores["boundary_ap"] = boundary_average_precision(np.stack(learned), boundary)
    scores["stain_boundary_ap"] = boundary_average_precision(np.stack(stain), boundary)
    scores["baseline"] = {"method": "seeded watershed of the smoothed boundary stain (no learning)", **baseline,
                          **instance_agreement(truths, np.stack(classical))}
    return scores


def evaluate_stack(*, image_path: str | Path, probabilities_path: str | Path, segmentation_path: str | Path,
                   output_path: str | Path, stack: str, role: str,
                   ground_truth: str = default("weight_map", "labels"),
                   baseline: dict | None = None) -> dict:
    """Write ``output_path`` (JSON): QC statistics, and metrics when ground truth exists.

    ``ground_truth`` says what the stack's ``labels/ground_truth`` holds: ``instances``
    (instance ids: foreground IoU/Dice, CTC SEG, AP at IoU 0.5..0.95, and the counts of
    :func:`unet_core.metrics.merges_and_splits`: merges, splits, missed, spurious) or ``binary``
    (ISBI 2012 style, nonzero = interior: the official ISBI scores V_rand, V_info, Rand,
    warping and pixel error on the interior probability, plus foreground IoU/Dice) or ``dense``
    (instance ids with no background, e.g. tissue; scored over whole volumes: adapted Rand error
    and VOI split/merge of the segmentation; average precision of the boundary map
    1 - interior probability, and of the raw stain, at finding the true boundaries (voxels
    whose 6-neighbourhood holds another id); and the same Rand/VOI of the classical
    ``baseline``, a seeded watershed of the smoothed stain, :data:`DEFAULT_BASELINE`).
    """
    if ground_truth not in LABEL_KINDS:
        raise ValueError(f"ground_truth must be one of {LABEL_KINDS}, got {ground_truth!r}")
    image = io.open_image(image_path)
    probs = io.open_image(probabilities_path)
    segmentation = io.open_image(segmentation_path)
    truth = io.read_labels(image_path)
    scale = float(probs.attrs.get("unet_core", {}).get("probability_scale", 1.0))
    axes = segmentation.axes
    loop_axes = [a for a in axes if a not in "yx"]
    totals = {"intersection": 0, "union": 0, "total": 0}
    qc = StackQC()
    truth_frames, pred_frames, isbi_probs, isbi_truth = [], [], [], []
    for position in itertools.product(*[range(segmentation.shape[axes.index(a)]) for a in loop_axes]):
        where = dict(zip(loop_axes, position))
        labels = segmentation.read(where, order=("y", "x"))
        foreground = probs.read({**where, "c": 1}, order=("y", "x")).astype(np.float32) / scale
        raw = image.read({**where, **({"c": 0} if "c" in image.axes else {})}, order=("y", "x"))
        qc.add(labels, foreground, raw)
        if truth is None or ground_truth == "dense":  # dense: scored as whole volumes below
            continue
        true_plane = truth.read(where, order=("y", "x"))
        scores = foreground_scores(true_plane, labels)
        for key in totals:
            totals[key] += scores[key]
        if ground_truth == "instances":
            truth_frames.append(true_plane)
            pred_frames.append(labels)
        else:
            isbi_probs.append(foreground)
            isbi_truth.append(true_plane != 0)
    result = {"stack": stack, "role": role, "has_ground_truth": truth is not None, "qc": qc.result()}
    if truth is not None:
        # Dense ground truth is all foreground: its IoU would say nothing.
        metrics = {} if ground_truth == "dense" else {
            "foreground_iou": totals["intersection"] / totals["union"] if totals["union"] else 1.0,
            "foreground_dice": 2 * totals["intersection"] / totals["total"] if totals["total"] else 1.0,
        }
        if ground_truth == "instances":
            ap = average_precision(truth_frames, pred_frames)
            metrics.update({"seg": seg_score(truth_frames, pred_frames), "ap50": ap["ap"][0],
                            "mean_ap": ap["mean_ap"], "ap": dict(zip(map(str, ap["thresholds"]), ap["ap"])),
                            **merges_and_splits(truth_frames, pred_frames)})
        elif ground_truth == "dense":
            metrics.update(_dense_scores(image, probs, segmentation, truth, scale,
                                         {**DEFAULT_BASELINE, **(baseline or {})}))
        else:
            metrics.update(isbi_scores(np.stack(isbi_probs), np.stack(isbi_truth).astype(np.uint8)))
        result["metrics"] = metrics
    write_text(output_path, json.dumps(result, indent=2, allow_nan=True))
    return result
