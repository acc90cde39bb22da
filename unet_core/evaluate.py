"""Per-stack evaluation stage: metrics against ground truth where it exists, QC always."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from . import io
from .metrics import foreground_scores, object_sizes, probability_qc

__all__ = ["evaluate_stack"]


def evaluate_stack(*, image_path: str | Path, probabilities_path: str | Path, segmentation_path: str | Path,
                   output_path: str | Path, stack: str, role: str) -> dict:
    """Write ``output_path`` (JSON): QC statistics, and IoU/Dice when ground truth exists."""
    probs = io.open_image(probabilities_path)
    segmentation = io.open_image(segmentation_path)
    truth = io.read_labels(image_path)
    scale = float(probs.attrs.get("unet_core", {}).get("probability_scale", 1.0))
    axes = segmentation.axes
    loop_axes = [a for a in axes if a not in "yx"]
    totals = {"intersection": 0, "union": 0, "total": 0}
    counts, sizes, qc_hist, uncertain = [], [], np.zeros(20, np.int64), []
    for position in itertools.product(*[range(segmentation.shape[axes.index(a)]) for a in loop_axes]):
        where = dict(zip(loop_axes, position))
        labels = segmentation.read(where, order=("y", "x"))
        foreground = probs.read({**where, "c": 1}, order=("y", "x")).astype(np.float32) / scale
        plane_sizes = object_sizes(labels)
        counts.append(int(len(plane_sizes)))
        sizes.extend(plane_sizes.tolist())
        qc = probability_qc(foreground)
        qc_hist += np.asarray(qc["histogram"])
        uncertain.append(qc["uncertain_fraction"])
        if truth is not None:
            scores = foreground_scores(truth.read(where, order=("y", "x")), labels)
            for key in totals:
                totals[key] += scores[key]
    result = {
        "stack": stack, "role": role, "has_ground_truth": truth is not None,
        "qc": {
            "objects_per_plane": counts, "mean_objects_per_plane": float(np.mean(counts)) if counts else 0.0,
            "object_size_median": float(np.median(sizes)) if sizes else 0.0,
            "object_sizes": sizes[:5000], "uncertain_fraction": float(np.mean(uncertain)) if uncertain else 0.0,
            "probability_histogram": qc_hist.tolist(),
        },
    }
    if truth is not None:
        result["metrics"] = {
            "foreground_iou": totals["intersection"] / totals["union"] if totals["union"] else 1.0,
            "foreground_dice": 2 * totals["intersection"] / totals["total"] if totals["total"] else 1.0,
        }
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, output_path)
    return result
