"""Benchmark: time of every metric of unet_core.metrics on one 512x512 slice.

Ground truth: slice 0 of the ISBI 2012 training labels (../shared/data/isbi2012/train-labels.tif)
when present, else a synthetic membrane image of 150 cells. Proposal: a realistic probability map
made from the ground truth (shifted by (1.5, -1) px, blurred, with noise; seeded). Instance
metrics compare the 4-connected cells of the ground truth with those of ``proposal > 0.5``.

Prints the best time of ``--repeats`` runs and the value of each metric, and whether it meets
the bar: every metric under 1 s, the warping errors under 10 s.

Usage: python bench/metrics.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from unet_core import metrics
from unet_core.qc import StackQC

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012" / "train-labels.tif"
FOUR = ndimage.generate_binary_structure(2, 1)


def synthetic_truth(n_cells: int = 150, size: int = 512, seed: int = 0) -> np.ndarray:
    """Binary membrane image: Voronoi cells (255) separated by about 4 px borders (0), like ISBI 2012."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros((size, size), np.int32)
    seeds[rng.integers(0, size, n_cells), rng.integers(0, size, n_cells)] = np.arange(1, n_cells + 1)
    _, indices = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    cells = seeds[tuple(indices)]
    return np.where(ndimage.morphological_gradient(cells, size=5) > 0, 0, 255).astype(np.uint8)


def proposal_from(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """A plausible interior probability map: shifted, blurred ground truth plus noise."""
    rng = np.random.default_rng(seed)
    interior = ndimage.shift((truth > 0).astype(np.float32), (1.5, -1.0), order=1, mode="nearest")
    noisy = ndimage.gaussian_filter(interior, 2.0) + rng.normal(0.0, 0.15, truth.shape)
    return np.clip(ndimage.gaussian_filter(noisy, 1.0), 0.0, 1.0).astype(np.float32)


def _stack_qc(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """The QC that evaluate records, of one plane (labels, foreground probability, raw)."""
    qc = StackQC()
    qc.add(labels, probabilities, probabilities)
    return qc.result()


def best_time(function, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def show(value) -> str:
    if isinstance(value, dict):
        keys = [k for k in ("mean_ap", "pq", "v_rand", "uncertain_fraction") if k in value]
        if keys:
            return f"{keys[0]}={value[keys[0]]:.4f}"
        return f"{len(value)} classes"
    return f"{value:.6f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if ISBI.exists():
        import tifffile

        truth = tifffile.imread(ISBI)[0]
        source = f"ISBI 2012 train-labels slice 0 ({ISBI})"
    else:
        truth = synthetic_truth()
        source = f"synthetic 512x512, 150 cells (ISBI 2012 labels not found at {ISBI})"
    probabilities = proposal_from(truth)
    cells_true, _ = ndimage.label(truth > 0, FOUR)
    cells_pred, _ = ndimage.label(probabilities > 0.5, FOUR)
    print(f"ground truth: {source}; shape {truth.shape}")
    runs = [
        ("v_rand (11 thresholds)", 1.0, lambda: metrics.v_rand(probabilities, truth)),
        ("v_info (11 thresholds)", 1.0, lambda: metrics.v_info(probabilities, truth)),
        ("rand_error (11 thresholds)", 1.0, lambda: metrics.rand_error(probabilities, truth)),
        ("pixel_error (11 thresholds)", 1.0, lambda: metrics.pixel_error(probabilities, truth)),
        ("warping_error classic (th 0.5)", 10.0, lambda: metrics.warping_error(probabilities, truth)),
        ("warping splits+mergers (10 th.)", 10.0, lambda: metrics.splits_and_mergers_error(probabilities, truth)),
        ("isbi_scores (all five)", 10.0, lambda: metrics.isbi_scores(probabilities, truth)),
        ("seg_score", 1.0, lambda: metrics.seg_score(cells_true, cells_pred)),
        ("average_precision (10 IoU th.)", 1.0, lambda: metrics.average_precision(cells_true, cells_pred)),
        ("panoptic_quality", 1.0, lambda: metrics.panoptic_quality(cells_true, cells_pred)),
        ("class_scores", 1.0, lambda: metrics.class_scores(truth > 0, probabilities > 0.5)),
        ("StackQC (one plane)", 1.0, lambda: _stack_qc(cells_pred, probabilities)),
    ]
    print(f"{'metric':<34} {'best s':>8} {'bar s':>6} {'ok':>4}  value")
    failed = []
    for name, bar, function in runs:
        seconds, value = best_time(function, args.repeats)
        ok = seconds < bar
        failed += [] if ok else [name]
        print(f"{name:<34} {seconds:>8.3f} {bar:>6.0f} {'yes' if ok else 'NO':>4}  {show(value)}")
    print("all metrics within their bars" if not failed else f"over the bar: {', '.join(failed)}")


if __name__ == "__main__":
    main()
