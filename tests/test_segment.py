"""Blockwise segmentation equals whole-image segmentation up to a relabelling."""

import numpy as np
import pytest
from scipy import ndimage

from unet_core import io
from unet_core.segment import close_contacts, instances_from_probabilities, interior_watershed, segment_image


def _probabilities(tmp_path, foreground, axes, chunks, ndim):
    probs = np.stack([1 - foreground, foreground], axis=axes.index("c"))
    with io.atomic_image(tmp_path / "p.ome.zarr", axes, probs.shape, dtype="float32", scale=[1.0] * len(axes),
                         chunks=chunks, attributes={"unet_core": {"model_ndim": ndim}}) as out:
        out.array[...] = probs
    return tmp_path / "p.ome.zarr"


def _same_partition(a, b):
    """True when a and b are equal up to a bijective renumbering of nonzero ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def _blobs(shape, seed):
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return (smooth - smooth.min()) / (smooth.max() - smooth.min())


@pytest.mark.parametrize("min_size", [0, 12])
def test_2d_planes_blockwise_equal_whole_image(tmp_path, min_size):
    foreground = np.stack([_blobs((70, 90), s) for s in range(3)]).astype(np.float32)  # t, y, x
    path = _probabilities(tmp_path, foreground, "tcyx", (1, 2, 16, 24), 2)
    labels = io.open_image(segment_image(path, tmp_path / "s.ome.zarr", threshold=0.55, min_size=min_size))
    assert labels.axes == "tyx" and labels.array.dtype == np.uint32
    for t in range(3):
        expected = instances_from_probabilities(foreground[t], threshold=0.55, min_size=min_size)
        got = np.asarray(labels.array[t])
        assert _same_partition(got, expected)
        assert got.max() == expected.max()  # renumbered 1..n


def test_3d_blockwise_equals_whole_volume(tmp_path):
    foreground = _blobs((20, 40, 36), 7).astype(np.float32)
    path = _probabilities(tmp_path, foreground, "czyx", (2, 8, 12, 12), 3)
    got = np.asarray(io.open_image(segment_image(path, tmp_path / "s.ome.zarr", threshold=0.5, min_size=0)).array[:])
    assert _same_partition(got, instances_from_probabilities(foreground, threshold=0.5))


def test_bad_threshold(tmp_path):
    with pytest.raises(ValueError, match="threshold"):
        segment_image(tmp_path / "nothing", tmp_path / "s", threshold=2.0)


def _touching_discs(shape, centres, radius):
    """Interior probabilities of discs/balls of ``radius`` that touch: 0.9 inside, a 0.6 neck between two."""
    grid = np.indices(shape)
    distance = np.stack([np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) for centre in centres])
    nearest = distance.min(axis=0)
    second = np.sort(distance, axis=0)[1]
    foreground = np.where(nearest < radius, 0.9, 0.05)
    foreground[(nearest < radius) & (second - nearest < 2)] = 0.6  # the weak neck of a contact
    # no two voxels alike: a watershed breaks ties of equal values by the order it meets them
    foreground += np.random.default_rng(len(centres)).uniform(0, 1e-3, shape)
    return foreground.astype(np.float32)


@pytest.mark.parametrize("ndim", [2, 3])
def test_interior_watershed_splits_touching_and_is_blockwise_exact(tmp_path, ndim):
    rng = np.random.default_rng(ndim)
    if ndim == 2:
        shape, chunks, axes = (120, 130), (2, 32, 40), "cyx"
        centres = [c for c in rng.uniform(10, 120, (40, 2))]
        radius = 9
    else:
        shape, chunks, axes = (30, 48, 44), (2, 15, 24, 22), "czyx"
        centres = [c for c in rng.uniform(5, 40, (14, 3))]
        radius = 7
    foreground = _touching_discs(shape, centres, radius)
    path = _probabilities(tmp_path, foreground, axes, chunks, ndim)
    got = np.asarray(io.open_image(segment_image(path, tmp_path / "s.ome.zarr", threshold=0.5, min_size=0,
                                                 method="interior_watershed", seed_threshold=0.8, sigma=0)).array[:])
    expected = interior_watershed(foreground, threshold=0.5, seed_threshold=0.8, sigma=0)
    # ids are consistent across chunk faces: the blockwise result is the whole-image one
    assert _same_partition(got, expected)
    components = instances_from_probabilities(foreground, threshold=0.5)
    seeds, n_seeds = ndimage.label(foreground > 0.8, structure=ndimage.generate_binary_structure(ndim, 1))
    assert got.max() == n_seeds > components.max()  # touching discs split: one object per seed


def test_interior_watershed_drops_regions_without_confident_interior():
    foreground = np.full((20, 30), 0.05, np.float32)
    foreground[2:8, 2:8] = 0.95
    foreground[12:18, 12:18] = 0.7  # above threshold, never confident: noise, not an object
    labels = interior_watershed(foreground, threshold=0.5, seed_threshold=0.8)
    assert labels.max() == 1 and (labels > 0).sum() == 36


def test_close_contacts_leaves_outer_edges():
    labels = np.zeros((9, 12), np.uint32)
    labels[2:7, 1:5] = 1
    labels[2:7, 7:11] = 2  # a two-pixel gap at x = 5, 6
    closed = close_contacts(labels)
    assert (closed[2:7, 5] == 1).all() and (closed[2:7, 6] == 2).all()
    assert (closed[0] == 0).all() and (closed[8] == 0).all() and (closed[:, 11] == 0).all()


def test_relative_min_size_follows_the_training_objects(tmp_path):
    foreground = np.full((40, 40), 0.05, np.float32)
    foreground[2:12, 2:12] = 0.95  # 100 px
    foreground[20:23, 20:23] = 0.95  # 9 px fragment
    probs = np.stack([1 - foreground, foreground])
    path = tmp_path / "p.ome.zarr"
    with io.atomic_image(path, "cyx", probs.shape, dtype="float32", scale=[1.0] * 3, chunks=(2, 16, 16),
                         attributes={"unet_core": {"model_ndim": 2, "training_objects": {"median_size": 100.0}}}) as out:
        out.array[...] = probs
    kept = io.open_image(segment_image(path, tmp_path / "a.ome.zarr", method="interior_watershed", sigma=0,
                                       min_relative_size=0.2))
    assert np.asarray(kept.array).max() == 1 and kept.attrs["unet_core"]["min_size"] == 20
    both = np.asarray(io.open_image(segment_image(path, tmp_path / "b.ome.zarr", method="interior_watershed",
                                                  sigma=0, min_size=0)).array)
    assert both.max() == 2
