import numpy as np
import pytest

from unet_core.tiling import axis_origins, read_reflected, reflect_indices, tile_origins


@pytest.mark.parametrize("size", [1, 2, 3, 7, 20])
@pytest.mark.parametrize("pad", [0, 1, 5, 19, 45])
def test_reflect_indices_match_numpy_pad(size, pad):
    data = np.arange(size)
    expected = np.pad(data, pad, mode="reflect") if size > 1 else np.zeros(size + 2 * pad, int)
    np.testing.assert_array_equal(data[reflect_indices(-pad, size + pad, size)], expected)


def test_read_reflected_equals_padding_then_slicing(rng):
    image = rng.random((3, 11, 9))
    padded = np.pad(image, ((0, 0), (20, 20), (20, 20)), mode="reflect")
    block = read_reflected(image, (-7, 2), (6, 25))
    np.testing.assert_array_equal(block, padded[:, 13:26, 22:45])


def test_axis_origins_cover_and_stay_on_grid():
    for size in (1, 15, 16, 100, 257, 1536):
        for out in (20, 36, 388):
            origins = axis_origins(size, out, 16)
            assert all(o % 16 == 0 for o in origins)
            covered = np.zeros(size, bool)
            for o in origins:
                covered[o:o + out] = True
            assert covered.all()
            assert origins[-1] + out - size < max(16, out - size + 1)


def test_last_tile_is_pulled_back():
    # 1536 px in 1012-px tiles: two tiles, the second overlaps instead of running past.
    assert axis_origins(1536, 1012, 16) == [0, 528]


def test_tile_origins_product():
    assert len(tile_origins((100, 50), (36, 36), 8)) == len(axis_origins(100, 36, 8)) * len(axis_origins(50, 36, 8))
