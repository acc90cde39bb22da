"""Tests of unet_core.metrics (and unet_core.isbi): hand-computed cases, references, invariants, errors.

Hand-computed cases use ``two_cells``: a 5 x 11 ground truth with two 5 x 5 cells, A (columns
0-4) and B (columns 6-10), separated by a membrane column (5). n = 50 interior pixels.
"""

import math
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from unet_core import isbi
from unet_core.metrics import (
    AP_THRESHOLDS, ISBI_THRESHOLDS, WARPING_THRESHOLDS, average_precision, class_scores, foreground_scores,
    isbi_scores, merges_and_splits, panoptic_quality, pixel_error, rand_error, seg_score, splits_and_mergers_error,
    thin_borders, v_info, v_rand, warp_ground_truth, warping_error,
)

ISBI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"
FOUR = ndimage.generate_binary_structure(2, 1)
EIGHT = np.ones((3, 3), bool)


# ----------------------------------------------------------------------------- existing API
def test_foreground_scores_hand_computed():
    truth = np.array([[1, 1, 0, 0]])
    pred = np.array([[0, 2, 2, 0]])
    scores = foreground_scores(truth, pred)
    assert scores["iou"] == pytest.approx(1 / 3)
    assert scores["dice"] == pytest.approx(2 * 1 / 4)
    assert foreground_scores(truth, truth)["iou"] == 1.0
    assert foreground_scores(np.zeros((2, 2)), np.zeros((2, 2)))["dice"] == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        foreground_scores(np.zeros((2, 2)), np.zeros((2, 3)))


# ----------------------------------------------------------------------------- ISBI: hand-computed
@pytest.fixture
def two_cells():
    truth = np.full((5, 11), 255, np.uint8)
    truth[:, 5] = 0
    return truth


def proposal(truth, *, border_columns=(), interior_columns=()):
    result = (truth > 0).astype(np.float32)
    result[:, list(border_columns)] = 0.0
    result[:, list(interior_columns)] = 1.0
    return result


@pytest.mark.parametrize("stack", [False, True], ids=["2d", "3d-stack"])
def test_isbi_identical_is_perfect(two_cells, stack):
    truth = np.stack([two_cells, two_cells[:, ::-1]]) if stack else two_cells
    scores = isbi_scores((truth > 0).astype(np.float32), truth)
    assert scores == {"v_rand": 1.0, "v_info": 1.0, "rand_error": 0.0, "warping_error": 0.0, "pixel_error": 0.0}
    assert warping_error(truth > 0, truth) == 0.0


def test_isbi_split_hand_computed(two_cells):
    # The proposal cuts cell A along column 2: A1 = columns 0-1 (10 px), A2 = columns 3-4 (10 px),
    # and the 5 cut pixels lie inside the ground-truth interior. Thinning keeps the 1-px cut as a dam.
    scores = isbi_scores(proposal(two_cells, border_columns=[2]), two_cells)
    # Rand (N^2 pairs, the 5 cut pixels are singletons): TP = 10^2 + 10^2 + 25^2 + 5 = 830,
    # TP + FN = 25^2 + 25^2 = 1250, TP + FP = 830 -> P = 1, R = 830/1250 = 0.664.
    recall = 830 / 1250
    assert scores["v_rand"] == pytest.approx(2 * recall / (1 + recall))  # 0.79807...
    assert scores["rand_error"] == pytest.approx(1 - 2 * recall / (1 + recall))
    # Information: p = (0.2, 0.2, 0.5) plus 5 singletons of 1/50; H(truth) = ln 2,
    # H(proposal) = 0.4 ln 5 + 0.5 ln 2 + 0.1 ln 50, H(truth | proposal) = 0 -> P = 1, R = ln 2 / H(proposal).
    recall = math.log(2) / (0.4 * math.log(5) + 0.5 * math.log(2) + 0.1 * math.log(50))
    assert scores["v_info"] == pytest.approx(2 * recall / (1 + recall))  # 0.66819...
    # Pixels: TP = 45, FP = 0, FN = 5 -> F = 2 * 0.9 / 1.9.
    assert scores["pixel_error"] == pytest.approx(1 - 2 * 0.9 / 1.9)
    # Warping deletes the cut from the top down until the last pixel, whose removal would split A:
    # 1 mismatch left, classified as a split; 1 / 55 pixels.
    assert scores["warping_error"] == pytest.approx(1 / 55)
    assert warping_error(proposal(two_cells, border_columns=[2]), two_cells) == pytest.approx(1 / 55)


