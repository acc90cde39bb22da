"""ISBI 2012 segmentation scores, computed as the official Fiji evaluation computes them.

Arrays: a ground truth and a proposal of shape ``(Y, X)`` or a stack ``(Z, Y, X)``. Stacks are
scored slice by slice, as the official scripts do (the challenge data are 2D sections).

* Ground truth: binary, ``0`` = membrane (border) and one positive value = cell interior
  (``train-labels.tif`` of ISBI 2012 holds 0 and 255; ``bool`` and 0/1 work too).
* Proposal: probability of *interior* in ``[0, 1]`` (same polarity as the ground truth) or a
  binary 0/1 map. It is cast to float32 first, as Fiji reads 32-bit images, and a pixel is
  interior when ``value > threshold``.

The scores and the Fiji classes they reproduce (Trainable_Segmentation ``metrics/``):

``v_rand``
    ``RandError.getMaximalVRandAfterThinning(0, 1, 0.1, perSliceAverage=true)``: the
    foreground-restricted Rand F-score after border thinning, averaged over slices, best of
    the thresholds. Higher is better (1 = perfect).
``v_info``
    ``VariationOfInformation.getMaximalVInfoAfterThinning(0, 1, 0.1)``: the information
    theoretic analogue (F-score of the two normalised mutual informations). Higher is better.
``rand_error``
    ``1 - RandError.getForegroundRestrictedRandIndexMaximalFScore(0, 1, 0.1)``: the original
    2012 "Rand error", without thinning, pair counts pooled over slices. Lower is better.
``pixel_error``
    ``1 - PixelError.getPixelErrorMaximalFScore(0, 1, 0.1)``: 1 - best pixel F-score of the
    interior class, counts pooled over slices. Lower is better.
``warping_error``
    ``WarpingError.getMinimumSplitsAndMergersErrorValue(0, 0.9, 0.1, false, 20)``: pixels that
    remain split or merge errors after warping the ground truth onto the binarised proposal
    by simple-point flips, over all pixels, smallest over the thresholds. Lower is better.
    :func:`warping_error` gives the classic warping error (all remaining mismatches).

The thresholds are those of Fiji's loop ``for (th = 0; th <= 1; th += 0.1)``, including its
floating-point drift (0.30000000000000004, ..., 0.9999999999999999): see ``ISBI_THRESHOLDS``.

Notes
-----
Definitions, with ``n_ij`` the number of ground-truth interior pixels in ground-truth object
``i`` (4-connected component of the interior) and proposal object ``j``:

* Only ground-truth interior pixels count (``n = sum_ij n_ij``). Proposal pixels that are
  border (label 0) inside the ground-truth interior are singletons: each forms its own object.
* Rand: pairs are counted as ``n_ij**2`` (the "N^2 normalisation", self-pairs included):
  ``TP = sum_{j>0} n_ij**2 + n_0``, ``TP + FP = sum_{j>0} b_j**2 + n_0``,
  ``TP + FN = sum_i a_i**2``, with ``a_i``, ``b_j`` the row and column sums and ``n_0`` the
  singletons. F = 2PR / (P + R); P = 1 when FP = 0 and R = 1 when FN = 0, as in Fiji.
* Information: with ``p_ij = n_ij / n``, ``H(T) = -sum a_i log a_i``,
  ``H(S) = -sum b_j log b_j + (n_0 / n) log n``, ``I = H(T) + H(S) - H(T, S)`` and
  ``V_info = 2 PR / (P + R)`` with ``P = I / H(T)``, ``R = I / H(S)``; ``H(T) = 0`` gives
  P = 0, R = 1 and ``H(S) = 0`` gives P = 1, R = 0 (Fiji's rules, so a one-object slice
  scores 0; a slice where both are non-zero but ``I = 0`` gives NaN, and a threshold whose
  slice average is NaN is skipped, as Java's ``f > max`` does).
* Thinning (``thin_borders``): Fiji's ``WatershedTransform2D`` on the inverted binary proposal,
  4-connected: cells are the basins, border pixels are flooded breadth-first from them, and a
  border pixel that sees two different cells becomes a 1-pixel dam. The dams depend on
  Fiji's scan order (x outer, y inner) and neighbour order (left, up, right, down); both are
  reproduced exactly. This is not a skeletonisation.

Departures from Fiji, all in degenerate cases: a slice without ground-truth interior scores 0
for V_rand and V_info (as in Fiji) but adds no pairs to the pooled Rand error (Fiji would add
NaN and report 1.0); a ground truth without any interior raises ``ValueError``.

References
----------
Arganda-Carreras I. et al. (2015) Crowdsourcing the creation of image segmentation algorithms
for connectomics. Front. Neuroanat. 9:142. doi:10.3389/fnana.2015.00142
Jain V. et al. (2010) Boundary learning by optimization with topological constraints.
CVPR, doi:10.1109/CVPR.2010.5539950
Rand W. M. (1971) Objective criteria for the evaluation of clustering methods. JASA 66:846-850.
Vincent L., Soille P. (1991) Watersheds in digital spaces. IEEE TPAMI 13(6):583-598.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "ISBI_THRESHOLDS",
    "WARPING_THRESHOLDS",
    "isbi_scores",
    "v_rand",
    "v_info",
    "rand_error",
    "pixel_error",
    "warping_error",
    "splits_and_mergers_error",
    "thin_borders",
    "warp_ground_truth",
]


def _java_thresholds(start: float, stop: float, step: float) -> tuple[float, ...]:
    """The values of Java's ``for (th = start; th <= stop; th += step)``, drift included."""
    values, threshold = [], start
    while threshold <= stop:
        values.append(threshold)
        threshold += step
    return tuple(values)


