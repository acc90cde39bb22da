import numpy as np
import pytest
import torch
from conftest import whole_image_reference

from unet_core import UNet, predict_tiled
from unet_core.predict import default_tile_shape


@pytest.mark.parametrize(
    "ndim,shape,channels,tile",
    [
        (2, (61, 77), 1, (20, 36)),
        (2, (61, 77), 2, (28, 28)),
        (2, (33, 9), 1, (12, 12)),
        (3, (13, 29, 22), 1, (12, 12, 20)),
        (3, (5, 18, 17), 3, (4, 12, 12)),
    ],
)
def test_tiled_equals_whole_image(ndim, shape, channels, tile):
    torch.manual_seed(0)
    model = UNet(in_channels=channels, base_channels=4, depth=2, ndim=ndim, dropout=0.0)
    image = np.random.default_rng(0).standard_normal((channels, *shape)).astype(np.float32)
    tiled = predict_tiled(model, image, tile_shape=tile, batch_size=3)
    expected = whole_image_reference(model, image)
    assert tiled.shape == (2, *shape)
    np.testing.assert_allclose(tiled, expected, atol=1e-5)


def test_default_tile_and_spatial_only_input():
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=2, dropout=0.0)
    image = np.random.default_rng(1).standard_normal((50, 70)).astype(np.float32)
    tile = default_tile_shape(model, image.shape, "cpu")
    assert model.input_shape_for(tile)
    probs = predict_tiled(model, image)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, whole_image_reference(model, image[None]), atol=1e-5)


def test_tta_rotates_non_square_tiles():
    """Test-time augmentation averages all 8 flips/rotations in 2D, also for a non-square tile
    (a rotated (H, W) tile is a valid (W, H) tile); one tile covers the image exactly here."""
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2, dropout=0.0)
    image = np.random.default_rng(2).standard_normal((1, 44, 52)).astype(np.float32)
    expected = np.zeros((2, 44, 52))
    for k in range(4):
        for flip in (False, True):
            x = np.rot90(image[:, :, ::-1] if flip else image, k, axes=(1, 2))
            p = np.rot90(whole_image_reference(model, x.copy()), -k, axes=(1, 2))
            expected += p[:, :, ::-1] if flip else p
    np.testing.assert_allclose(predict_tiled(model, image, tile_shape=(44, 52), tta=True), expected / 8, atol=1e-5)


def test_bad_inputs_raise():
    model = UNet(base_channels=2, depth=2, in_channels=2)
    with pytest.raises(ValueError, match="C = 2"):
        predict_tiled(model, np.zeros((1, 30, 30), np.float32))
    with pytest.raises(ValueError, match="output shape .* nearest valid"):
        predict_tiled(model, np.zeros((2, 30, 30), np.float32), tile_shape=(13, 13))
    with pytest.raises(ValueError, match="batch_size"):
        predict_tiled(model, np.zeros((2, 30, 30), np.float32), batch_size=0)
