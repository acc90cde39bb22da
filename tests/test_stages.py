"""The stages on demo data: ingest -> weight maps -> train -> predict -> segment -> evaluate -> report."""

import json

import numpy as np
import pytest
import torch

from unet_core import ingest, io, normalize
from unet_core.evaluate import evaluate_stack
from unet_core.predict import load_model, predict_image
from unet_core.prepare import prepare_targets
from unet_core.report import write_report
from unet_core.segment import instances_from_probabilities, segment_image
from unet_core.train import TrainSettings, train
from unet_core.weights import weight_map


@pytest.fixture(scope="module")
def pipeline(demo_tiffs, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    paths = {}
    for name in ("timelapse_a", "timelapse_c", "volume_3d"):
        paths[name] = ingest.ingest(demo_tiffs / f"{name}.tif", root / f"{name}.ome.zarr",
                                labels_path=demo_tiffs / f"{name}_labels.tif")
    weights = prepare_targets(paths["timelapse_a"], root / "timelapse_a.weights.zarr")
    val_weights = prepare_targets(paths["timelapse_c"], root / "timelapse_c.weights.zarr")
    settings = TrainSettings(base_channels=4, depth=2, tile=36, batch_size=2, steps=12, validate_every=6, log_every=3)
    model_dir = train(train_images=[str(paths["timelapse_a"])], train_weights=[str(weights)],
                      val_images=[str(paths["timelapse_c"])], val_weights=[str(val_weights)],
                      out_dir=root / "model", settings=settings)
    return {"root": root, "paths": paths, "weights": weights, "model_dir": model_dir}


def test_weight_map_stage_matches_function(pipeline):
    import zarr

    group = zarr.open_group(pipeline["weights"], mode="r")
    labels = io.read_labels(pipeline["paths"]["timelapse_a"])
    plane = np.asarray(labels.array[2]).astype(np.int64)
    np.testing.assert_allclose(group["weight"][2], weight_map(plane), atol=1e-6)
    np.testing.assert_array_equal(group["target"][2], plane > 0)


def test_weight_map_stage_needs_ground_truth(demo_tiffs, tmp_path):
    image = ingest.ingest(demo_tiffs / "timelapse_e.tif", tmp_path / "e.ome.zarr")
    with pytest.raises(ValueError, match="e.ome.zarr: has no ground truth"):
        prepare_targets(image, tmp_path / "w.zarr")
    assert not (tmp_path / "w.zarr").exists()


def test_training_outputs(pipeline):
    model_dir = pipeline["model_dir"]
    checkpoint = torch.load(model_dir / "model.pt", weights_only=True)
    assert checkpoint["architecture"]["base_channels"] == 4
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["training_data"][0]["sha256"] == io.open_image(pipeline["paths"]["timelapse_a"]).attrs[
        "unet_core"]["provenance"]["sha256"]
    log = (model_dir / "training_log.tsv").read_text().splitlines()
    assert log[0].startswith("step\tloss") and len(log) == 5
    assert "val_iou" in log[0]


def test_training_rejects_mismatched_weight_map(pipeline):
    with pytest.raises(ValueError, match="volume_3d.ome.zarr"):
        train(train_images=[str(pipeline["paths"]["volume_3d"])], train_weights=[str(pipeline["weights"])],
              out_dir=pipeline["root"] / "bad", settings=TrainSettings(steps=1))


def test_predict_segment_evaluate_report(pipeline):
    root, paths = pipeline["root"], pipeline["paths"]
    model_path = pipeline["model_dir"] / "model.pt"
    results = []
    for name in ("timelapse_c", "volume_3d"):
        probs = root / f"{name}.pred.ome.zarr"
        summary = predict_image(model_path, paths[name], probs, dtype="uint8", planewise=True)
        assert summary["computed"] == summary["blocks"] > 0
        image = io.open_image(probs)
        assert image.axes == ("czyx" if name == "volume_3d" else "tcyx")
        assert image.array.dtype == np.uint8
        # equals in-memory overlap-tile prediction of the normalised plane
        model, _ = load_model(model_path)
        source = io.open_image(paths[name])
        mean, std = normalize.intensity_statistics(source)
        plane = (np.asarray(source.array[1], np.float32) - mean[0]) / std[0]
        from unet_core import predict_tiled

        expected = np.rint(predict_tiled(model, plane) * 255)
        got = image.read({"t" if name != "volume_3d" else "z": 1}, order=("c", "y", "x"))
        np.testing.assert_array_equal(got, expected)
        seg = segment_image(probs, root / f"{name}.seg.ome.zarr", min_size=3)
        metrics = evaluate_stack(image_path=paths[name], probabilities_path=probs, segmentation_path=seg,
                                 output_path=root / f"{name}.json", stack=name, role="val")
        # the pooled foreground IoU of the whole stack, computed here from the arrays
        truth = np.asarray(io.read_labels(paths[name]).array) != 0
        predicted = np.asarray(io.open_image(seg).array) != 0
        expected_iou = np.count_nonzero(truth & predicted) / np.count_nonzero(truth | predicted)
        assert metrics["metrics"]["foreground_iou"] == pytest.approx(expected_iou, abs=1e-12)
        results.append((root / f"{name}.json", paths[name], seg))
    html = write_report(metrics=[r[0] for r in results], images=[r[1] for r in results],
                        segmentations=[r[2] for r in results], model_dir=pipeline["model_dir"],
                        output_path=root / "report" / "index.html", config={"note": "<script>alert(1)</script>"})
    text = html.read_text()
    assert text.count("data:image/png;base64,") >= 3
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;" in text


def test_instances_from_probabilities():
    foreground = np.zeros((6, 9), np.float32)
    foreground[1:5, 1:4] = 0.9
    foreground[1:5, 5:8] = 0.8
    foreground[2, 4] = 0.4  # a weak bridge: below threshold, the cells stay apart
    labels = instances_from_probabilities(foreground, threshold=0.5)
    assert labels.max() == 2
    assert instances_from_probabilities(foreground, threshold=0.3).max() == 1
    assert instances_from_probabilities(foreground, threshold=0.5, min_size=13).max() == 0