#: Thresholds of the official V_rand, V_info, Rand and pixel error (11 values, 0.0 ... 0.9999999999999999).
ISBI_THRESHOLDS: tuple[float, ...] = _java_thresholds(0.0, 1.0, 0.1)
#: Thresholds of the official minimum splits-and-mergers warping error (10 values, 0.0 ... 0.8999999999999999).
WARPING_THRESHOLDS: tuple[float, ...] = _java_thresholds(0.0, 0.9, 0.1)

_FOUR = ndimage.generate_binary_structure(2, 1)
_MASK, _PENDING, _WALL = -2, -3, -9  # flood states of border pixels (labels are > 0, dams 0)


# ----------------------------------------------------------------------------- validation
def _binary_truth(ground_truth: np.ndarray) -> np.ndarray:
    if ground_truth.dtype == bool:
        return ground_truth
    if not (np.issubdtype(ground_truth.dtype, np.integer) or np.issubdtype(ground_truth.dtype, np.floating)):
        raise TypeError(f"ground_truth must be a numeric or bool array, got dtype {ground_truth.dtype}")
    top = ground_truth.max()
    odd = (ground_truth != 0) & (ground_truth != top)
    if top < 0 or np.isnan(top) or odd.any():
        examples = np.unique(ground_truth[odd | (ground_truth < 0)])[:5].tolist()
        raise ValueError(
            "ground_truth must be binary: 0 = membrane and one positive value (1 or 255) = interior; "
            f"got extra values {examples} besides 0 and {top.item()}. For instance labels use "
            "seg_score/average_precision, or pass labels > 0 to score their union."
        )
    return ground_truth != 0


def _probabilities(probabilities: np.ndarray, name: str = "probabilities") -> np.ndarray:
    if probabilities.dtype == bool:
        return probabilities.astype(np.float32)
    if not (np.issubdtype(probabilities.dtype, np.integer) or np.issubdtype(probabilities.dtype, np.floating)):
        raise TypeError(f"{name} must be a numeric or bool array, got dtype {probabilities.dtype}")
    probabilities = probabilities.astype(np.float32, copy=False)
    low, high = float(probabilities.min()), float(probabilities.max())
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(
            f"{name} must be finite values in [0, 1] (probability of cell interior), got range "
            f"[{low}, {high}]; divide 8-bit maps by 255, and replace NaN."
        )
    return probabilities


