"""Benchmark: unet_core.weight_map against the per-cell definition, measured in the same run.

Prints, for ISBI 2012 label slices (when ../shared is present) and for synthetic images of 50,
150 and 400 cells, the time of the reference (one Euclidean distance transform of the whole
image per cell, then the two smallest distances per pixel), the time of weight_map, and the
ratio. Also checks both agree to 1e-4.

Usage: python bench/weight_map.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from unet_core import instances_from_binary, weight_map
from unet_core.weights import class_balance

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012" / "train-labels.tif"


def reference(labels, w0=10.0, sigma=5.0):
    weights = class_balance(labels)
    ids = [i for i in np.unique(labels) if i > 0]
    distances = np.stack([ndimage.distance_transform_edt(labels != i) for i in ids])
    distances.partition(1, axis=0)
    background = labels == 0
    weights[background] += (w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2)))[background]
    return weights


def synthetic(n_cells, size=512, seed=0):
    rng = np.random.default_rng(seed)
    seeds = np.zeros((size, size), np.int32)
    seeds[rng.integers(0, size, n_cells), rng.integers(0, size, n_cells)] = np.arange(1, n_cells + 1)
    _, indices = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(indices)]
    labels[ndimage.morphological_gradient(labels, size=3) > 0] = 0  # 1-2 px membranes
    return instances_from_binary(labels > 0)


def best_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def measure(name, labels, repeats):
    t_ref, expected = best_time(lambda: reference(labels), repeats)
    t_fast, got = best_time(lambda: weight_map(labels), repeats)
    error = float(np.abs(expected - got).max())
    cells = len(np.unique(labels)) - 1
    print(f"{name:<18} {cells:>6} {t_ref * 1e3:>12.1f} {t_fast * 1e3:>12.1f} {t_ref / t_fast:>8.1f}x {error:>10.1e}")
    return t_fast, t_ref


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'image':<18} {'cells':>6} {'reference ms':>12} {'weight_map ms':>12} {'speed-up':>9} {'max |diff|':>10}")
    if ISBI.exists():
        import tifffile

        stack = tifffile.imread(ISBI)
        ratios = []
        for index in (0, 10, 20, 29):
            t_fast, t_ref = measure(f"ISBI slice {index}", instances_from_binary(stack[index]), args.repeats)
            ratios.append(t_ref / t_fast)
        print(f"ISBI 2012: weight_map is {min(ratios):.1f}x (min) to {max(ratios):.1f}x faster than the per-cell reference")
    else:
        print(f"(ISBI 2012 labels not found at {ISBI}; synthetic images only)")
    fast, ref = {}, {}
    for n in (50, 150, 400):
        fast[n], ref[n] = measure("synthetic 512^2", synthetic(n), args.repeats)
    print(f"growth 50 -> 400 cells (8x): weight_map {fast[400] / fast[50]:.2f}x, reference {ref[400] / ref[50]:.2f}x")


if __name__ == "__main__":
    main()