def test_isbi_merge_hand_computed(two_cells):
    # The proposal has no membrane: one object covers A, B and the border column.
    scores = isbi_scores(proposal(two_cells, interior_columns=[5]), two_cells)
    # TP = 25^2 + 25^2 = 1250 = TP + FN, TP + FP = 50^2 = 2500 -> P = 1/2, R = 1, F = 2/3.
    assert scores["v_rand"] == pytest.approx(2 / 3)
    assert scores["rand_error"] == pytest.approx(1 / 3)
    # One proposal object: H(proposal) = 0, Fiji's rule P = 1, R = 0 -> V_info = 0.
    assert scores["v_info"] == 0.0
    # Pixels: TP = 50, FP = 5, FN = 0 -> F = 2 (10/11) / (21/11) = 20/21.
    assert scores["pixel_error"] == pytest.approx(1 / 21)
    # No border pixel can be added without merging A and B: all 5 stay, all mergers.
    assert scores["warping_error"] == pytest.approx(5 / 55)


def test_isbi_missing_object_hand_computed(two_cells):
    # The proposal misses cell B (columns 6-10 predicted membrane).
    prop = proposal(two_cells, border_columns=range(5, 11))
    scores = isbi_scores(prop, two_cells)
    # Thinning floods the whole border from A: one object covers A and B, as a merge: V_rand = 2/3.
    assert scores["v_rand"] == pytest.approx(2 / 3)
    assert scores["v_info"] == 0.0
    # Without thinning, B's 25 pixels are singletons: TP = 25^2 + 25 = 650 = TP + FP,
    # TP + FN = 1250 -> P = 1, R = 0.52.
    assert scores["rand_error"] == pytest.approx(1 - 2 * 0.52 / 1.52)
    assert scores["pixel_error"] == pytest.approx(1 / 3)  # TP = 25, FN = 25 -> F = 2/3
    # Warping shrinks B to one pixel: an object deletion, neither split nor merger.
    assert scores["warping_error"] == 0.0
    assert warping_error(prop, two_cells) == pytest.approx(1 / 55)


def test_isbi_stacks_average_v_rand_per_slice_and_pool_rand_counts(two_cells):
    truth = np.stack([two_cells, two_cells])
    prop = np.stack([proposal(two_cells), proposal(two_cells, border_columns=[2])])
    scores = isbi_scores(prop, truth)
    split_f = 2 * 0.664 / 1.664
    assert scores["v_rand"] == pytest.approx((1.0 + split_f) / 2)  # macro: mean of slice F-scores
    # micro: TP = 1250 + 830, TP + FN = 2500, FP = 0 -> R = 0.832
    assert scores["rand_error"] == pytest.approx(1 - 2 * 0.832 / 1.832)
    assert scores["pixel_error"] == pytest.approx(1 - 2 * 0.95 / 1.95)  # TP 95, FN 5
    assert scores["warping_error"] == pytest.approx(1 / 110)


def test_documented_degenerate_values(two_cells):
    one_cell = np.full((4, 6), 255, np.uint8)
    one_cell[0] = 0
    scores = isbi_scores(one_cell > 0, one_cell)
    assert scores["v_rand"] == 1.0 and scores["v_info"] == 0.0  # H(truth) = 0: Fiji gives V_info 0
    stack = np.stack([two_cells, np.zeros_like(two_cells)])  # second slice has no interior
    assert v_rand(stack > 0, stack) == 0.5  # that slice scores 0, as in Fiji
    assert rand_error(stack > 0, stack) == 0.0  # and adds no pairs to the pooled Rand error