def _prepare(probabilities, ground_truth) -> tuple[np.ndarray, np.ndarray]:
    """Validate; return a float32 proposal stack and a bool ground-truth stack, both (Z, Y, X)."""
    probabilities, ground_truth = np.asarray(probabilities), np.asarray(ground_truth)
    if probabilities.shape != ground_truth.shape:
        raise ValueError(
            "probabilities and ground_truth must have the same shape, "
            f"got {probabilities.shape} and {ground_truth.shape}"
        )
    if ground_truth.ndim not in (2, 3):
        raise ValueError(
            f"expected a (Y, X) slice or a (Z, Y, X) stack, got {ground_truth.ndim} dimensions "
            f"(shape {ground_truth.shape})"
        )
    if ground_truth.size == 0:
        raise ValueError(f"ground_truth is empty (shape {ground_truth.shape}): nothing to score")
    truth = _binary_truth(ground_truth)
    if not truth.any():
        raise ValueError(
            "ground_truth has no interior pixel (value > 0): nothing to score. ISBI labels are 1 (or 255) "
            "inside cells and 0 on membranes; check the polarity."
        )
    proposal = _probabilities(probabilities)
    if truth.ndim == 2:
        truth, proposal = truth[None], proposal[None]
    return proposal, truth


def _thresholds(thresholds: Sequence[float], name: str = "thresholds") -> tuple[float, ...]:
    values = tuple(float(t) for t in np.atleast_1d(np.asarray(thresholds, dtype=np.float64)))
    if not values or not all(0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"{name} must be a non-empty sequence of values in [0, 1], got {list(values)}")
    return values


# ----------------------------------------------------------------------------- thinning
def thin_borders(interior: np.ndarray) -> np.ndarray:
    """Thin the borders of a binary proposal to 1-pixel dams, as Fiji's ISBI evaluation does.

    Parameters
    ----------
    interior : ndarray, shape (Y, X)
        Binary proposal, True (or 1) = cell interior, False = border.

    Returns
    -------
    labels : ndarray of int32, shape (Y, X)
        One label per cell (4-connected component of the interior), grown over the border by a
        4-connected breadth-first flood; 0 marks the dams, border pixels reached by two cells at
        once. A proposal without interior is one object (label 1), as in Fiji.

    Notes
    -----
    Reproduces ``WatershedTransform2D(inverted binary, 4).apply()`` of Fiji's
    Trainable_Segmentation (a Vincent & Soille 1991 flood of the single border level),
    including where its scan order puts the dams in even-width borders. Border pixels are
    processed level by level (distance to the nearest cell); within a level, the order of
    Fiji's FIFO queue is reconstructed and the dependencies between neighbours of the same
    level are resolved by fixed-point iteration, which equals the sequential result.

    Examples
    --------
    >>> thin_borders(np.array([[1, 0, 0, 1]], bool)).tolist()
    [[1, 1, 0, 2]]
    """
    interior = np.asarray(interior)
    if interior.ndim != 2:
        raise ValueError(f"interior must be a (Y, X) slice, got shape {interior.shape}")
    if interior.dtype != bool:
        if not np.isin(interior, (0, 1)).all():
            raise ValueError("interior must be binary (bool or 0/1); threshold probabilities first")
        interior = interior.astype(bool)
    return _thin(interior)


def _thin(interior: np.ndarray) -> np.ndarray:
    height, width = interior.shape
    basins, count = ndimage.label(interior, _FOUR)
    if count == 0:
        return np.ones(interior.shape, np.int32)
    if interior.all():
        return basins.astype(np.int32)
    row_stride = width + 2
    state = np.full((height + 2, row_stride), _WALL, np.int32)
    state[1:-1, 1:-1] = np.where(interior, basins, _MASK)
    flat = state.ravel()
    offsets = np.array([-1, -row_stride, 1, row_stride])  # Fiji's order: (x-1,y), (x,y-1), (x+1,y), (x,y+1)
    rank = np.zeros(flat.size, np.int64)
    # First level: border pixels touching a cell, in Fiji's scan order (x outer, y inner).
    xs, ys = np.nonzero(~interior.T)
    level = (ys + 1) * row_stride + xs + 1
    level = level[(flat[level[:, None] + offsets] > 0).any(axis=1)]
    while level.size:
        size = level.size
        flat[level] = _PENDING
        rank[level] = np.arange(size)
        neighbours = level[:, None] + offsets
        seen = flat[neighbours]
        low = np.where(seen > 0, seen, np.iinfo(np.int32).max).min(axis=1)
        high = np.where(seen > 0, seen, 0).max(axis=1)
        values = np.where(low == high, low, 0)
        earlier = (seen == _PENDING) & (rank[neighbours] < np.arange(size)[:, None])
        if earlier.any():
            # A pixel also sees the labels its same-level neighbours got before it in the queue.
            target, direction = np.nonzero(earlier)
            source = rank[neighbours[target, direction]]
            while True:
                got = values[source]
                hit = got > 0
                low_now, high_now = low.copy(), high.copy()
                np.minimum.at(low_now, target[hit], got[hit])
                np.maximum.at(high_now, target[hit], got[hit])
                update = np.where(low_now == high_now, low_now, 0)
                if np.array_equal(update, values):
                    break
                values = update
        flat[level] = values
        # Next level: unreached border pixels, in the order their first neighbour queued them.
        parent, direction = np.nonzero(flat[neighbours] == _MASK)
        children = neighbours[parent, direction]
        _, first = np.unique(children, return_index=True)
        level = children[np.sort(first)]
    return state[1:-1, 1:-1].copy()


