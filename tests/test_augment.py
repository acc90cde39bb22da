import itertools

import numpy as np
import pytest
import torch

from unet_core.augment import augment_batch, augment_sample, deform, elastic_field


def test_zero_sigma_is_identity(rng):
    image = rng.random((1, 40, 40)).astype(np.float32)
    labels = rng.integers(0, 5, (40, 40))
    field = elastic_field((40, 40), sigma=0.0, grid=3, rng=rng)
    np.testing.assert_allclose(deform(image[0], field, order=3), image[0], atol=1e-5)
    np.testing.assert_array_equal(deform(labels, field, order=0), labels)


def test_displacement_statistics_match_paper_parameters():
    rng = np.random.default_rng(0)
    coarse = []
    for _ in range(300):
        field = elastic_field((90, 90), sigma=10.0, grid=3, rng=rng)
        coarse.append(field[:, 15, 15])  # centre of the first coarse cell: a grid value
    coarse = np.array(coarse)
    assert coarse.std() == pytest.approx(10.0, rel=0.1)
    assert abs(coarse.mean()) < 1.5
    field = elastic_field((90, 90), sigma=10.0, grid=3, rng=np.random.default_rng(1))
    # smooth: neighbouring pixels move almost alike
    assert np.abs(np.diff(field, axis=1)).max() < 2.0


@pytest.mark.parametrize("shape", [(48, 48), (16, 24, 24)])
def test_labels_stay_a_subset_of_input_ids(shape, rng):
    labels = rng.choice([0, 3, 17, 42], size=shape)
    image = rng.random((1, *shape)).astype(np.float32)
    weight = rng.random(shape).astype(np.float32)
    out_image, out_labels, out_weight = augment_sample(image, labels, weight, rng=rng)
    assert set(np.unique(out_labels)) <= {0, 3, 17, 42}
    assert out_image.shape == image.shape and out_weight.shape == weight.shape


def test_reproducible_from_seed():
    image = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    labels = np.zeros((32, 32), np.int64)
    weight = np.ones((32, 32), np.float32)
    a = augment_sample(image, labels, weight, rng=np.random.default_rng(5))
    b = augment_sample(image, labels, weight, rng=np.random.default_rng(5))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_field_is_bicubic_interpolation_of_the_coarse_grid():
    from scipy import ndimage

    field = elastic_field((60, 45), sigma=10.0, grid=3, rng=np.random.default_rng(7))
    coarse = np.random.default_rng(7).normal(0, 10.0, (2, 3, 3))
    expected = np.stack([ndimage.zoom(c, (20, 15), order=3, mode="nearest", grid_mode=True) for c in coarse])
    np.testing.assert_allclose(field, expected, atol=1e-4)


def test_rotation_by_zero_and_crop():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (30, 30))
    field = np.zeros((2, 30, 30), np.float32)
    np.testing.assert_array_equal(deform(labels, field, order=0, angle=0.0, crop=(slice(5, 25),) * 2),
                                  labels[5:25, 5:25])
    quarter = deform(labels, field, order=0, angle=np.pi / 2)
    np.testing.assert_array_equal(quarter, np.rot90(labels, -1))