def test_thresholds_and_float32_comparison_are_fijis():
    assert len(ISBI_THRESHOLDS) == 11 and len(WARPING_THRESHOLDS) == 10
    assert ISBI_THRESHOLDS[3] == 0.30000000000000004 and ISBI_THRESHOLDS[-1] == 0.9999999999999999
    assert WARPING_THRESHOLDS[-1] == 0.8999999999999999
    # Fiji compares the float32 pixel, widened to double, with the double threshold:
    # float32(0.3) = 0.30000001192... > 0.30000000000000004, so 0.3 is interior there.
    truth = np.array([[1, 1, 0, 1]], np.uint8)
    prop = np.where(truth > 0, 0.3, 0.0)
    assert pixel_error(prop, truth, thresholds=[ISBI_THRESHOLDS[3]]) == 0.0
    assert pixel_error(prop, truth, thresholds=[0.31]) == 1.0


def test_thresholds_take_the_best(two_cells):
    # Interior probability 0.6 inside cells, 0.4 on the membrane: only thresholds 0.4 .. 0.5 separate them.
    prop = np.where(two_cells > 0, 0.6, 0.4).astype(np.float32)
    scores = isbi_scores(prop, two_cells)
    assert scores["v_rand"] == 1.0 and scores["pixel_error"] == 0.0 and scores["warping_error"] == 0.0


# ----------------------------------------------------------------------------- thinning = Fiji's flood
def fiji_flood_reference(interior):
    """Sequential transcription of Fiji's WatershedTransform2D on the inverted binary image.

    Pixels sorted by value (0 = interior first, then 255 = border), ties in x-outer, y-inner order;
    neighbours (x-1, y), (x, y-1), (x+1, y), (x, y+1); FIFO flood as Vincent & Soille (1991).
    """
    h, w = interior.shape
    init, mask, dam, queued = -1, -2, 0, -3
    lab = np.full((h, w), init)
    order = sorted(((0 if interior[y, x] else 255, x, y) for x in range(w) for y in range(h)), key=lambda t: t[0])

    def neighbours(x, y):
        return [(u, v) for u, v in ((x - 1, y), (x, y - 1), (x + 1, y), (x, y + 1)) if 0 <= u < w and 0 <= v < h]

    current, flag = 0, False
    for level in sorted({t[0] for t in order}):
        group = [(x, y) for value, x, y in order if value == level]
        fifo = deque()
        for x, y in group:
            lab[y, x] = mask
            if any(lab[v, u] >= dam for u, v in neighbours(x, y)):
                fifo.append((x, y))
                lab[y, x] = queued
        while fifo:
            x, y = fifo.popleft()
            for u, v in neighbours(x, y):
                if lab[v, u] > 0:
                    if lab[y, x] == queued or (lab[y, x] == dam and flag):
                        lab[y, x] = lab[v, u]
                    elif lab[y, x] > 0 and lab[y, x] != lab[v, u]:
                        lab[y, x], flag = dam, False
                elif lab[v, u] == dam:
                    if lab[y, x] == queued:
                        lab[y, x], flag = dam, True
                elif lab[v, u] == mask:
                    lab[v, u] = queued
                    fifo.append((u, v))
        for x, y in group:
            if lab[y, x] == mask:
                current += 1
                lab[y, x] = current
                fifo.append((x, y))
                while fifo:
                    a, b = fifo.popleft()
                    for u, v in neighbours(a, b):
                        if lab[v, u] == mask:
                            lab[v, u] = current
                            fifo.append((u, v))
    lab[lab == init] = 0
    return lab


def same_partition(a, b):
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = set(zip(a[a > 0].tolist(), b[b > 0].tolist()))
    return len(pairs) == len({p for p, _ in pairs}) == len({q for _, q in pairs})


def test_thin_borders_hand_computed():
    # Even-width border: Fiji's scan order (x first) gives the first border pixel to the left cell.
    assert thin_borders(np.array([[1, 0, 0, 1]], bool)).tolist() == [[1, 1, 0, 2]]
    assert thin_borders(np.array([[1, 0, 0, 0, 1]], bool)).tolist() == [[1, 1, 0, 2, 2]]
    assert thin_borders(np.zeros((2, 3), bool)).tolist() == [[1, 1, 1], [1, 1, 1]]  # no cell: one object


