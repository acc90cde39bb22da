"""Blockwise segmentation equals whole-image segmentation up to a relabelling."""

import numpy as np
import pytest
from scipy import ndimage

from unet_core import io
from unet_core.segment import instances_from_probabilities, segment_image


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
    got = np.asarray(io.open_image(segment_image(path, tmp_path / "s.ome.zarr", threshold=0.5)).array[:])
    assert _same_partition(got, instances_from_probabilities(foreground, threshold=0.5))


def test_bad_threshold(tmp_path):
    with pytest.raises(ValueError, match="threshold"):
        segment_image(tmp_path / "nothing", tmp_path / "s", threshold=2.0)
