"""Intensity normalisation of raw stacks, the same in training and prediction.

Two methods (config ``normalize.method``), each per stack or per image (``normalize.scope``):

- ``zscore``: ``(x - mean) / std``. Per stack it is the whole-stack mean and std computed once
  (:func:`intensity_statistics`), the behaviour of every model trained before
  percentile normalisation existed.
- ``percentile``: ``(x - p_low) / (p_high - p_low)`` with the ``low`` and ``high`` percentiles
  (1 and 99.8 by default, as in CSBDeep/StarDist): robust to a few very bright objects (mitoses,
  debris) that would otherwise set the scale, so that dim objects keep their contrast.

``scope: image`` normalises each image the model sees on its own: each plane of a 2D model (per
t, and per z when a 2D model predicts a z stack plane by plane), each volume of a 3D model (per
t). That follows photobleaching and focus drift in a time-lapse. ``scope: stack`` uses one set
of statistics for the whole stack.

Statistics are always taken over whole images, never per block or tile (per-block statistics
would make seams). The model's checkpoint records the :class:`Normalization` it was trained
with, and prediction reads it from there, so both normalise with the same function
(:meth:`NormalizationTable.apply`).

Axis order: images are numpy ``(C, *spatial)``; ``where`` maps loop axes (t, z) to positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import dask.array as da
import numpy as np

from . import io
from .defaults import choices, default

__all__ = ["Normalization", "NormalizationTable", "normalization_table", "image_statistics", "intensity_statistics",
           "NORMALIZATION_METHODS", "NORMALIZATION_SCOPES", "STATISTICS_MAX_CHUNKS"]

NORMALIZATION_METHODS = choices("normalize", "method")
NORMALIZATION_SCOPES = choices("normalize", "scope")

# An image (or stack) of at most this many voxels per channel is read whole for its statistics;
# a larger one is sampled: _SAMPLE_CHUNKS chunks at evenly spaced positions of its chunk grid,
# every voxel of them. A percentile of 10^7 voxels is within about 10^-3 of its quantile.
_EXACT_VOXELS = 1 << 25
_SAMPLE_CHUNKS = 256
# The checkpoint of a model trained before this module existed says this.
_LEGACY = "zscore-per-stack"


@dataclass(frozen=True)
class Normalization:
    """How raw intensities are normalised (config section ``normalize``).

    Examples
    --------
    >>> Normalization(method="percentile", scope="image").describe()
    'percentile 1.0-99.8 per image'
    """

    method: str = default("normalize", "method")
    scope: str = default("normalize", "scope")
    low: float = default("normalize", "low")
    high: float = default("normalize", "high")

    def __post_init__(self) -> None:
        if self.method not in NORMALIZATION_METHODS:
            raise ValueError(f"normalize.method must be one of {NORMALIZATION_METHODS}, got {self.method!r}")
        if self.scope not in NORMALIZATION_SCOPES:
            raise ValueError(f"normalize.scope must be one of {NORMALIZATION_SCOPES}, got {self.scope!r}")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(f"normalize.low and normalize.high must be percentiles with 0 <= low < high <= 100, "
                             f"got low={self.low!r}, high={self.high!r}")

    @classmethod
    def from_config(cls, section: Mapping | None) -> Normalization:
        """From the validated ``normalize`` config section (None or {} = the z-score per stack)."""
        section = dict(section or {})
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown normalize settings {sorted(unknown)}; allowed: "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**{k: float(v) if k in ("low", "high") else v for k, v in section.items()})

    @classmethod
    def from_checkpoint(cls, value) -> Normalization:
        """What a checkpoint's ``normalization`` entry says (older checkpoints: z-score per stack)."""
        if value is None or value == _LEGACY:
            return cls(method="zscore", scope="stack")  # what they did, whatever today's default
        if isinstance(value, Mapping):
            return cls.from_config(value)
        raise ValueError(f"unknown normalization {value!r} in the checkpoint")

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        what = "z-score" if self.method == "zscore" else f"percentile {self.low}-{self.high}"
        return f"{what} per {self.scope}"


