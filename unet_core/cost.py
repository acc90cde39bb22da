"""What a forward pass of a U-Net costs: memory, work, and the tile and block sizes chosen from them.

The peak memory and the multiply-accumulates of one inference pass are walked tensor by tensor
(:func:`walk`), so that tiles fill a memory budget without exceeding it
(:func:`default_tile_shape`), blocks are a few tile steps (:func:`default_block_shape`), and the
planner (:mod:`unet_core.plan`) can price a prediction before it runs.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .model import UNet, valid_sizes
from .tiling import axis_origins

__all__ = ["Architecture", "architecture", "walk", "forward_memory", "default_tile_shape", "default_block_shape",
           "default_batch_size", "device_memory_budget", "CPU_MEMORY_BUDGET", "CUDA_BUDGET_FRACTION",
           "CUDA_MAX_MAP_ELEMENTS", "MEMORY_SAFETY", "BLOCK_TILES"]

# Memory budget of one forward pass (as estimated by forward_memory) that the default tile fills.
# On the CPU a setting: with a base-16 U-Net it allows output tiles up to about 436 px in 2D, in
# the fastest range of a measured sweep on a 2-core machine (388-516 px; larger tiles fall out of
# the caches). 3D tiles need more: the margin is a large part of a small cube.
# On CUDA the budget is a fraction of the device memory.
CPU_MEMORY_BUDGET = {2: 160 * 2**20, 3: 1024 * 2**20}
CUDA_BUDGET_FRACTION = 0.25
# forward_memory = bytes of the tensors alive at the peak x this factor, for what the allocator
# holds beyond them. CPU: glibc keeps freed feature maps in its heaps once its mmap threshold has
# risen; the peak RSS of repeated passes measured 1.1-1.45x the live bytes (once 1.56x), 2D and 3D
# (docs/predict.md). CUDA: the caching allocator's rounding and cuDNN workspaces (not measured).
MEMORY_SAFETY = {"cpu": 1.5, "cuda": 1.2}
# torch's CPU convolutions (use_mkldnn in ATen's Convolution.cpp): a batch of one whose
# C * S0 * S1 (channels x the first two spatial lengths) is at most this runs without oneDNN, through
# an im2col buffer, on a C-contiguous copy of its input, into a C-contiguous output.
_ONEDNN_MIN_ELEMENTS = 20480
# On CUDA, no feature map of one sample may have more elements than a 32-bit index reaches:
# beyond it torch does not hand a convolution to cuDNN (needs_64bit_indexing_no_split in ATen's
# Convolution.cpp) but to a slow im2col path. The default 3D tile would cross it on an
# H200-class GPU (3.1e9 elements in the first convolution of a 32-feature, depth-4 U-Net).
CUDA_MAX_MAP_ELEMENTS = 2**31 - 1
# Default block (= output chunk) edge in tile steps of the default tile.
BLOCK_TILES = 2


@dataclass(frozen=True)
class Architecture:
    """What the memory and cost of a forward pass depend on (hashable, for the tile cache)."""

    in_channels: int
    n_classes: int
    base_channels: int
    depth: int
    ndim: int
    batch_norm: bool
    shrink: int  # per 3x3 convolution: 2 for valid, 0 for zero-padded ("same") convolutions
    margin: int
    smallest: int  # smallest valid output length; the valid ones are smallest + k * 2**depth
    itemsize: int


def architecture(model: UNet, dtype: torch.dtype | None = None) -> Architecture:
    conv = model.down[0][0]
    dtype = dtype or next(model.parameters()).dtype
    return Architecture(model.in_channels, model.n_classes, model.base_channels, model.depth, model.ndim,
                         model.batch_norm, conv.kernel_size[0] - 1 - 2 * conv.padding[0], model.margin(),
                         valid_sizes(model.depth, kind="output", near=1)[-1], dtype.itemsize)


def walk(arch: Architecture, input_shape: tuple, batch_size: int, cpu: bool) -> tuple:
    """Peak elements alive, multiply-accumulates and the elements of the largest feature map of
    one sample (for :data:`CUDA_MAX_MAP_ELEMENTS`) of one inference forward pass.

    Follows :func:`unet_core.overlap_tile.forward_probabilities` and ``UNet.forward`` tensor by tensor: the input batch (and its
    channels_last copy when it has several channels) lives throughout; every skip map stays in
    ``skips`` until the end; inside a block its input and both convolution outputs are alive
    together (ReLU is in place; an eval-mode batch norm makes a new map); on the way up the
    up-convolution output, the concatenation and the block's outputs coexist. On the CPU,
    convolutions that torch runs without oneDNN add their im2col buffer and format copies.
    Lengths may be int64 arrays (broadcast together): then the results are arrays.
    """
    n = arch.ndim
    peak = macs = largest = 0
    if any(isinstance(s, np.ndarray) for s in input_shape):
        maximum, where, both, negate, lowest = np.maximum, np.where, np.logical_and, np.logical_not, np.min
    else:  # plain Python numbers: about 10x faster than numpy scalars
        maximum, both, negate, lowest = max, (lambda a, b: a and b), (lambda a: not a), (lambda a: a)
        where = (lambda condition, a, b: a if condition else b)

    def size(t):
        nonlocal largest
        largest = maximum(largest, t[0] * math.prod(t[1]))
        return batch_size * t[0] * math.prod(t[1])

    def note(elements):
        nonlocal peak
        peak = maximum(peak, elements)

    def conv(x, channels, kernel, alive, transposed=False):
        """Output (channels, shape, channels_last) of a convolution of ``x``; ``alive`` counts ``x``."""
        nonlocal macs
        c, shape, channels_last = x
        if transposed:  # stride = kernel
            out_shape = tuple(kernel * s for s in shape)
        else:
            out_shape = tuple(s - (arch.shrink if kernel > 1 else 0) for s in shape)
        if min(lowest(s) for s in out_shape) < 1:
            raise ValueError(f"input shape {input_shape} is too small for a depth-{arch.depth} U-Net")
        slow = both(cpu and kernel > 1 and batch_size == 1, c * shape[0] * shape[1] <= _ONEDNN_MIN_ELEMENTS)
        cols = channels * kernel**n * math.prod(shape) if transposed else c * kernel**n * math.prod(out_shape)
        if c > 1:  # the non-oneDNN path reads a C-contiguous copy, oneDNN a channels_last one
            extra = where(slow, cols + size(x) * channels_last, size(x) * negate(channels_last))
        else:
            extra = where(slow, cols, 0)
        out = (channels, out_shape, negate(slow))
        note(alive + size(out) + extra)
        macs += batch_size * c * channels * kernel**n * math.prod(shape if transposed else out_shape)
        return out

    def block(x, width, alive):
        first = conv(x, width, 3, alive)
        if arch.batch_norm:
            note(alive + 2 * size(first))
        second = conv(first, width, 3, alive + size(first))
        if arch.batch_norm:  # the first output is gone by then
            note(alive + 2 * size(second))
        return second

    x = (arch.in_channels, tuple(input_shape), True)
    held = size(x) * (2 if arch.in_channels > 1 else 1)
    skips, skip_maps = 0, []
    for level in range(arch.depth):
        out = block(x, arch.base_channels * 2**level, held + skips + (size(x) if level else 0))
        skip_maps.append(out)
        skips += size(out)
        x = (out[0], tuple(s // 2 for s in out[1]), out[2])
        note(held + skips + size(x))
    x = block(x, arch.base_channels * 2**arch.depth, held + skips + size(x))
    for level in reversed(range(arch.depth)):
        width = arch.base_channels * 2**level
        up = conv(x, width, 2, held + skips + size(x), transposed=True)
        concat = (2 * width, up[1], both(up[2], skip_maps[level][2]))
        note(held + skips + size(up) + size(concat))
        x = block(concat, width, held + skips + size(up) + size(concat))
    logits = conv(x, arch.n_classes, 1, held + skips + size(x))
    note(held + 2 * size(logits))  # softmax
    return peak, macs, largest


def _safety(device_type: str) -> float:
    return MEMORY_SAFETY["cpu" if device_type == "cpu" else "cuda"]


def forward_memory(model: UNet, input_shape: Sequence[int], batch_size: int = 1, *,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> int:
    """Estimated peak bytes of one inference forward pass of ``batch_size`` tiles.

    Parameters
    ----------
    model : UNet
        Valid (or zero-padded) convolutions; the padding is read from the model.
    input_shape : sequence of int
        Spatial input shape of a tile.
    batch_size : int
        Tiles per forward pass.
    device : torch device
        On the CPU, convolutions that torch runs without oneDNN (small maps, batch of one) add
        their im2col buffers and format copies.
    dtype : torch dtype, optional
        Element type of the feature maps; default: that of the model's parameters.

    Returns
    -------
    int : the bytes of the tensors alive at the peak (input batch, skip maps, the maps of the
    current block, the probabilities) times a safety factor for the allocator (1.5 on the CPU,
    1.2 on CUDA). The weights are not counted.

    Notes
    -----
    The walk follows the real tensor shapes of ``UNet.forward``; without the safety factor it
    equals the measured peak within 0.1 % for maps of more than a few MiB (CPU, 2D and 3D,
    tests/test_memory.py). With glibc's default settings the peak RSS of repeated passes is
    1.1-1.45x the live bytes, hence the factor.
    """
    device = torch.device(device)
    shape = _lengths(model, input_shape, "input_shape", batch_size)
    arch = architecture(model, dtype)
    peak, _, _ = walk(arch, shape, batch_size, device.type == "cpu")
    return math.ceil(int(peak) * arch.itemsize * _safety(device.type))


def _lengths(model: UNet, shape: Sequence[int], name: str, batch_size: int) -> tuple[int, ...]:
    """``shape`` as ints, checked: one positive length per spatial axis of ``model``, and a batch >= 1."""
    lengths = tuple(int(s) for s in shape)
    if len(lengths) != model.ndim or min(lengths) < 1:
        raise ValueError(f"{name} must be {model.ndim} positive lengths for this model, got {tuple(shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return lengths


def device_memory_budget(ndim: int, device: torch.device | str) -> int:
    """Bytes that the forward pass of a default tile may fill on ``device``: on CUDA a fraction of
    the device's memory (``CUDA_BUDGET_FRACTION``), on a CPU ``CPU_MEMORY_BUDGET`` of ``ndim``."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_BUDGET_FRACTION)
    return CPU_MEMORY_BUDGET[ndim]