def test_thin_borders_equals_sequential_fiji_flood():
    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = rng.integers(3, 22, 2)
        if trial % 3 == 0:
            interior = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        elif trial % 3 == 1:
            interior = ndimage.gaussian_filter(rng.random((h, w)), 1.5) > 0.5
        else:  # straight borders of width 1-3 and their crossings: many ties
            interior = np.ones((h, w), bool)
            for _ in range(rng.integers(1, 4)):
                start, width = rng.integers(0, max(h, w)), rng.integers(1, 4)
                if rng.random() < 0.5:
                    interior[:, start:start + width] = False
                else:
                    interior[start:start + width, :] = False
        assert same_partition(thin_borders(interior), fiji_flood_reference(interior)), interior.astype(int)


# ----------------------------------------------------------------------------- warping
def simple_by_counting(patch):
    """Flipping the centre of a zero-padded 3x3 patch keeps the number of 4-connected foreground
    and 8-connected background components: the topological definition of a simple point."""
    before = np.zeros((5, 5), bool)
    before[1:4, 1:4] = patch
    after = before.copy()
    after[2, 2] = ~after[2, 2]
    counts = [(ndimage.label(x, FOUR)[1], ndimage.label(~x, EIGHT)[1]) for x in (before, after)]
    return counts[0] == counts[1]


def test_simple_point_table_matches_topology():
    table = isbi._simple_point_table()
    ring = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    for code in range(256):
        for centre in (False, True):
            patch = np.zeros((3, 3), bool)
            patch[1, 1] = centre
            for bit, position in enumerate(ring):
                patch[position] = bool(code >> bit & 1)
            assert bool(table[code]) == simple_by_counting(patch), (code, centre)


def fiji_warp_reference(truth, values, threshold):
    """Fiji's simplePointWarp2d, literally: full passes over the mismatches sorted by |value - threshold|
    (descending, ties x-major), flipping each point that is simple in the current image, until no change."""
    h, w = truth.shape
    source = np.zeros((h + 2, w + 2), bool)
    source[1:-1, 1:-1] = truth
    target = np.zeros_like(source)
    target[1:-1, 1:-1] = values > threshold
    before = None
    while True:
        mismatch = source != target
        count = int(mismatch.sum())
        if count == 0 or count == before:
            return source[1:-1, 1:-1]
        before = count
        points = [(np.float32(abs(float(values[y - 1, x - 1]) - threshold)), x, y)
                  for x in range(1, w + 1) for y in range(1, h + 1) if mismatch[y, x]]
        for _, x, y in sorted(points, key=lambda t: -t[0]):
            if simple_by_counting(source[y - 1:y + 2, x - 1:x + 2]):
                source[y, x] = ~source[y, x]


def test_warping_equals_sequential_fiji_warp():
    rng = np.random.default_rng(1)
    for trial in range(25):
        h, w = rng.integers(4, 20, 2)
        truth = ndimage.gaussian_filter(rng.random((h, w)), 1.5) > 0.5
        values = np.clip(ndimage.gaussian_filter(rng.random((h, w)), 1.2) * 2 - 0.5, 0, 1).astype(np.float32)
        if trial % 4 == 0:
            values = (values > 0.5).astype(np.float32)
        threshold = float(rng.choice([0.0, ISBI_THRESHOLDS[3], 0.5, WARPING_THRESHOLDS[-1]]))
        if not truth.any():
            continue
        expected = fiji_warp_reference(truth, values, threshold)
        np.testing.assert_array_equal(warp_ground_truth(values, truth, threshold=threshold), expected)