# ----------------------------------------------------------------------------- pair counting
def _contingency(truth_labels: np.ndarray, proposal_labels: np.ndarray, n_proposal: int):
    """Rows (truth object >= 1), columns (proposal object, 0 = border) and counts n_ij."""
    inside = truth_labels > 0
    rows = truth_labels[inside].astype(np.int64)
    cols = proposal_labels[inside].astype(np.int64)
    width = int(n_proposal) + 1
    keys = rows * width + cols
    if keys.size and int(keys.max()) < 4 * keys.size + 4096:
        counts = np.bincount(keys)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(keys, return_counts=True)
    return keys // width, keys % width, counts.astype(np.float64)


def _rand_counts(rows, cols, counts) -> tuple[float, float, float]:
    """TP, FP, FN of pixel pairs with the N^2 normalisation (RandError.getForegroundRestrictedRandIndexStatsN2)."""
    joint = counts[cols > 0]
    singletons = float(counts[cols == 0].sum())
    true_positives = float(joint @ joint) + singletons
    truth_sizes = np.bincount(rows, weights=counts)
    proposal_sizes = np.bincount(cols[cols > 0], weights=joint)
    return (true_positives, float(proposal_sizes @ proposal_sizes) + singletons - true_positives,
            float(truth_sizes @ truth_sizes) - true_positives)


def _f_score(true_positives: float, false_positives: float, false_negatives: float) -> float:
    """F-score as Fiji's ClassificationStatistics: no FP means precision 1, no FN recall 1."""
    precision = 1.0 if false_positives == 0 else true_positives / (true_positives + false_positives)
    recall = 1.0 if false_negatives == 0 else true_positives / (true_positives + false_negatives)
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _xlogx(values: np.ndarray) -> float:
    values = values[values > 0]
    return float(np.sum(values * np.log(values)))


def _info_f_score(rows, cols, counts) -> float:
    """V_info of one slice (VariationOfInformation.foregroundRestrictedFscore), NaN when P = R = 0."""
    n = float(counts.sum())
    log_n = math.log(n)
    joint = counts[cols > 0]
    singletons = float(counts[cols == 0].sum()) / n
    sum_a = _xlogx(np.bincount(rows, weights=counts) / n)
    sum_b = _xlogx(np.bincount(cols[cols > 0], weights=joint) / n) - singletons * log_n
    sum_ab = _xlogx(joint / n) - singletons * log_n
    h_truth, h_proposal = -sum_a, -sum_b
    precision = recall = 0.0
    if h_truth != 0:
        precision = (h_truth - (sum_b - sum_ab)) / h_truth
    if h_proposal != 0:
        recall = (h_proposal - (sum_a - sum_ab)) / h_proposal
    if h_truth == 0:
        precision, recall = 0.0, 1.0
    if h_proposal == 0:
        precision, recall = 1.0, 0.0
    if precision + recall == 0:
        return math.nan
    return 2.0 * precision * recall / (precision + recall)