def default_tile_shape(model: UNet, spatial_shape: Sequence[int], device: torch.device | str,
                       memory_budget: int | None = None, batch_size: int = 1) -> tuple[int, ...]:
    """The output tile that predicts ``spatial_shape`` with the least computation within a memory budget.

    Among the valid output tiles whose forward pass fits the budget (:func:`forward_memory`),
    the one with the fewest multiply-accumulates for the whole image: tiles needed (on the
    pooling grid, as :func:`unet_core.overlap_tile.predict_tiled` places them) times the work of one pass. On a large
    image this is the tile that fills the budget; on a given size a smaller tile may cover it
    with as many tiles (a 2048 px axis needs 5 tiles of 420 px or of 500 px). Axes shorter than
    a tile get the smallest valid tile that covers them.

    Parameters
    ----------
    model : UNet
    spatial_shape : sequence of int
        The image (or block) to predict.
    device : torch device
    memory_budget : int, optional
        Bytes; default: ``CPU_MEMORY_BUDGET[ndim]`` on the CPU, a quarter of the device memory
        on CUDA.
    batch_size : int
        Tiles per forward pass.

    Raises
    ------
    ValueError
        When not even the smallest tile fits the budget (naming both and what to change).
    """
    device = torch.device(device)
    spatial = _lengths(model, spatial_shape, "spatial_shape", batch_size)
    budget = int(memory_budget) if memory_budget is not None else device_memory_budget(model.ndim, device)
    tile = _best_tile(architecture(model), spatial, device.type, budget, batch_size)
    if isinstance(tile, tuple):
        return tile
    smallest, needed = tile["smallest"], tile["needed"]
    source = "memory_budget" if memory_budget is not None else (
        f"CPU_MEMORY_BUDGET[{model.ndim}]" if device.type == "cpu" else f"{CUDA_BUDGET_FRACTION} of the device memory")
    raise ValueError(
        f"no output tile fits the memory budget of {budget / 2**20:.0f} MiB ({source}): the smallest valid "
        f"tile for {spatial}, {smallest} (input {model.input_shape_for(smallest)}), needs about "
        f"{needed / 2**20:.0f} MiB for a forward pass of this {model.ndim}D U-Net (base {model.base_channels}, "
        f"depth {model.depth}, batch {batch_size}) on {device.type}; raise the budget (memory_budget, or "
        f"unet_core.cost.CPU_MEMORY_BUDGET[{model.ndim}] on the CPU), lower batch_size, pass tile_shape "
        f"explicitly (predict.tile in the config), or use a model with fewer base channels or less depth"
    )


