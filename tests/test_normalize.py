"""Intensity normalisation: the same function in training and prediction, per image or per stack."""

import numpy as np
import pytest
import tifffile
import torch
from conftest import whole_image_reference

from unet_core import UNet, ingest, io, normalize
from unet_core.normalize import Normalization, normalization_table
from unet_core.predict import predict_image
from unet_core.train import TrainSettings, load_training_stack, train

PERCENTILE = Normalization(method="percentile", scope="image", low=1.0, high=99.8)


def _stack(tmp_path, seed=0, labels=False):
    """(T, Y, X) uint16 frames whose brightness halves from frame to frame (bleaching)."""
    rng = np.random.default_rng(seed)
    data = np.stack([rng.gamma(2.0, 300.0 / 2**t, (47, 61)) + 100 for t in range(3)]).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", data, metadata={"axes": "TYX"}, photometric="minisblack")
    truth = None
    if labels:
        truth = np.zeros(data.shape, np.uint16)
        truth[:, 5:20, 5:25], truth[:, 25:40, 10:50] = 1, 2
        tifffile.imwrite(tmp_path / "in_labels.tif", truth, metadata={"axes": "TYX"}, photometric="minisblack")
    path = ingest.ingest(tmp_path / "in.tif", tmp_path / "in.ome.zarr", axes="tyx",
                     labels_path=tmp_path / "in_labels.tif" if labels else None)
    return path, data.astype(np.float32)


def _by_hand(frame, low=1.0, high=99.8):
    p_low, p_high = np.percentile(frame.astype(np.float64), [low, high])
    return (frame - np.float32(p_low)) / np.float32(p_high - p_low)


def test_percentile_per_image_is_numpy_percentiles_of_each_frame(tmp_path):
    path, data = _stack(tmp_path)
    table = normalization_table(io.open_image(path), PERCENTILE, ("t",))
    assert len(table.offset) == 3
    for t in range(3):
        np.testing.assert_allclose(table.apply(data[t][None], {"t": t})[0], _by_hand(data[t]), rtol=1e-5, atol=1e-6)
    # per stack: one row, the percentiles of all frames together
    stack = normalization_table(io.open_image(path), Normalization(method="percentile", scope="stack"), ("t",))
    np.testing.assert_allclose(stack.offset[0], np.percentile(data, 1.0), rtol=1e-6)
    assert stack.row({"t": 2}) == 0


def test_zscore_per_stack_is_what_models_before_it_used(tmp_path):
    path, _ = _stack(tmp_path)
    image = io.open_image(path)
    table = normalization_table(image, Normalization(), ("t",))
    mean, std = normalize.intensity_statistics(image)
    assert table.offset == (tuple(mean),) and table.divisor == (tuple(std),)
    assert Normalization.from_checkpoint("zscore-per-stack") == Normalization() == Normalization.from_checkpoint(None)
    assert Normalization.from_checkpoint(PERCENTILE.as_dict()) == PERCENTILE


def test_large_images_are_sampled_by_chunks(tmp_path, monkeypatch):
    path, data = _stack(tmp_path)
    exact = normalization_table(io.open_image(path), PERCENTILE, ("t",))
    monkeypatch.setattr(normalize, "_EXACT_VOXELS", 100)
    monkeypatch.setattr(normalize, "_SAMPLE_CHUNKS", 2)
    sampled = normalization_table(io.open_image(path), PERCENTILE, ("t",))
    # chunks of 512 px cover the whole 47 x 61 frame: the sample is the frame itself here
    assert sampled.offset == exact.offset and sampled.divisor == exact.divisor


def test_constant_image_gets_divisor_one(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", np.full((2, 8, 8), 7, np.uint16), metadata={"axes": "TYX"})
    image = io.open_image(ingest.ingest(tmp_path / "c.tif", tmp_path / "c.ome.zarr", axes="tyx"))
    assert normalization_table(image, PERCENTILE, ("t",)).divisor == ((1.0,), (1.0,))


@pytest.mark.parametrize("settings, message", [
    ({"method": "minmax"}, "normalize.method"), ({"scope": "plane"}, "normalize.scope"),
    ({"low": 50, "high": 10}, "low < high"), ({"lowest": 1}, "unknown normalize settings"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Normalization.from_config(settings)


def test_training_and_prediction_normalise_with_the_same_function(tmp_path):
    path, data = _stack(tmp_path, labels=True)
    # training: each frame normalised by its own percentiles
    stack = load_training_stack(path, None, 2, normalization=PERCENTILE)
    for t in range(3):
        np.testing.assert_allclose(stack.planes[t][0], _by_hand(data[t]), rtol=1e-5, atol=1e-6)
    # a model trained with it records it, and prediction reads it from the checkpoint
    settings = TrainSettings(base_channels=4, depth=2, tile=20, batch_size=1, steps=2, validate_every=100,
                             log_every=1, normalize=PERCENTILE)
    out = train(train_images=[str(path)], out_dir=tmp_path / "model", settings=settings)
    checkpoint = torch.load(out / "model.pt", weights_only=True)
    assert checkpoint["normalization"] == PERCENTILE.as_dict()
    model = UNet(**checkpoint["architecture"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    predict_image(out / "model.pt", path, tmp_path / "p.ome.zarr", block_shape=(32, 32), tile_shape=(12, 12),
                  dtype="float32")
    probs = io.open_image(tmp_path / "p.ome.zarr")
    assert probs.attrs["unet_core"]["normalization"]["method"] == "percentile"
    for t in range(3):
        np.testing.assert_allclose(probs.array[t], whole_image_reference(model, stack.planes[t]), atol=1e-5)
