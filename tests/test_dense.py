"""Dense tissue ground truth (every voxel in a cell, e.g. cells3d): boundary targets, the seeded
watershed, boundary average precision, Rand/VOI and the classical baseline, on small synthetic
tissue whose answer is known."""

import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from unet_core import ingest, io
from unet_core.evaluate import evaluate_stack
from unet_core.metrics import boundary_average_precision, instance_agreement
from unet_core.prepare import prepare_targets
from unet_core.report import write_report
from unet_core.segment import seeded_watershed, segment_image
from unet_core.weights import cells_of, instances_from_dense, true_boundaries


def tissue(shape=(16, 40, 40), cells=14, seed=0):
    """Dense Voronoi cells (ids 1..cells, no background) and a membrane stain of their boundaries."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int32)
    seeds[tuple(rng.integers(0, s, cells) for s in shape)] = np.arange(1, cells + 1)
    _, indices = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(indices)].astype(np.uint16)
    stain = 10 + 60 * ndimage.gaussian_filter(true_boundaries(labels).astype(np.float32), 0.7)
    stain = stain + rng.normal(0, 2, shape)
    return labels, np.clip(stain, 0, 255).astype(np.uint16)


def brute_force_boundaries(labels):
    """Voxels with a 6-neighbour (inside the volume) of another id."""
    out = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        differs = np.diff(labels, axis=axis) != 0
        lower = [slice(None)] * labels.ndim
        upper = [slice(None)] * labels.ndim
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        out[tuple(lower)] |= differs
        out[tuple(upper)] |= differs
    return out


def test_true_boundaries_are_the_voxels_with_another_id_in_their_6_neighbourhood():
    labels, _ = tissue()
    np.testing.assert_array_equal(true_boundaries(labels), brute_force_boundaries(labels))
    assert true_boundaries(np.array([[1, 1, 2, 2]])).tolist() == [[False, True, True, False]]


def test_dense_cells_are_separated_by_their_boundaries():
    labels, _ = tissue()
    cells = instances_from_dense(labels)
    boundary = true_boundaries(labels)
    assert (cells[boundary] == 0).all() and (cells[~boundary] == labels[~boundary]).all()
    # no two different cells touch any more (6-connectivity)
    for axis in range(3):
        a, b = np.moveaxis(cells, axis, 0)[:-1], np.moveaxis(cells, axis, 0)[1:]
        assert ((a == b) | (a == 0) | (b == 0)).all()
    np.testing.assert_array_equal(cells_of(labels, "dense"), cells)
    # instance ground truth with no background between cells gets the same border...
    assert (labels > 0).all()
    np.testing.assert_array_equal(cells_of(labels, "instances"), cells)
    # ... unless asked to keep touching instances as they are
    np.testing.assert_array_equal(cells_of(labels, "instances", separate=False), labels)
    with pytest.raises(ValueError, match="ground-truth kind"):
        cells_of(labels, "sparse")


def test_weight_map_stage_makes_boundary_targets_from_dense_labels(tmp_path):
    labels, stain = tissue()
    tifffile.imwrite(tmp_path / "raw.tif", stain)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    image = ingest.ingest(tmp_path / "raw.tif", tmp_path / "raw.ome.zarr", labels_path=tmp_path / "labels.tif", axes="zyx")
    import zarr

    group = zarr.open_group(prepare_targets(image, tmp_path / "w.zarr", ndim=3, labels="dense"), mode="r")
    target, weight = np.asarray(group["target"]), np.asarray(group["weight"])
    boundary = true_boundaries(labels)
    np.testing.assert_array_equal(target, (~boundary).astype(np.uint8))
    assert weight[boundary].mean() > 3 * weight[~boundary].mean()
    assert group.attrs["labels"] == "dense"
    with pytest.raises(ValueError, match="labels must be one of"):
        prepare_targets(image, tmp_path / "x.zarr", ndim=3, labels="ids")


def test_seeded_watershed_recovers_cells_from_a_boundary_map():
    labels, stain = tissue()
    found = seeded_watershed(stain.astype(np.float32), sigma=1.0, h=5.0)
    assert found.dtype == np.uint32 and found.min() == 1  # every voxel in a cell, ids from 1
    assert np.array_equal(np.unique(found), np.arange(1, found.max() + 1))
    scores = instance_agreement(labels, found)
    assert scores["adapted_rand_error"] < 0.1
    # min_size: no cell smaller than it survives, and the voxels stay assigned
    coarse = seeded_watershed(stain.astype(np.float32), sigma=0.0, h=1.0, min_size=200)
    assert np.bincount(coarse.ravel())[1:].min() >= 200 and coarse.min() == 1
    with pytest.raises(ValueError, match="h > 0"):
        seeded_watershed(stain, h=0)


def test_instance_agreement_tells_splits_from_merges():
    truth = np.repeat(np.arange(1, 5)[:, None], 20, axis=1)  # 4 rows, one cell each
    split = truth * 10 + (np.arange(20) >= 10)[None, :]  # every cell cut in half
    merged = (truth + 1) // 2
    assert instance_agreement(truth, truth) == pytest.approx(
        {"adapted_rand_error": 0.0, "voi_split": 0.0, "voi_merge": 0.0})
    s, m = instance_agreement(truth, split), instance_agreement(truth, merged)
    # one bit each: which half of a true cell, which of two merged cells
    assert s["voi_split"] == pytest.approx(1.0) and s["voi_merge"] == pytest.approx(0.0, abs=1e-12)
    assert m["voi_merge"] == pytest.approx(1.0) and m["voi_split"] == pytest.approx(0.0, abs=1e-12)
    assert 0.3 < s["adapted_rand_error"] < 0.4 and 0.3 < m["adapted_rand_error"] < 0.4


def test_boundary_average_precision_hand_computed():
    # ranks: hit (P 1, R .5), miss, hit (P 2/3, R 1), miss: AP = .5 * 1 + .5 * 2/3
    assert boundary_average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # equal scores enter together: P .5 at R .5, then P .5 at R 1
    assert boundary_average_precision([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    truth = rng.random(5000) < 0.3
    score = rng.random(5000) + truth
    assert boundary_average_precision(score, truth) == pytest.approx(boundary_average_precision(np.exp(3 * score), truth))
    assert boundary_average_precision(truth.astype(float), truth) == 1.0
    assert boundary_average_precision(rng.random(5000), truth) == pytest.approx(truth.mean(), abs=0.03)
    with pytest.raises(ValueError, match="no boundary voxel"):
        boundary_average_precision([0.5, 0.2], [0, 0])


def test_boundary_average_precision_equals_scikit_learn():
    from sklearn import metrics  # a reference implementation (test dependency)
    rng = np.random.default_rng(2)
    truth = rng.random(3000) < 0.2
    score = np.round(rng.random(3000) + 0.4 * truth, 2)  # many ties
    assert boundary_average_precision(score, truth) == pytest.approx(metrics.average_precision_score(truth, score))


def _probabilities(path, foreground):
    probs = np.stack([1 - foreground, foreground]).astype(np.float32)
    with io.atomic_image(path, "czyx", probs.shape, dtype="float32", scale=[1.0] * 4, chunks=(2, 8, 20, 20),
                         attributes={"unet_core": {"model_ndim": 3}}) as out:
        out.array[...] = probs
    return path


@pytest.fixture
def dense_stack(tmp_path):
    labels, stain = tissue(seed=3)
    tifffile.imwrite(tmp_path / "raw.tif", stain)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    image = ingest.ingest(tmp_path / "raw.tif", tmp_path / "raw.ome.zarr", labels_path=tmp_path / "labels.tif", axes="zyx")
    # A "learned" map that is the true boundary, a little blurred: better than the noisy stain.
    foreground = 1 - ndimage.gaussian_filter(true_boundaries(labels).astype(np.float32), 0.5)
    return {"labels": labels, "image": image, "probs": _probabilities(tmp_path / "p.ome.zarr", foreground),
            "foreground": foreground}


def test_segment_image_watershed_method(dense_stack, tmp_path):
    out = segment_image(dense_stack["probs"], tmp_path / "s.ome.zarr", method="watershed", sigma=0.5, h=0.2,
                        min_size=20)
    got = io.open_image(out)
    assert got.axes == "zyx" and got.attrs["unet_core"]["method"].startswith("seeded watershed")
    expected = seeded_watershed(1 - dense_stack["foreground"], sigma=0.5, h=0.2, min_size=20)
    np.testing.assert_array_equal(np.asarray(got.array[:]), expected)
    assert instance_agreement(dense_stack["labels"], expected)["adapted_rand_error"] < 0.05
    with pytest.raises(ValueError, match="segment method"):
        segment_image(dense_stack["probs"], tmp_path / "t.ome.zarr", method="magic")


def test_watershed_refuses_a_volume_too_large_for_memory(dense_stack, tmp_path, monkeypatch):
    monkeypatch.setattr("unet_core.segment._WATERSHED_MAX_VOXELS", 1000)
    with pytest.raises(ValueError, match="p.ome.zarr.*holds one 3D volume.*'components'"):
        segment_image(dense_stack["probs"], tmp_path / "s.ome.zarr", method="watershed")
    assert not (tmp_path / "s.ome.zarr").exists()


def test_evaluate_dense_scores_learned_map_and_baseline(dense_stack, tmp_path):
    seg = segment_image(dense_stack["probs"], tmp_path / "s.ome.zarr", method="watershed", sigma=0.5, h=0.2)
    result = evaluate_stack(image_path=dense_stack["image"], probabilities_path=dense_stack["probs"],
                            segmentation_path=seg, output_path=tmp_path / "m.json", stack="tissue", role="val",
                            ground_truth="dense", baseline={"sigma": 1.0, "h": 5.0})
    metrics = result["metrics"]
    labels = dense_stack["labels"]
    boundary = true_boundaries(labels)
    assert metrics["boundary_ap"] == pytest.approx(
        boundary_average_precision(1 - dense_stack["foreground"], boundary), abs=1e-6)
    stain = np.asarray(io.open_image(dense_stack["image"]).array[:], np.float32)
    assert metrics["stain_boundary_ap"] == pytest.approx(boundary_average_precision(stain, boundary))
    assert metrics["boundary_ap"] > metrics["stain_boundary_ap"]
    assert metrics["adapted_rand_error"] == pytest.approx(
        instance_agreement(labels, np.asarray(io.open_image(seg).array[:]))["adapted_rand_error"])
    baseline = metrics["baseline"]
    assert baseline["sigma"] == 1.0 and baseline["h"] == 5.0
    assert baseline["adapted_rand_error"] == pytest.approx(instance_agreement(
        labels, seeded_watershed(stain, sigma=1.0, h=5.0))["adapted_rand_error"])
    assert "foreground_iou" not in metrics  # all foreground: it would say nothing
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["voi_split"] == metrics["voi_split"]


def test_report_shows_the_baseline_and_an_escaped_ablation_table(dense_stack, tmp_path):
    seg = segment_image(dense_stack["probs"], tmp_path / "s.ome.zarr", method="watershed", sigma=0.5, h=0.2)
    evaluate_stack(image_path=dense_stack["image"], probabilities_path=dense_stack["probs"], segmentation_path=seg,
                   output_path=tmp_path / "m.json", stack="tissue", role="val", ground_truth="dense")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    ablation = tmp_path / "ablation.json"
    ablation.write_text(json.dumps({
        "title": "ablations <b>", "measured": "today", "reading": "no gain <script>x</script>",
        "columns": [["v_rand", "V_rand"], ["pixel_error", "pixel error"]],
        "rows": [{"recipe": "full", "v_rand": 0.96, "pixel_error": 0.05}, {"recipe": "no w0", "v_rand": 0.97}]}))
    html = write_report(metrics=[tmp_path / "m.json"], images=[dense_stack["image"]], segmentations=[seg],
                        model_dir=model_dir, output_path=tmp_path / "r.html", ablation=ablation).read_text()
    assert "Against the classical baseline of this run" in html and "VOI merge" in html
    assert "<td class=\"left\">no w0</td><td>0.9700</td><td>–</td>" in html
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    ablation.write_text("{not json")
    html = write_report(metrics=[tmp_path / "m.json"], images=[dense_stack["image"]], segmentations=[seg],
                        model_dir=model_dir, output_path=tmp_path / "r.html", ablation=ablation).read_text()
    assert "ablation table" in html and "not shown" in html