@dataclass(frozen=True)
class NormalizationTable:
    """The offsets and divisors of one stack: one row per image (``scope: image``) or one row.

    Picklable and small (a few floats per image), so blockwise workers carry it.
    """

    normalization: Normalization
    loop_axes: tuple[str, ...]
    loop_shape: tuple[int, ...]
    offset: tuple[tuple[float, ...], ...]
    divisor: tuple[tuple[float, ...], ...]

    def row(self, where: Mapping[str, int]) -> int:
        """Index of the row of the image at loop positions ``where``."""
        if len(self.offset) == 1:
            return 0
        return int(np.ravel_multi_index([where[a] for a in self.loop_axes], self.loop_shape))

    def apply(self, data: np.ndarray, where: Mapping[str, int]) -> np.ndarray:
        """Normalised float32 copy of ``data`` ``(C, *spatial)`` of the image at ``where``."""
        k = self.row(where)
        shape = (-1, *[1] * (data.ndim - 1))
        offset = np.asarray(self.offset[k], np.float32).reshape(shape)
        divisor = np.asarray(self.divisor[k], np.float32).reshape(shape)
        # One new array, converted from the raw dtype as it is read (the same float32 operations
        # as a float32 copy minus offset, over divisor): 2.8x faster on a 3D block with context,
        # where this was two thirds of reading a block.
        result = np.subtract(data, offset, dtype=np.float32)
        return np.divide(result, divisor, out=result)

    def as_dict(self, max_rows: int = 4096) -> dict:
        """For provenance: the settings and the rows (a summary above ``max_rows`` rows)."""
        result = {**self.normalization.as_dict(), "rows": len(self.offset)}
        if len(self.offset) <= max_rows:
            result.update(offset=[list(r) for r in self.offset], divisor=[list(r) for r in self.divisor])
        return result


def normalization_table(image: io.Image, normalization: Normalization, loop_axes: Sequence[str]) -> NormalizationTable:
    """Statistics of ``image`` for ``normalization``; ``loop_axes`` are the axes whose positions
    are separate images of the model (t, and z for a 2D model), in the image's order. A constant
    image gets divisor 1 (it would otherwise divide by 0).
    """
    loop_axes = tuple(a for a in image.axes if a in loop_axes)
    loop_shape = tuple(image.shape[image.axes.index(a)] for a in loop_axes)
    if normalization.method == "zscore" and normalization.scope == "stack":
        mean, std = intensity_statistics(image)
        return NormalizationTable(normalization, loop_axes, loop_shape, (tuple(mean),), (tuple(std),))
    positions = [dict(zip(loop_axes, p)) for p in np.ndindex(*loop_shape)] if normalization.scope == "image" else [{}]
    offsets, divisors = [], []
    for where in positions:
        offset, divisor = image_statistics(_values(image, where), normalization)
        offsets.append(offset)
        divisors.append(divisor)
    return NormalizationTable(normalization, loop_axes, loop_shape, tuple(offsets), tuple(divisors))