def _threshold_curves(proposal: np.ndarray, truth: np.ndarray, thresholds: tuple[float, ...],
                      *, rand: bool = True, thinned: bool = True, pixel: bool = True) -> dict:
    """Per-threshold curves: mean per-slice V_rand and V_info, pooled Rand and pixel counts."""
    n_thresholds, n_slices = len(thresholds), truth.shape[0]
    v_rand = np.zeros((n_thresholds, n_slices))
    v_info = np.zeros((n_thresholds, n_slices))
    rand_counts = np.zeros((n_thresholds, 3))
    pixel_counts = np.zeros((n_thresholds, 3))
    for z in range(n_slices):
        gt = truth[z]
        gt_labels, _ = ndimage.label(gt, _FOUR)
        has_interior = bool(gt.any())
        values = proposal[z].astype(np.float64)
        previous_count, previous = -1, None
        for k, threshold in enumerate(thresholds):
            mask = values > threshold
            count = int(np.count_nonzero(mask))
            if count != previous_count:  # masks are nested: same count, same mask
                result = {}
                if pixel:
                    hits = int(np.count_nonzero(mask & gt))
                    result["pixel"] = (hits, count - hits, int(np.count_nonzero(gt)) - hits)
                if rand and has_interior:
                    labels, n_labels = ndimage.label(mask, _FOUR)
                    result["rand"] = _rand_counts(*_contingency(gt_labels, labels, n_labels))
                if thinned and has_interior:
                    labels = _thin(mask)
                    table = _contingency(gt_labels, labels, int(labels.max()))
                    result["v_rand"] = _f_score(*_rand_counts(*table))
                    result["v_info"] = _info_f_score(*table)
                previous_count, previous = count, result
            result = previous
            if pixel:
                pixel_counts[k] += result["pixel"]
            if rand and has_interior:
                rand_counts[k] += result["rand"]
            if thinned and has_interior:
                v_rand[k, z] = result["v_rand"]
                v_info[k, z] = result["v_info"]
    return {"v_rand": v_rand.mean(axis=1), "v_info": v_info.mean(axis=1),
            "rand": [_f_score(*c) for c in rand_counts], "pixel": [_f_score(*c) for c in pixel_counts]}


def _best(scores) -> float:
    """Java's ``max = 0; if (f > max) max = f``: NaN thresholds never win."""
    finite = [float(s) for s in scores if not math.isnan(s)]
    return max([0.0, *finite])


# ----------------------------------------------------------------------------- warping
@functools.lru_cache(maxsize=1)
def _simple_point_table() -> bytes:
    """256 entries: is a pixel simple for 4-adjacent foreground / 8-adjacent background?

    Index bit k is neighbour k of the 3x3 neighbourhood in raster order without the centre:
    (-1,-1), (-1,0), (-1,1), (0,-1), (0,1), (1,-1), (1,0), (1,1). A pixel is simple when its
    foreground neighbours form exactly one 4-connected component (inside the 8-neighbourhood)
    that touches it 4-adjacently and its background neighbours exactly one 8-connected
    component (Bertrand's T4 = T8 = 1). Independent of the centre's own value; equal to the
    test of Fiji's WarpingError.simple2DBertrand(patch, 4) for all 256 cases.
    """
    ring = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    cross = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool)
    outside = np.ones((3, 3), bool)
    outside[1, 1] = False
    table = bytearray(256)
    for code in range(256):
        patch = np.zeros((3, 3), bool)
        for bit, position in enumerate(ring):
            patch[position] = bool(code >> bit & 1)
        foreground, _ = ndimage.label(patch, _FOUR)
        background, _ = ndimage.label(~patch & outside, np.ones((3, 3), bool))
        t4 = np.unique(foreground[cross & patch]).size
        t8 = np.unique(background[outside & ~patch]).size
        table[code] = t4 == 1 and t8 == 1
    return bytes(table)


