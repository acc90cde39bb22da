"""Overlap-tile geometry: where tiles go and how borders are mirrored. Pure numpy.

Positions are in output (image) coordinates along each spatial axis. A tile with output
origin ``o`` and output size ``out`` reads the input ``[o - margin, o + out + margin)``.
Tile origins stay on the pooling grid (multiples of ``2**depth`` from the image origin):
a tile shifted by any other amount sees a different max-pooling phase and its output would
differ from whole-image prediction.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["axis_origins", "tile_origins", "reflect_indices", "read_reflected"]


def axis_origins(size: int, out: int, grid: int) -> list[int]:
    """Tile origins along one axis of length ``size`` for output tiles of length ``out``.

    Tiles advance by the largest multiple of ``grid`` that fits in ``out`` and the last tile
    is pulled back toward the border (to the next grid position at or after ``size - out``)
    so it overlaps the previous one instead of running far past the image. It overhangs the
    image by less than ``grid`` pixels, or by ``out - size`` when the image is shorter than
    one tile.
    """
    if size < 1 or out < 1 or grid < 1:
        raise ValueError(f"size, out and grid must be positive, got {size}, {out}, {grid}")
    step = (out // grid) * grid
    if step == 0:
        raise ValueError(f"output tile length {out} is smaller than the pooling grid {grid}")
    if size <= out:
        return [0]
    last = -(-(size - out) // grid) * grid
    origins = list(range(0, last, step))
    origins.append(last)
    return origins


def tile_origins(shape: Sequence[int], tile: Sequence[int], grid: int) -> list[tuple[int, ...]]:
    """All tile origins (one tuple per tile) covering ``shape`` with output tiles ``tile``."""
    axes = [axis_origins(s, t, grid) for s, t in zip(shape, tile)]
    return list(itertools.product(*axes))


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices into an axis of ``size`` for positions ``[start, stop)``, mirrored like
    ``numpy.pad(mode="reflect")`` (edge not repeated), also for reaches beyond the size."""
    positions = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    positions = np.mod(positions, period)
    return np.where(positions >= size, period - positions, positions)


def read_reflected(array, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    """Read ``array[start:stop]`` over its trailing axes, mirroring outside the array.

    ``array`` is any array-like with numpy slicing (numpy, zarr, dask); only the bounding
    box of the needed in-bounds region is read. Leading axes not covered by ``start`` are
    read whole.
    """
    lead = array.ndim - len(start)
    index = [reflect_indices(a, b, n) for a, b, n in zip(start, stop, array.shape[lead:])]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
    block = np.asarray(array[(slice(None),) * lead + box])
    for axis, (ind, sl) in enumerate(zip(index, box)):
        local = ind - sl.start
        if not (len(local) == block.shape[lead + axis] and np.array_equal(local, np.arange(len(local)))):
            block = np.take(block, local, axis=lead + axis)
    return block
