"""Multiscale pyramids of OME-Zarr images, planned and written blockwise with bounded memory.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zarr

from . import io

__all__ = ["Level", "pyramid_factors", "plan_levels", "write_image", "PYRAMID_MIN_SIZE", "level_shards"]

_LOG = logging.getLogger(__name__)
# Levels are added until the smallest yx axis would drop below this.
PYRAMID_MIN_SIZE = 512
# --- pyramid planning and blockwise writing --------------------------------------------------

@dataclass
class Level:
    """One resolution level: shape, chunks and block extents (in its own pixels), and the
    downsampling factors relative to the previous level (1 or 2 per axis)."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    factors: tuple[int, ...]
    block: tuple[int, ...]
    array: zarr.Array | None = None


def pyramid_factors(axes: str, shape: Sequence[int], scale: Sequence[float],
                     min_size: int = PYRAMID_MIN_SIZE, max_levels: int = 16) -> list[tuple[int, ...]]:
    """Per-level factors: 2x in y/x until both are <= ``min_size``; z too when that keeps voxels
    closest to isotropic (z spacing <= sqrt(2) x the y/x spacing)."""
    factors = []
    shape, scale = list(shape), list(scale)
    iy, ix = axes.index("y"), axes.index("x")
    while max(shape[iy], shape[ix]) > min_size and len(factors) < max_levels:
        level = [1] * len(axes)
        level[iy] = level[ix] = 2
        if "z" in axes:
            iz = axes.index("z")
            if shape[iz] > 1 and scale[iz] <= math.sqrt(2) * min(scale[iy], scale[ix]):
                level[iz] = 2
        factors.append(tuple(level))
        shape = [-(-n // f) for n, f in zip(shape, level)]
        scale = [s * f for s, f in zip(scale, level)]
    return factors


def plan_levels(axes: str, shape: Sequence[int], chunks: Sequence[int], itemsize: int,
                 factors: list[tuple[int, ...]], block_bytes: int) -> list[Level]:
    """Levels with block extents that nest: a block of level L covers whole blocks of L-1.

    Level 0 blocks are one chunk in t/c/z and, in y/x, the whole plane when the block fits
    ``block_bytes``, else the chunk times a power of two (y first, then x); blocks of small
    planes then take 2, 4, ... chunks along t and z, up to ``block_bytes``. Coarser levels
    halve the extent along downsampled axes, never below one chunk, so that every block
    edge of level L falls on a block edge of level L-1.
    """
    shape, chunks = tuple(shape), tuple(min(c, n) for c, n in zip(chunks, shape))
    iy, ix = axes.index("y"), axes.index("x")
    block = list(chunks)
    base = itemsize * int(np.prod([c for i, c in enumerate(chunks) if i not in (iy, ix)]))

    def fits(by: int, bx: int) -> bool:
        return base * by * bx <= block_bytes

    if fits(shape[iy], shape[ix]):
        block[iy], block[ix] = shape[iy], shape[ix]
    elif fits(chunks[iy], shape[ix]):
        block[ix] = shape[ix]
        while block[iy] * 2 < shape[iy] and fits(block[iy] * 2, shape[ix]):
            block[iy] *= 2
    else:
        while block[ix] * 2 < shape[ix] and fits(chunks[iy], block[ix] * 2):
            block[ix] *= 2
    # small planes: more chunks along t, then z (doubling keeps the levels' blocks nested)
    for name in "tz":
        if name in axes:
            i = axes.index(name)
            while block[i] < shape[i] and itemsize * int(np.prod(block)) * 2 <= block_bytes:
                block[i] *= 2
    levels = [Level("0", shape, chunks, (1,) * len(axes), tuple(block))]
    for number, level_factors in enumerate(factors, start=1):
        previous = levels[-1]
        new_shape = tuple(-(-n // f) for n, f in zip(previous.shape, level_factors))
        new_chunks = tuple(min(c, n) for c, n in zip(chunks, new_shape))
        new_block = []
        for e, n_prev, n, c, f in zip(previous.block, previous.shape, new_shape, new_chunks, level_factors):
            if e >= n_prev or c >= n:
                new_block.append(n)
            else:
                new_block.append(min(n, max(c, e // f)))
        levels.append(Level(str(number), new_shape, new_chunks, level_factors, tuple(new_block)))
    return levels


def _blocks(level: Level, bounds: Sequence[tuple[int, int]]) -> Iterator[tuple[tuple[int, int], ...]]:
    """The blocks of ``level`` inside ``bounds`` (which are aligned on its block grid)."""
    ranges = []
    for (lo, hi), e, n in zip(bounds, level.block, level.shape):
        hi = min(hi, n)
        ranges.append([(s, min(s + e, hi)) for s in range(lo, hi, e)])
    return itertools.product(*ranges)


def _pair_sum(plane: np.ndarray, axis: int, start: int, stop: int, size: int) -> tuple[np.ndarray, int]:
    """Sums of neighbour pairs along ``axis`` of rows ``start:stop`` of an axis of ``size``.

    A pair split between two blocks gets a zero for its missing half (the other block adds
    it); the last row of an odd-sized axis pairs with itself. Returns the sums and the index
    of the first pair.
    """
    front = start % 2
    back = (stop - start + front) % 2
    if front or back:
        parts = []
        if front:
            parts.append(np.zeros_like(plane.take([0], axis=axis)))
        parts.append(plane)
        if back:
            last = plane.take([plane.shape[axis] - 1], axis=axis)
            parts.append(last if stop == size else np.zeros_like(last))
        plane = np.concatenate(parts, axis=axis)
    even = [slice(None)] * plane.ndim
    odd = [slice(None)] * plane.ndim
    even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
    return plane[tuple(even)] + plane[tuple(odd)], (start - front) // 2


def _accumulate_mean(acc: np.ndarray, origin: Sequence[int], data: np.ndarray,
                     region: Sequence[tuple[int, int]], factors: Sequence[int], shape: Sequence[int]) -> None:
    """Add the 2x(2x2) block sums of ``data`` (a block of the finer level at ``region``) into
    ``acc`` (sums for the coarser level, starting at ``origin``), one output plane at a time."""
    lead = data.ndim - 2
    parent_ranges = [range(s // f, (e - 1) // f + 1) for (s, e), f in zip(region[:lead], factors[:lead])]
    offsets = list(itertools.product(*[range(f) for f in factors[:lead]]))
    for parent in itertools.product(*parent_ranges):
        plane = None
        for offset in offsets:
            index = []
            for a in range(lead):
                child = min(parent[a] * factors[a] + offset[a], shape[a] - 1)
                if not region[a][0] <= child < region[a][1]:
                    break
                index.append(child - region[a][0])
            else:
                source = data[tuple(index)]
                if plane is None:
                    plane = source.astype(acc.dtype)
                else:
                    plane += source
        if plane is None:
            continue
        starts = []
        for axis, a in enumerate((lead, lead + 1)):
            (s, e), f = region[a], factors[a]
            if f == 2:
                plane, first = _pair_sum(plane, axis, s, e, shape[a])
            else:
                first = s
            starts.append(first - origin[a])
        target = acc[tuple(p - o for p, o in zip(parent, origin[:lead]))]
        target[starts[0]:starts[0] + plane.shape[0], starts[1]:starts[1] + plane.shape[1]] += plane


def _take_nearest(out: np.ndarray, origin: Sequence[int], data: np.ndarray,
                  region: Sequence[tuple[int, int]], factors: Sequence[int]) -> None:
    """Copy every f-th element of ``data`` into ``out``: stride subsampling, never mixing ids."""
    source, target = [], []
    for (s, e), f, o in zip(region, factors, origin):
        first = -(-s // f)
        last = -(-e // f)
        source.append(slice(first * f - s, e - s, f))
        target.append(slice(first - o, last - o))
    out[tuple(target)] = data[tuple(source)]


class _PyramidWriter:
    """Writes level 0 from ``read`` block by block and builds every coarser level from the
    blocks while they are in memory, so that the stack is read once and never held whole.

    Blocks are visited depth first: a block of level L is produced from the blocks of level
    L-1 it covers, each written as soon as it is complete; at most one block per level is in
    memory (plus one write in flight). Building the pyramid from the finished level 0 instead
    would decompress all of it again: blosc-zstd through zarr reads ~0.4 GB/s here, ~10 s
    more for a 4 GB stack whose whole ingest with pyramid takes ~15 s.
    """

    def __init__(self, levels: list[Level], read: Callable[[Sequence[slice]], np.ndarray], dtype: np.dtype,
                 method: str, check: Callable[[np.ndarray], None] | None = None) -> None:
        self.levels, self.read, self.dtype, self.method, self.check = levels, read, np.dtype(dtype), method, check
        if self.dtype.kind == "f":
            self.acc_dtype = np.float32
        else:
            self.acc_dtype = np.uint16 if self.dtype.itemsize == 1 else np.uint32
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ingest-write")
        self._pending: Future | None = None

    def run(self) -> None:
        top = len(self.levels) - 1
        try:
            for region in _blocks(self.levels[top], [(0, n) for n in self.levels[top].shape]):
                self._produce(top, region)
            self._wait()
        finally:
            self._pool.shutdown(wait=True)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, level: Level, region, data: np.ndarray) -> None:
        self._wait()  # one write in flight: the next block is read while this one compresses
        self._pending = self._pool.submit(_write_pieces, level.array, region, data)

    def _produce(self, number: int, region: tuple[tuple[int, int], ...]) -> np.ndarray:
        level = self.levels[number]
        if number == 0:
            data = self.read([slice(s, e) for s, e in region])
            if self.check is not None:
                self.check(data)
        else:
            finer = self.levels[number - 1]
            shape = tuple(e - s for s, e in region)
            origin = tuple(s for s, _ in region)
            bounds = [(s * f, e * f) for (s, e), f in zip(region, level.factors)]
            if self.method == "mean":
                acc = np.zeros(shape, self.acc_dtype)
            else:
                acc = np.empty(shape, self.dtype)
            for child in _blocks(finer, bounds):
                child_data = self._produce(number - 1, child)
                if self.method == "mean":
                    _accumulate_mean(acc, origin, child_data, child, level.factors, finer.shape)
                else:
                    _take_nearest(acc, origin, child_data, child, level.factors)
                del child_data
            data = self._finish(acc, int(np.prod(level.factors))) if self.method == "mean" else acc
        self._write(level, region, data)
        return data

    def _finish(self, acc: np.ndarray, count: int) -> np.ndarray:
        if self.dtype.kind == "f":
            acc *= np.float32(1.0 / count)
            return acc
        acc += count // 2  # round half up
        acc >>= count.bit_length() - 1
        return acc.astype(self.dtype)


_WRITE_BYTES = 64 << 20


def _write_pieces(array: zarr.Array, region: Sequence[tuple[int, int]], data: np.ndarray) -> None:
    """Write ``data`` at ``region`` (chunk-aligned) in pieces of whole chunks of <= 64 MiB.

    zarr copies every chunk it encodes (and numcodecs allocates a full-size output buffer),
    so one write of a whole block would briefly need twice the block again; a piece of a few
    chunks still keeps both cores compressing.
    """
    if data.nbytes <= _WRITE_BYTES:
        array[tuple(slice(s, e) for s, e in region)] = data
        return
    split = [a for a, ((s, e), c) in enumerate(zip(region, array.chunks)) if e - s > c]
    if not split:
        array[tuple(slice(s, e) for s, e in region)] = data
        return
    axis = split[0]  # the outermost axis with more than one chunk
    (start, stop), chunk = region[axis], array.chunks[axis]
    slab = data.nbytes * chunk // (stop - start)  # bytes of one chunk's thickness along axis
    step = chunk * max(1, _WRITE_BYTES // max(slab, 1))
    for first in range(start, stop, step):
        last = min(first + step, stop)
        piece = list(region)
        piece[axis] = (first, last)
        local = [slice(None)] * data.ndim
        local[axis] = slice(first - start, last - start)
        _write_pieces(array, piece, data[tuple(local)])


def _datasets(levels: list[Level], axes: str, scale: Sequence[float], method: str) -> list[dict]:
    datasets = []
    cumulative = [1] * len(axes)
    for level in levels:
        cumulative = [c * f for c, f in zip(cumulative, level.factors)]
        transforms = [{"type": "scale", "scale": [float(s * c) for s, c in zip(scale, cumulative)]}]
        if method == "mean" and any(c > 1 for c in cumulative):
            # the mean of f pixels sits at the centre of the f pixels it averages
            transforms.append({"type": "translation",
                               "translation": [float(s * (c - 1) / 2) for s, c in zip(scale, cumulative)]})
        datasets.append({"path": level.path, "coordinateTransformations": transforms})
    return datasets


_METHODS = {
    "mean": {"type": "local_mean", "metadata": {
        "description": "mean of each 2x2 (y, x) or 2x2x2 (z, y, x) block, integers rounded half up; "
                       "the last row of an odd-sized axis counts twice", "method": "unet_core.ingest.ingest"}},
    "nearest": {"type": "nearest", "metadata": {
        "description": "every second pixel (stride subsampling): label ids are never mixed",
        "method": "unet_core.ingest.ingest"}},
}


def write_image(group: zarr.Group, source, axes: str, levels: list[Level], scale, units, name: str, *,
                 method: str, attributes: dict, write_empty_chunks: bool,
                 check: Callable[[np.ndarray], None] | None = None, shards: Sequence[int] | None = None,
                 image_label: dict | None = None) -> None:
    """Create the arrays of ``levels`` in ``group`` and stream ``source`` into them.

    In a zarr v3 group (NGFF 0.5) the arrays are sharded: ``shards`` (NGFF order, cut to each
    level's shape and rounded up to its chunks), or each level's block, so that every block is
    written as whole shards. One thread writes, block after block: a shard is never written by
    two writers at once.
    """
    sharded = group.metadata.zarr_format == 3
    for level in levels:
        level.array = io.create_array(group, level.path, axes=axes, shape=level.shape, dtype=source.dtype,
                                      chunks=level.chunks, shards=level_shards(level, shards) if sharded else None,
                                      write_empty_chunks=write_empty_chunks)
    order = [source.axes.index(a) for a in axes]
    inverse = [axes.index(a) for a in source.axes]

    def read(region: Sequence[slice]) -> np.ndarray:
        data = source.read([region[i] for i in inverse])
        return data.transpose(order)

    _PyramidWriter(levels, read, source.dtype, method, check).run()
    group.attrs.update({
        **io.ngff_attributes(io.group_format(group), multiscales=io.multiscales(
            axes, scale, name, units, _datasets(levels, axes, scale, method), _METHODS[method] if len(levels) > 1
            else None), image_label=image_label),
        **attributes,
    })


def level_shards(level: Level, shards: Sequence[int] | None) -> tuple[int, ...]:
    """The shard shape of a level: ``shards`` or the level's block, within the level's shape,
    rounded up to whole chunks."""
    wanted = shards if shards is not None else level.block
    if len(wanted) != len(level.shape):
        raise ValueError(f"shards {tuple(wanted)} do not fit the {len(level.shape)} axes of the image")
    return tuple(-(-min(s, n) // c) * c for s, n, c in zip(wanted, level.shape, level.chunks))