def _warp_slice(truth: np.ndarray, values: np.ndarray, threshold: float):
    """Fiji's simplePointWarp2d: warp the truth onto ``values > threshold`` by simple-point flips.

    Mismatches are visited in Fiji's order (``|value - threshold|`` descending, ties in x-major
    scan order), each flipped when simple in the current image; passes repeat until one flips
    nothing. A mismatch is re-tested in a later pass only after a neighbour changed (otherwise
    its answer cannot change), which gives the same result with far fewer tests.
    Returns the warped truth and the (rows, cols) of the remaining mismatches.
    """
    height, width = truth.shape
    stride = width + 2
    target = values > threshold
    rows, cols = np.nonzero(truth != target)
    if rows.size == 0:
        return truth.copy(), rows, cols
    distance = np.abs(values[rows, cols] - threshold).astype(np.float32)
    order = np.lexsort((rows, cols, -distance))
    positions = ((rows + 1) * stride + cols + 1)[order].tolist()
    padded = np.zeros((height + 2, stride), np.uint8)
    padded[1:-1, 1:-1] = truth
    image = bytearray(padded.tobytes())
    rank = {position: r for r, position in enumerate(positions)}
    alive = bytearray(b"\x01") * len(positions)
    queued = bytearray(len(positions))
    simple = _simple_point_table()
    around = (-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1)
    pending = list(range(len(positions)))
    while pending:
        for r in pending:
            queued[r] = 1
        heap, retry, flips = pending, set(), 0
        while heap:
            r = heapq.heappop(heap)
            queued[r] = 0
            i = positions[r]
            code = (image[i - stride - 1] | image[i - stride] << 1 | image[i - stride + 1] << 2
                    | image[i - 1] << 3 | image[i + 1] << 4 | image[i + stride - 1] << 5
                    | image[i + stride] << 6 | image[i + stride + 1] << 7)
            if not simple[code]:
                continue
            image[i] ^= 1
            alive[r] = 0
            flips += 1
            for offset in around:
                s = rank.get(i + offset)
                if s is None or not alive[s]:
                    continue
                if s > r:
                    if not queued[s]:
                        queued[s] = 1
                        heapq.heappush(heap, s)
                else:
                    retry.add(s)
        if not flips:
            break
        pending = sorted(s for s in retry if alive[s])
    warped = np.frombuffer(bytes(image), np.uint8).reshape(height + 2, stride)[1:-1, 1:-1].astype(bool)
    remaining = np.asarray([p for r, p in enumerate(positions) if alive[r]], np.int64)
    return warped, remaining // stride - 1, remaining % stride - 1


def _count_splits_and_mergers(warped: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius: int) -> int:
    """Mismatches classified as split or merger (WarpingError.classifyMismatches2d)."""
    if rows.size == 0:
        return 0
    height, width = warped.shape
    components, _ = ndimage.label(warped, _FOUR)
    padded = np.pad(components, 1, constant_values=-1)
    ring = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    seen = np.sort(np.stack([padded[rows + 1 + dy, cols + 1 + dx] for dy, dx in ring], axis=1), axis=1)
    distinct = seen >= 0
    distinct[:, 1:] &= seen[:, 1:] != seen[:, :-1]
    n_ids = distinct.sum(axis=1)
    foreground = warped[rows, cols]
    errors = int(np.count_nonzero((n_ids != 1) & (n_ids != 2)))  # mergers (background) and splits
    window = 1 <= radius <= width and radius <= height
    source = np.pad(warped, radius) if window else warped
    for y, x in zip(rows[foreground & (n_ids == 2)], cols[foreground & (n_ids == 2)]):
        if window:
            patch = source[y:y + 2 * radius + 1, x:x + 2 * radius + 1].copy()
            cy, cx = radius, radius
        else:
            patch, cy, cx = source.copy(), y, x
        patch[cy, cx] = False
        labels, _ = ndimage.label(patch, _FOUR)
        ids = {int(labels[cy + dy, cx + dx]) for dy, dx in ring
               if 0 <= cy + dy < patch.shape[0] and 0 <= cx + dx < patch.shape[1]}
        errors += len(ids) > 2
    return errors


def warp_ground_truth(probabilities: np.ndarray, ground_truth: np.ndarray, *, threshold: float = 0.5) -> np.ndarray:
    """Warp the ground truth toward the binarised proposal by simple-point flips (Jain et al. 2010).

    Parameters
    ----------
    probabilities : ndarray, shape (Y, X) or (Z, Y, X)
        Interior probability in [0, 1] or a binary map; interior = ``value > threshold``.
    ground_truth : ndarray, same shape
        Binary, 0 = membrane, positive = interior.
    threshold : float
        Binarisation threshold in [0, 1].

    Returns
    -------
    warped : ndarray of bool, same shape
        The ground truth after Fiji's greedy warping (``WarpingError.simplePointWarp2d``): only
        simple points (4-adjacent foreground, 8-adjacent background) are flipped, so it has the
        topology of the ground truth and the geometry of the proposal wherever that is allowed.
    """
    proposal, truth = _prepare(probabilities, ground_truth)
    (threshold,) = _thresholds([threshold], "threshold")
    warped = np.stack([_warp_slice(t, p.astype(np.float64), threshold)[0] for t, p in zip(truth, proposal)])
    return warped.reshape(np.shape(ground_truth))