def default_batch_size(model: UNet, tile_shape: Sequence[int], tiles: int, device: torch.device | str,
                       memory_budget: int | None = None) -> int:
    """Tiles per forward pass when none is given: on CUDA as many of a region's ``tiles`` as fit
    the memory budget together (:func:`forward_memory`), at least one; on a CPU one.

    On a large region the default tile alone fills the budget, so the batch is one; it grows
    where the tiles are capped by a small block or image (a GPU runs one small tile far below its
    throughput). On a CPU the budget is set for the caches (``CPU_MEMORY_BUDGET``: tiles beyond
    it ran slower in a measured sweep), so a batch of tiles would leave them as a larger tile does.

    >>> from unet_core.model import UNet
    >>> model = UNet(base_channels=16, depth=3)
    >>> default_batch_size(model, (92, 92), 9, "cpu")
    1
    >>> default_batch_size(model, (92, 92), 9, "cuda", memory_budget=2**40)
    9
    """
    device = torch.device(device)
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    if device.type == "cpu":
        return 1
    budget = int(memory_budget) if memory_budget is not None else device_memory_budget(model.ndim, device)
    shape = model.input_shape_for(tuple(tile_shape))
    batch = max(1, min(tiles, budget // forward_memory(model, shape, 1, device=device)))
    while batch > 1 and forward_memory(model, shape, batch, device=device) > budget:
        batch -= 1
    return int(batch)


@functools.lru_cache(maxsize=256)
def _best_tile(arch: Architecture, spatial: tuple[int, ...], device_type: str, budget: int,
               batch_size: int) -> tuple[int, ...] | dict:
    """The tile of :func:`default_tile_shape`, or a dict describing the smallest tile when none fits."""
    grid = 2**arch.depth
    cpu = device_type == "cpu"
    factor = arch.itemsize * _safety(device_type)

    def inputs(tile):
        return tuple(t + 2 * arch.margin for t in tile)

    def needed(tile):  # bytes of one forward pass
        return math.ceil(walk(arch, inputs(tile), batch_size, cpu)[0] * factor)

    def beyond(tile):
        """Whether this tile (lengths may be arrays) and every larger one exceed the budget (on CUDA:
        or have a feature map beyond ``CUDA_MAX_MAP_ELEMENTS``).
        The CPU estimate can drop where a longer axis moves a convolution onto oneDNN; the
        estimate without those extras cannot, and bounds it from below."""
        peak, _, largest = walk(arch, inputs(tile), batch_size, cpu)
        over = np.ceil(peak * factor) > budget
        if not cpu:
            over = np.logical_or(over, largest > CUDA_MAX_MAP_ELEMENTS)
        if cpu:
            over = np.logical_and(over, np.ceil(walk(arch, inputs(tile), batch_size, False)[0] * factor) > budget)
        return over

    # The shortest valid length per axis: a tile shorter than the grid cannot advance.
    smallest = tuple(next(t for t in itertools.count(arch.smallest, grid) if t >= size or t >= grid)
                     for size in spatial)
    axes = []  # per axis: for each tile count, the shortest valid length that needs no more tiles
    for k, size in enumerate(spatial):
        every = np.arange(smallest[k], max(size, smallest[k]) + grid, grid, dtype=np.int64)  # up to a cover
        every = every[:np.searchsorted(every, size) + 1]
        over = np.flatnonzero(beyond(smallest[:k] + (every,) + smallest[k + 1:]))
        lengths, counts = [], []
        for length in every[:over[0] if len(over) else len(every)].tolist() or [smallest[k]]:
            count = len(axis_origins(size, length, grid))
            if not counts or count < counts[-1]:
                lengths.append(length)
                counts.append(count)
        axes.append((lengths, counts))
    best = None

    def search(prefix: tuple[int, ...], tiles: int) -> None:
        """The best tile starting with ``prefix``: the last two axes in one walk over their grid."""
        nonlocal best
        (first, first_counts), (second, second_counts) = axes[-2:]
        rows, columns = np.asarray(first, np.int64)[:, None], np.asarray(second, np.int64)[None, :]
        peak, macs, largest = walk(arch, inputs(prefix + (rows, columns)), batch_size, cpu)
        bytes_ = np.ceil(peak * factor).ravel()
        work = (tiles * np.asarray(first_counts, np.float64)[:, None] * np.asarray(second_counts, np.float64)[None, :]
                * macs).ravel()
        fits = np.flatnonzero((bytes_ <= budget) & (cpu | (np.ravel(largest) <= CUDA_MAX_MAP_ELEMENTS)))
        if len(fits):
            i = fits[np.lexsort((bytes_[fits], work[fits]))[0]]
            key = (work[i], bytes_[i])
            if best is None or key < best[0]:
                best = (key, prefix + (first[i // len(second)], second[i % len(second)]))

    if len(axes) == 2:
        search((), 1)
    else:  # 3D: one grid walk per length of the first axis
        for length, count in zip(*axes[0]):
            if beyond((length,) + smallest[1:]):
                break
            search((length,), count)
    if best is None:
        return {"smallest": smallest, "needed": needed(smallest)}
    return best[1]


def default_block_shape(model: UNet, spatial_shape: Sequence[int], device: str | torch.device,
                         tile_shape: Sequence[int] | None = None, batch_size: int = 1,
                         memory_budget: int | None = None) -> tuple[int, ...]:
    """``BLOCK_TILES`` tile steps per axis, capped by the image (rounded up to the pooling grid).

    The tile is ``tile_shape`` or the default tile for the whole image (within ``memory_budget``,
    default :func:`device_memory_budget`). A tile of ``t`` advances
    by ``step = (t // 2**depth) * 2**depth`` (``t - 4`` for depth >= 3), so a block of k steps is covered by k
    tiles per axis that overhang it by 4 px; and block origins stay on the pooling grid.
    """
    grid = 2**model.depth
    tile = tuple(tile_shape) if tile_shape is not None else default_tile_shape(
        model, spatial_shape, device, memory_budget, batch_size)
    return tuple(min(BLOCK_TILES * max((t // grid) * grid, grid), -(-s // grid) * grid)
                 for t, s in zip(tile, spatial_shape))