def image_statistics(values: np.ndarray, normalization: Normalization) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Offset and divisor per channel of the voxels ``values`` ``(C, N)`` of one image: mean and
    (population) standard deviation, or the low and high percentiles' value and difference
    (``numpy.percentile``, linear). A constant channel gets divisor 1."""
    values = np.asarray(values, np.float64)
    if normalization.method == "zscore":
        offset, divisor = values.mean(axis=1), values.std(axis=1)
    else:
        low, high = np.percentile(values, [normalization.low, normalization.high], axis=1)
        offset, divisor = low, high - low
    divisor = np.where(divisor > 0, divisor, 1.0)
    return tuple(float(v) for v in offset), tuple(float(v) for v in divisor)


def _values(image: io.Image, where: Mapping[str, int]) -> np.ndarray:
    """The voxels of the image at ``where`` as ``(C, N)`` float64: all of them, or those of
    :data:`_SAMPLE_CHUNKS` evenly spread chunks when there are more than :data:`_EXACT_VOXELS`."""
    array, axes = image.array, image.axes
    free = [i for i, a in enumerate(axes) if a not in where and a != "c"]
    channel = axes.index("c") if "c" in axes else None
    voxels = math.prod(array.shape[i] for i in free)
    if voxels <= _EXACT_VOXELS:
        regions = [tuple(where[a] if a in where else slice(None) for a in axes)]
    else:
        grid = [-(-array.shape[i] // array.chunks[i]) for i in free]
        picks = np.unique(np.linspace(0, math.prod(grid) - 1, _SAMPLE_CHUNKS).round().astype(np.int64))
        regions = []
        for flat in picks:
            position = dict(zip(free, np.unravel_index(int(flat), grid)))
            regions.append(tuple(
                where[a] if a in where else slice(None) if i not in position
                else slice(position[i] * array.chunks[i], (position[i] + 1) * array.chunks[i])
                for i, a in enumerate(axes)))
    parts = []
    for region in regions:
        block = np.asarray(array[region], np.float64)
        kept = [a for a in axes if a not in where]
        if channel is None:
            parts.append(block.reshape(1, -1))
        else:
            parts.append(np.moveaxis(block, kept.index("c"), 0).reshape(block.shape[kept.index("c")], -1))
    return np.concatenate(parts, axis=1)


# Above this many chunks, intensity statistics come from this many chunks spread evenly over the
# volume: a terabyte volume has 10^5-10^7 chunks, and neither one client reading all of them nor a
# dask graph of one task per chunk scales (bench/scale.py). 1024 chunks of a varied volume give
# the mean and standard deviation to well under 1 %.
STATISTICS_MAX_CHUNKS = 1024


def intensity_statistics(image: io.Image, max_chunks: int | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over the whole image, streamed by chunks.

    An image of more than ``max_chunks`` chunks (default :data:`STATISTICS_MAX_CHUNKS`) is
    sampled: that many chunks at evenly spaced positions of its chunk grid (in storage order,
    so every part of the volume contributes), merged exactly as if they were the image.
    """
    max_chunks = STATISTICS_MAX_CHUNKS if max_chunks is None else max_chunks
    array = image.array
    # chunk grid; a sample reads every channel at its position
    grid = tuple(1 if a == "c" else -(-s // c) for a, s, c in zip(image.axes, array.shape, array.chunks))
    count = math.prod(grid)
    reduce_axes = tuple(i for i, a in enumerate(image.axes) if a != "c")
    if count <= max_chunks:
        data = da.from_zarr(array).astype(np.float64)
        mean, std = da.compute(data.mean(axis=reduce_axes), data.std(axis=reduce_axes))
    else:
        mean, std = _sampled_statistics(image, grid, reduce_axes, np.linspace(0, count - 1, max_chunks).round())
    mean, std = np.atleast_1d(mean), np.atleast_1d(std)
    std = np.where(std > 0, std, 1.0)
    return [float(m) for m in mean], [float(s) for s in std]


def _sampled_statistics(image: io.Image, grid, reduce_axes, picks) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over the chunks at flat grid positions ``picks`` (merged by Chan et al.'s
    pairwise update, which stays exact where sums of squares would cancel)."""
    array = image.array

    def moments(flat):
        position = np.unravel_index(int(flat), grid)
        region = tuple(slice(None) if a == "c" else slice(p * c, min((p + 1) * c, s))
                       for a, p, c, s in zip(image.axes, position, array.chunks, array.shape))
        chunk = np.asarray(array[region], np.float64)
        n = math.prod(chunk.shape[a] for a in reduce_axes)
        mean = chunk.mean(axis=reduce_axes)
        return n, mean, ((chunk - np.expand_dims(mean, reduce_axes)) ** 2).sum(axis=reduce_axes)

    total, mean, m2 = 0, 0.0, 0.0
    with ThreadPoolExecutor(8) as pool:
        for n, chunk_mean, chunk_m2 in pool.map(moments, np.unique(picks)):
            delta = chunk_mean - mean
            merged = total + n
            mean = mean + delta * n / merged
            m2 = m2 + chunk_m2 + delta**2 * total * n / merged
            total = merged
    return mean, np.sqrt(m2 / total)


