"""Fluorescence nuclei end to end: dim nuclei next to bright ones are found, touching ones split."""

import numpy as np
import pytest
import tifffile

from unet_core import ingest, io
from unet_core.demo import synthetic_nuclei
from unet_core.metrics import merges_and_splits
from unet_core.normalize import Normalization
from unet_core.predict import predict_image
from unet_core.prepare import prepare_targets
from unet_core.segment import segment_image
from unet_core.train import TrainSettings, train

# nuclei at most this bright, relative to the brightest, count as dim (the range is 20x)
DIM = 0.2


def _matched(truth, pred, ids):
    """Ground-truth objects ``ids`` covered by more than half by one predicted object (SEG's match)."""
    found = 0
    for i in ids:
        inside = truth == i
        hits = np.bincount(pred[inside])
        hits[0] = 0
        found += int(2 * hits.max() > inside.sum())
    return found


@pytest.fixture(scope="module")
def nuclei_run(tmp_path_factory):
    """A small model trained on 2 frames of dim and bright nuclei (20x range), frames 2-3 predicted."""
    root = tmp_path_factory.mktemp("nuclei")
    image, labels, brightness = synthetic_nuclei((4, 160, 160), seed=5, cluster_size=2, texture=0.5)
    tifffile.imwrite(root / "n.tif", image, imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(root / "n_labels.tif", labels.astype(np.uint16), imagej=True, metadata={"axes": "TYX"})
    common = dict(labels_path=root / "n_labels.tif", axes="tyx")
    training = ingest.ingest(root / "n.tif", root / "train.ome.zarr", subset={"t": slice(0, 2)}, **common)
    held_out = ingest.ingest(root / "n.tif", root / "test.ome.zarr", subset={"t": slice(2, 4)}, **common)
    settings = TrainSettings(base_channels=16, depth=3, tile=92, batch_size=4, steps=400, learning_rate=0.002,
                             gray_strength=0.3, validate_every=10**6, log_every=100, seed=0,
                             normalize=Normalization(method="percentile", scope="image"))
    model = train(train_images=[str(training)], train_weights=[str(prepare_targets(training, root / "w.zarr"))],
                  out_dir=root / "model", settings=settings) / "model.pt"
    probabilities = predict_image(model, held_out, root / "p.ome.zarr", dtype="float16")
    # the settings of config/nuclei.yaml
    segmentation = segment_image(root / "p.ome.zarr", root / "s.ome.zarr", method="interior_watershed",
                                 threshold=0.3, seed_threshold=0.8, sigma=1.0, h=0.1, min_size=10,
                                 min_relative_size=0.1)
    return {"labels": labels[2:], "brightness": brightness, "probabilities": probabilities,
            "segmentation": np.asarray(io.open_image(segmentation).array)}


def test_dim_nuclei_next_to_bright_ones_are_found(nuclei_run):
    truth, pred, brightness = nuclei_run["labels"], nuclei_run["segmentation"], nuclei_run["brightness"]
    found = total = bright_found = bright_total = 0
    for t in range(len(truth)):
        ids = np.unique(truth[t][truth[t] > 0])
        dim = ids[brightness[ids - 1] <= DIM]
        assert brightness[ids - 1].max() / brightness[dim - 1].min() > 10  # the frame spans the range
        found, total = found + _matched(truth[t], pred[t], dim), total + len(dim)
        bright = ids[brightness[ids - 1] > DIM]
        bright_found, bright_total = bright_found + _matched(truth[t], pred[t], bright), bright_total + len(bright)
    assert total >= 20
    assert found / total >= 0.9, f"dim nuclei found: {found} of {total}"
    assert bright_found / bright_total >= 0.9, f"bright nuclei found: {bright_found} of {bright_total}"


def test_touching_nuclei_are_split_and_few_fragments(nuclei_run):
    counts = merges_and_splits(list(nuclei_run["labels"]), list(nuclei_run["segmentation"]))
    assert counts["merges"] <= 0.05 * counts["n_true"], counts
    assert counts["spurious"] <= 0.05 * counts["n_true"], counts