def test_warping_preserves_topology_and_moves_toward_proposal():
    rng = np.random.default_rng(2)
    truth = ndimage.gaussian_filter(rng.random((3, 48, 48)), (0, 2, 2)) > 0.5
    values = ndimage.gaussian_filter(rng.random((3, 48, 48)), (0, 2, 2)).astype(np.float32)
    warped = warp_ground_truth(values, truth)
    for t, p, wpd in zip(truth, values > 0.5, warped):
        assert ndimage.label(wpd, FOUR)[1] == ndimage.label(t, FOUR)[1]
        assert ndimage.label(np.pad(~wpd, 1, constant_values=True), EIGHT)[1] == \
            ndimage.label(np.pad(~t, 1, constant_values=True), EIGHT)[1]
        assert np.count_nonzero(wpd != p) <= np.count_nonzero(t != p)


# ----------------------------------------------------------------------------- Rand/V_info vs skimage
def test_rand_and_v_info_follow_fiji_formulas_not_skimage(two_cells):
    from skimage.metrics import adapted_rand_error

    # Proposal with a 1-px border ring inside each cell (thick membranes): 32 interior pixels of the
    # ground truth become proposal border. Cells: A' = B' = rows 1-3 x 3 columns = 9 px each.
    prop = np.zeros(two_cells.shape, np.float32)
    prop[1:4, 1:4] = 1.0
    prop[1:4, 7:10] = 1.0
    truth_cells = ndimage.label(two_cells > 0, FOUR)[0]
    prop_cells = ndimage.label(prop > 0.5, FOUR)[0]
    # Fiji, no thinning: rows A, B: {A': 9, singletons: 16}, {B': 9, singletons: 16}.
    # TP = 9^2 + 9^2 + 32 = 194 = TP + FP; TP + FN = 25^2 + 25^2 = 1250.
    recall = 194 / 1250
    assert rand_error(prop, two_cells) == pytest.approx(1 - 2 * recall / (1 + recall))  # 0.7313...
    # skimage: proposal label 0 is one object and pairs are n(n-1): sum n_ij^2 - n = (81 + 16^2) * 2 - 50 = 624,
    # sum a_i^2 - n = 1200 (truth), sum b_j^2 - n = 81 + 81 + 32^2 - 50 = 1136 (proposal)
    # -> error = 1 - 2 * 624 / (1200 + 1136) = 0.4657... (skimage returns 624/1200 as "precision").
    error, precision, recall_sk = adapted_rand_error(truth_cells, prop_cells)
    assert (precision, recall_sk) == (pytest.approx(624 / 1200), pytest.approx(624 / 1136))
    assert error == pytest.approx(1 - 2 * 624 / 2336)
    assert abs(error - rand_error(prop, two_cells)) > 0.2
    # After thinning (V_rand), the ring is flooded back into the cells, dam on the membrane column:
    assert v_rand(prop, two_cells) == 1.0
    assert v_info(prop, two_cells) == 1.0


# ----------------------------------------------------------------------------- real ISBI labels
@pytest.fixture(scope="module")
def isbi_labels():
    path = ISBI_DIR / "train-labels.tif"
    if not path.exists():
        pytest.skip(f"ISBI 2012 labels not found at {path}")
    import tifffile

    return tifffile.imread(path)


def test_real_labels_identical_and_thicker_borders(isbi_labels):
    truth = isbi_labels[0]
    assert isbi_scores(truth / 255.0, truth) == {
        "v_rand": 1.0, "v_info": 1.0, "rand_error": 0.0, "warping_error": 0.0, "pixel_error": 0.0}
    # Membranes 2 px thicker on each side: the thinned scores barely move, the old Rand error does.
    thick = ndimage.binary_erosion(truth > 0, FOUR, iterations=2).astype(np.float32)
    assert v_rand(thick, truth) > 0.99 and v_info(thick, truth) > 0.99  # measured 0.9964, 0.9960
    assert rand_error(thick, truth) > 0.1  # measured 0.109


def test_real_labels_stack_is_per_slice(isbi_labels):
    truth = isbi_labels[:3]
    rng = np.random.default_rng(3)
    prop = np.clip(ndimage.gaussian_filter((truth > 0).astype(np.float32), (0, 2, 2))
                   + rng.normal(0, 0.1, truth.shape), 0, 1).astype(np.float32)
    per_slice = [v_rand(p, t, thresholds=[0.5]) for p, t in zip(prop, truth)]
    assert v_rand(prop, truth, thresholds=[0.5]) == pytest.approx(np.mean(per_slice))
    assert 0.5 < np.mean(per_slice) < 1.0