def warping_error(probabilities: np.ndarray, ground_truth: np.ndarray, *, threshold: float = 0.5) -> float:
    """Classic warping error: mismatches left after warping the ground truth, per pixel.

    Parameters
    ----------
    probabilities, ground_truth : ndarray, shape (Y, X) or (Z, Y, X)
        See the module docstring.
    threshold : float
        Binarisation threshold of the proposal (interior = ``value > threshold``).

    Returns
    -------
    float
        ``WarpingError.getMetricValue(threshold)`` of Fiji: the number of pixels where the
        warped ground truth (:func:`warp_ground_truth`) and the binarised proposal still differ,
        divided by the slice's pixel count, averaged over slices. 0 = topologically equal.

    Notes
    -----
    Jain et al. (2010): the Hamming distance between the proposal and the best warping of the
    ground truth found by greedy simple-point flips, visiting the most confident mismatches
    first. Every topological error (split, merger, added or deleted object or hole) leaves at
    least one mismatch; boundary shifts leave none.
    """
    proposal, truth = _prepare(probabilities, ground_truth)
    (threshold,) = _thresholds([threshold], "threshold")
    errors = [_warp_slice(t, p.astype(np.float64), threshold)[1].size / t.size for t, p in zip(truth, proposal)]
    return float(np.mean(errors))


def splits_and_mergers_error(probabilities: np.ndarray, ground_truth: np.ndarray, *,
                             thresholds: Sequence[float] = WARPING_THRESHOLDS, radius: int = 20) -> float:
    """Minimum splits-and-mergers warping error, the warping error of the ISBI 2012 challenge.

    Parameters
    ----------
    probabilities, ground_truth : ndarray, shape (Y, X) or (Z, Y, X)
        See the module docstring.
    thresholds : sequence of float
        Binarisation thresholds; default Fiji's 0.0 ... 0.9 (``WARPING_THRESHOLDS``).
    radius : int
        Half-size of the window in which a foreground mismatch is tested for a local split.

    Returns
    -------
    float
        ``WarpingError.getMinimumSplitsAndMergersErrorValue(0, 0.9, 0.1, false, 20)``: after
        warping, each remaining mismatch is classified from the 4-connected components of the
        warped ground truth around it (merger, split, hole or object addition/deletion); the
        number of split and merger pixels of all slices over the number of pixels, smallest
        over the thresholds.
    """
    proposal, truth = _prepare(probabilities, ground_truth)
    return _splits_and_mergers(proposal, truth, _thresholds(thresholds), int(radius))


def _splits_and_mergers(proposal, truth, thresholds, radius) -> float:
    best = math.inf
    for threshold in thresholds:
        errors = 0
        for t, p in zip(truth, proposal):
            errors += _count_splits_and_mergers(*_warp_slice(t, p.astype(np.float64), threshold), radius)
        best = min(best, errors / truth.size)
    return float(best)


# ----------------------------------------------------------------------------- public scores
def v_rand(probabilities: np.ndarray, ground_truth: np.ndarray, *,
           thresholds: Sequence[float] = ISBI_THRESHOLDS) -> float:
    """Foreground-restricted Rand F-score after border thinning (V_rand), best over thresholds.

    Per slice: ground-truth objects = 4-connected components of the interior; proposal objects
    = :func:`thin_borders` of ``probabilities > threshold``; pairs of ground-truth interior
    pixels counted with the N^2 normalisation (module Notes); F-score averaged over slices.
    Returns the largest average over ``thresholds``: 1 = perfect, 0 = worst.
    """
    proposal, truth = _prepare(probabilities, ground_truth)
    curves = _threshold_curves(proposal, truth, _thresholds(thresholds), rand=False, pixel=False)
    return _best(curves["v_rand"])