def test_bicubic_image_resampling_matches_the_spline_on_smooth_images():
    """2D images are resampled by bicubic convolution (torch); same geometry as scipy's spline."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    image = ndimage.gaussian_filter(rng.normal(size=(70, 90)), 4).astype(np.float32)
    image /= image.std()
    field = elastic_field(image.shape, sigma=10.0, grid=3, rng=rng)
    ours = deform(image, field, order=3, angle=0.7)
    coords = np.indices(image.shape, dtype=np.float32)
    centre = [(s - 1) / 2 for s in image.shape]
    y, x = coords[0] - centre[0], coords[1] - centre[1]
    coords = np.stack([np.cos(0.7) * y - np.sin(0.7) * x + centre[0],
                       np.sin(0.7) * y + np.cos(0.7) * x + centre[1]]) + field
    spline = ndimage.map_coordinates(image, coords, order=3, mode="mirror")
    # The kernels differ by a few percent of the image's std; a geometry error (axes swapped,
    # off by half a pixel, another mirror) would be of the order of the std itself.
    difference = np.abs(ours - spline)
    assert difference.max() < 0.05 and difference.mean() < 0.01
    shifted = ndimage.map_coordinates(image, coords + 0.5, order=3, mode="mirror")
    assert np.abs(ours - shifted).mean() > 5 * difference.mean()
    np.testing.assert_allclose(deform(image[:, :70], np.zeros((2, 70, 70), np.float32), order=3, angle=np.pi / 2),
                               np.rot90(image[:, :70], -1), atol=1e-4)


def test_a_tile_does_not_depend_on_its_batch():
    rng = np.random.default_rng(4)
    images = rng.random((3, 2, 36, 36)).astype(np.float32)
    targets = rng.integers(0, 3, (3, 36, 36))
    weights = rng.random((3, 36, 36)).astype(np.float32)
    crop = (slice(8, 28),) * 2
    batch = augment_batch(images, targets, weights, rngs=[np.random.default_rng([1, i]) for i in range(3)], crop=crop)
    for i in range(3):
        single = augment_sample(images[i], targets[i], weights[i], rng=np.random.default_rng([1, i]), crop=crop)
        for part, expected in zip(batch, single):
            np.testing.assert_allclose(part[i].numpy(), expected, atol=1e-6)
    assert batch[0].shape == (3, 2, 36, 36) and batch[1].shape == batch[2].shape == (3, 20, 20)
    assert batch[1].dtype == torch.int64 and batch[2].dtype == torch.float32


def _dihedral_moves(ndim, square):
    """Every flip (of any axes) followed by a quarter turn of the last two axes (when square)."""
    for flips in itertools.product([False, True], repeat=ndim):
        for turns in range(4 if square else 1):
            def move(a, flips=flips, turns=turns):
                axes = [a.ndim - ndim + k for k, f in enumerate(flips) if f]
                return np.rot90(np.flip(a, axes), turns, axes=(-2, -1)) if axes else np.rot90(a, turns, axes=(-2, -1))
            yield (flips, turns), move


@pytest.mark.parametrize("shape", [(24, 24), (24, 32), (8, 16, 16)])
def test_flips_and_quarter_turns_alone_move_pixels_exactly(shape):
    """Without deformation, rotation and gray values a tile is one of the flips/quarter turns of
    the input, the same one for image, target and weight (cropped centrally); over many seeds
    every one of them occurs. Quarter turns only where the last two axes are square."""
    ndim, square = len(shape), shape[-1] == shape[-2]
    crop = tuple(slice(s // 4, s - s // 4) for s in shape)
    index = np.arange(np.prod(shape)).reshape(shape)  # tells the moves apart
    seen = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        image = rng.random((2, *shape)).astype(np.float32)
        target = rng.integers(0, 50, shape)
        weight = rng.random(shape).astype(np.float32)
        out = augment_sample(image, target, weight, rng=rng, elastic_sigma=0.0, rotation=False, gray_strength=0.0,
                             crop=crop)
        matches = [(key, move) for key, move in _dihedral_moves(ndim, square)
                   if np.allclose(out[0], move(image), atol=1e-5)]
        assert matches, f"seed {seed}: the tile is not a flip/quarter turn of the input"
        # a random image has no symmetry: the moves that fit are one transform written several ways
        assert len({move(index).tobytes() for _, move in matches}) == 1
        move = matches[0][1]
        np.testing.assert_array_equal(out[1], move(target)[crop])
        np.testing.assert_allclose(out[2], move(weight)[crop], atol=1e-5)
        seen.add(move(index).tobytes())
    assert seen == {move(index).tobytes() for _, move in _dihedral_moves(ndim, square)}


def test_3d_rotation_turns_the_last_two_axes():
    volume = np.random.default_rng(2).random((6, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(deform(volume, np.zeros((3, 6, 10, 10), np.float32), order=3, angle=np.pi / 2),
                               np.rot90(volume, -1, axes=(1, 2)), atol=1e-4)
    labels = np.random.default_rng(3).integers(0, 9, (5, 8, 12))
    np.testing.assert_array_equal(deform(labels, np.zeros((3, 5, 8, 12), np.float32), order=0, angle=np.pi,
                                         crop=(slice(1, 4), slice(None), slice(2, 10))),
                                  labels[:, ::-1, ::-1][1:4, :, 2:10])


def test_bad_batches_raise():
    rng = np.random.default_rng(0)
    images, targets, weights = np.zeros((2, 1, 20, 20), np.float32), np.zeros((2, 20, 20), np.int64), np.ones((2, 20, 20))
    with pytest.raises(ValueError, match="1 generators"):
        augment_batch(images, targets, weights, rngs=[rng])
    with pytest.raises(ValueError, match="weights"):
        augment_batch(images, targets, weights[:, :10], rngs=[rng, rng])
    with pytest.raises(ValueError, match="crop"):
        augment_batch(images, targets, weights, rngs=[rng, rng], crop=(slice(0, 30), slice(0, 20)))
    with pytest.raises(ValueError, match="order must be 0"):
        deform(images[0, 0], np.zeros((2, 20, 20), np.float32), order=2)