# ----------------------------------------------------------------------------- SEG
def voronoi_labels(rng, shape, n, holes=0.2):
    seeds = np.zeros(shape, np.int32)
    seeds[tuple(rng.integers(0, s, n) for s in shape)] = np.arange(1, n + 1)
    _, indices = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(indices)]
    labels[rng.random(shape) < holes] = 0
    labels[..., :2] = 0  # background present, as py-ctcmetrics assumes
    return labels


def test_seg_hand_computed():
    truth = np.zeros((1, 20), np.int32)
    truth[0, :10], truth[0, 10:] = 1, 2
    assert seg_score(truth, truth) == 1.0
    split = np.zeros_like(truth)
    split[0, :6], split[0, 6:10], split[0, 10:] = 1, 2, 3  # A split 6 + 4: 6 > 5 matches, J = 6/10
    assert seg_score(truth, split) == pytest.approx((0.6 + 1.0) / 2)
    merged = np.where(truth > 0, 7, 0)  # one object over both: each covered fully, J = 10/20
    assert seg_score(truth, merged) == pytest.approx(0.5)
    missing = np.where(truth == 1, 1, 0)
    assert seg_score(truth, missing) == pytest.approx(0.5)
    half = np.where(truth == 1, 1, 0)
    half[0, 5:10] = 0  # covers exactly half of A: not more than 50 %, no match
    assert seg_score(truth, half) == pytest.approx(0.0)
    assert seg_score([truth, truth], [truth, missing]) == pytest.approx(3 / 4)  # pooled over frames
    assert math.isnan(seg_score(np.zeros((3, 3), int), np.ones((3, 3), int)))


@pytest.mark.parametrize("shape", [(64, 64), (10, 32, 32)], ids=["2d", "3d"])
def test_seg_equals_py_ctcmetrics(tmp_path, shape):
    import tifffile
    from ctc_metrics.metrics import seg
    from ctc_metrics.utils.representations import match

    rng = np.random.default_rng(4)
    truths = [voronoi_labels(rng, shape, 15) for _ in range(3)]
    preds = [voronoi_labels(rng, shape, 12) for _ in range(2)] + [truths[2]]
    refs, ious = [], []
    for k, (truth, pred) in enumerate(zip(truths, preds)):
        tifffile.imwrite(tmp_path / f"t{k}.tif", truth.astype(np.uint16))
        tifffile.imwrite(tmp_path / f"p{k}.tif", pred.astype(np.uint16))
        matched = match(str(tmp_path / f"t{k}.tif"), str(tmp_path / f"p{k}.tif"))
        refs.append(matched[0])
        ious.append(matched[4])
    assert seg_score(truths, preds) == pytest.approx(seg(refs, ious), abs=1e-12)


def test_seg_equals_py_ctcmetrics_on_real_labels(tmp_path, isbi_labels):
    import tifffile
    from ctc_metrics.metrics import seg
    from ctc_metrics.utils.representations import match

    truth = ndimage.label(isbi_labels[0] > 0, FOUR)[0]
    pred = ndimage.label(ndimage.binary_erosion(isbi_labels[1] > 0, FOUR, iterations=3), FOUR)[0]
    tifffile.imwrite(tmp_path / "t.tif", truth.astype(np.uint16))
    tifffile.imwrite(tmp_path / "p.tif", pred.astype(np.uint16))
    matched = match(str(tmp_path / "t.tif"), str(tmp_path / "p.tif"))
    assert seg_score(truth, pred) == pytest.approx(seg([matched[0]], [matched[4]]), abs=1e-12)