def v_info(probabilities: np.ndarray, ground_truth: np.ndarray, *,
           thresholds: Sequence[float] = ISBI_THRESHOLDS) -> float:
    """Foreground-restricted information theoretic score after border thinning (V_info).

    Same objects as :func:`v_rand`; per slice ``2 P R / (P + R)`` with ``P = I / H(truth)`` and
    ``R = I / H(proposal)`` (module Notes), averaged over slices, best over ``thresholds``.
    1 = perfect, 0 = worst.
    """
    proposal, truth = _prepare(probabilities, ground_truth)
    curves = _threshold_curves(proposal, truth, _thresholds(thresholds), rand=False, pixel=False)
    return _best(curves["v_info"])


def rand_error(probabilities: np.ndarray, ground_truth: np.ndarray, *,
               thresholds: Sequence[float] = ISBI_THRESHOLDS) -> float:
    """The original ISBI 2012 Rand error: 1 - best foreground-restricted Rand F-score, no thinning.

    Proposal objects are the 4-connected components of ``probabilities > threshold``; its
    border pixels inside the ground-truth interior are singletons. Pair counts are pooled over
    slices before the F-score. 0 = perfect.
    """
    proposal, truth = _prepare(probabilities, ground_truth)
    curves = _threshold_curves(proposal, truth, _thresholds(thresholds), thinned=False, pixel=False)
    return 1.0 - _best(curves["rand"])


def pixel_error(probabilities: np.ndarray, ground_truth: np.ndarray, *,
                thresholds: Sequence[float] = ISBI_THRESHOLDS) -> float:
    """1 - best pixel F-score of the interior class over ``thresholds`` (counts pooled over slices). 0 = perfect."""
    proposal, truth = _prepare(probabilities, ground_truth)
    curves = _threshold_curves(proposal, truth, _thresholds(thresholds), rand=False, thinned=False)
    return 1.0 - _best(curves["pixel"])


def isbi_scores(probabilities: np.ndarray, ground_truth: np.ndarray, *,
                thresholds: Sequence[float] = ISBI_THRESHOLDS,
                warping_thresholds: Sequence[float] = WARPING_THRESHOLDS, warping_radius: int = 20) -> dict:
    """All ISBI 2012 scores of a proposal against a binary ground truth, as the official Fiji scripts.

    Parameters
    ----------
    probabilities : ndarray, shape (Y, X) or (Z, Y, X)
        Interior probability in [0, 1] (or a binary 0/1 map), same polarity as the ground truth.
    ground_truth : ndarray, same shape
        Binary: 0 = membrane, one positive value (1 or 255) = interior.
    thresholds : sequence of float
        Thresholds of V_rand, V_info, Rand and pixel error (default ``ISBI_THRESHOLDS``).
    warping_thresholds : sequence of float
        Thresholds of the warping error (default ``WARPING_THRESHOLDS``).
    warping_radius : int
        Window half-size of the split test of the warping error (Fiji's 20).

    Returns
    -------
    dict
        ``v_rand``, ``v_info`` (higher is better, 1 = perfect), ``rand_error``,
        ``warping_error``, ``pixel_error`` (lower is better, 0 = perfect); see the module
        docstring for the definitions. Stacks are evaluated per slice.

    Raises
    ------
    ValueError
        Shapes differ, the ground truth is not binary or has no interior, or probabilities
        leave [0, 1].

    Examples
    --------
    >>> truth = np.ones((5, 11), np.uint8); truth[:, 5] = 0
    >>> scores = isbi_scores(truth.astype(np.float32), truth)
    >>> scores["v_rand"], scores["rand_error"], scores["warping_error"]
    (1.0, 0.0, 0.0)
    """
    proposal, truth = _prepare(probabilities, ground_truth)
    curves = _threshold_curves(proposal, truth, _thresholds(thresholds))
    return {
        "v_rand": _best(curves["v_rand"]),
        "v_info": _best(curves["v_info"]),
        "rand_error": 1.0 - _best(curves["rand"]),
        "warping_error": _splits_and_mergers(proposal, truth, _thresholds(warping_thresholds, "warping_thresholds"),
                                             int(warping_radius)),
        "pixel_error": 1.0 - _best(curves["pixel"]),
    }