# ----------------------------------------------------------------------------- AP and PQ
def hungarian_reference(truth, pred, thresholds):
    """Dense IoU by brute force, then the largest one-to-one matching with IoU >= t per threshold."""
    true_ids, pred_ids = np.unique(truth[truth > 0]), np.unique(pred[pred > 0])
    iou = np.zeros((true_ids.size, pred_ids.size))
    for a, i in enumerate(true_ids):
        for b, j in enumerate(pred_ids):
            inter = np.count_nonzero((truth == i) & (pred == j))
            iou[a, b] = inter / np.count_nonzero((truth == i) | (pred == j))
    result = []
    for t in thresholds:
        allowed = (iou >= t).astype(float)
        rows, cols = linear_sum_assignment(allowed, maximize=True) if allowed.size else ([], [])
        tp = int(allowed[rows, cols].sum()) if allowed.size else 0
        total = true_ids.size + pred_ids.size - tp
        result.append(tp / total if total else 1.0)
    return result


def test_average_precision_hand_computed():
    truth = np.zeros((1, 20), np.int32)
    truth[0, :10], truth[0, 10:] = 1, 2
    perfect = average_precision(truth, truth)
    assert perfect["ap"] == [1.0] * 10 and perfect["mean_ap"] == 1.0 and perfect["thresholds"] == list(AP_THRESHOLDS)
    split = truth.copy()
    split[0, 6:10] = 3  # A -> 6 + 4 px: IoU(A, part) = 0.6
    result = average_precision(truth, split)
    # t <= 0.6: TP 2 (A and B), FP 1, FN 0 -> 2/3; t > 0.6: TP 1 (B), FP 2, FN 1 -> 1/4
    assert result["ap"] == pytest.approx([2 / 3] * 3 + [1 / 4] * 7)
    assert result["mean_ap"] == pytest.approx((3 * 2 / 3 + 7 / 4) / 10)
    assert result["tp"][0] == 2 and result["fp"][0] == 1 and result["fn"][0] == 0
    merged = np.where(truth > 0, 1, 0)  # IoU 0.5 with both: one-to-one lets only one match at t = 0.5
    assert average_precision(truth, merged)["ap"] == pytest.approx([1 / 2] + [0.0] * 9)
    missing = np.where(truth == 1, 1, 0)
    assert average_precision(truth, missing)["ap"] == pytest.approx([0.5] * 10)
    empty = average_precision(np.zeros((2, 2), int), np.zeros((2, 2), int))
    assert empty["ap"] == [1.0] * 10 and empty["n_true"] == 0


@pytest.mark.parametrize("shape", [(48, 48), (8, 24, 24)], ids=["2d", "3d"])
def test_average_precision_equals_hungarian_reference(shape):
    rng = np.random.default_rng(5)
    for _ in range(3):
        truth = voronoi_labels(rng, shape, 12, holes=0.05)
        pred = ndimage.grey_dilation(truth, size=3) if rng.random() < 0.5 else voronoi_labels(rng, shape, 10)
        thresholds = (0.3, 0.5, 0.55, 0.7, 0.9)
        expected = hungarian_reference(truth, pred, thresholds)
        assert average_precision(truth, pred, thresholds)["ap"] == pytest.approx(expected)
    # exact ties at IoU 0.5 need the one-to-one matching
    tie_truth = np.array([[1, 1, 2, 2]])
    tie_pred = np.array([[1, 1, 1, 1]])
    assert average_precision(tie_truth, tie_pred, [0.5])["ap"] == hungarian_reference(tie_truth, tie_pred, [0.5])


def test_panoptic_quality_hand_computed():
    truth = np.zeros((1, 20), np.int32)
    truth[0, :10], truth[0, 10:] = 1, 2
    split = truth.copy()
    split[0, 6:10] = 3
    # matches: (A, 6 px part) IoU 0.6 and (B, B) IoU 1; FP = the 4 px part
    result = panoptic_quality(truth, split)
    assert result["sq"] == pytest.approx(1.6 / 2)
    assert result["rq"] == pytest.approx(2 / 2.5)
    assert result["pq"] == pytest.approx(1.6 / 2.5)
    assert panoptic_quality(truth, truth)["pq"] == 1.0


def test_class_scores_hand_computed():
    truth = np.array([[0, 0, 1, 1, 2]])
    pred = np.array([[0, 1, 1, 1, 0]])
    scores = class_scores(truth, pred)
    assert scores[0] == {"iou": 1 / 3, "dice": 0.5, "support": 2}
    assert scores[1] == {"iou": 2 / 3, "dice": 0.8, "support": 2}
    assert scores[2] == {"iou": 0.0, "dice": 0.0, "support": 1}
    assert class_scores(truth, pred, classes=[5])[5]["iou"] == 1.0  # absent from both


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: isbi_scores(np.zeros((4, 4)), np.ones((4, 5))), ValueError, "same shape"),
        (lambda: isbi_scores(np.zeros((4, 4)), np.arange(16).reshape(4, 4)), ValueError, "must be binary"),
        (lambda: isbi_scores(np.full((4, 4), 255.0), np.ones((4, 4))), ValueError, r"\[0, 1\]"),
        (lambda: isbi_scores(np.full((4, 4), np.nan), np.ones((4, 4))), ValueError, r"\[0, 1\]"),
        (lambda: isbi_scores(np.zeros((4, 4)), np.zeros((4, 4))), ValueError, "no interior"),
        (lambda: isbi_scores(np.zeros((0, 4)), np.zeros((0, 4))), ValueError, "empty"),
        (lambda: isbi_scores(np.zeros((2, 2, 4, 4)), np.ones((2, 2, 4, 4))), ValueError, "dimensions"),
        (lambda: v_rand(np.zeros((4, 4)), np.ones((4, 4)), thresholds=[1.5]), ValueError, "thresholds"),
        (lambda: warping_error(np.zeros((4, 4)), np.ones((4, 4)), threshold=-1), ValueError, "threshold"),
        (lambda: splits_and_mergers_error(np.zeros((4, 4)), np.ones((4, 5))), ValueError, "same shape"),
        (lambda: thin_borders(np.zeros((2, 2, 2), bool)), ValueError, r"\(Y, X\)"),
        (lambda: thin_borders(np.full((2, 2), 0.5)), ValueError, "binary"),
        (lambda: seg_score(np.zeros((4, 4), int), np.zeros((4, 5), int)), ValueError, "same shape"),
        (lambda: seg_score(np.zeros((4, 4)), np.zeros((4, 4), int)), TypeError, "integer label image"),
        (lambda: seg_score(-np.ones((4, 4), int), np.zeros((4, 4), int)), ValueError, ">= 0"),
        (lambda: seg_score([np.zeros((4, 4), int)], []), ValueError, "frames"),
        (lambda: seg_score([np.zeros((4, 4), int)], np.zeros((4, 4), int)), ValueError, "both"),
        (lambda: seg_score(np.zeros((0,), int), np.zeros((0,), int)), ValueError, "empty"),
        (lambda: average_precision(np.ones((4, 4), int), np.ones((4, 4), int), [0.0]), ValueError, "IoU"),
        (lambda: panoptic_quality(np.ones((4, 4), int), np.ones((3, 4), int)), ValueError, "same shape"),
        (lambda: class_scores(np.ones((4, 4), int), np.ones((3, 4), int)), ValueError, "same shape"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_merges_and_splits_hand_computed():
    truth = np.array([[1, 1, 1, 2, 2, 2, 0, 3, 3, 3, 3, 0, 4, 4, 0, 0]])
    pred = np.array([[5, 5, 5, 5, 5, 5, 0, 6, 6, 7, 7, 0, 0, 0, 0, 8]])
    counts = merges_and_splits(truth, pred)
    # 5 holds all of 1 and 2 (a merge of two); 3 holds two predictions (a split); 4 is missed; 8 is noise
    assert counts == {"merges": 1, "merged_true": 2, "splits": 1, "missed": 2, "spurious": 1, "n_true": 4,
                      "n_pred": 4}
    perfect = merges_and_splits([truth, truth], [truth, truth])
    assert perfect["merges"] == perfect["splits"] == perfect["missed"] == perfect["spurious"] == 0
    assert perfect["n_true"] == 8
