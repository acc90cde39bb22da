"""Overlap-tile inference with a valid-convolution U-Net, in memory and zarr to zarr.

Axis order: images are numpy ``(C, *spatial)`` or ``(*spatial)``; probabilities are
``(n_classes, *spatial)``. Spatial is ``(Y, X)`` for a 2D model and ``(Z, Y, X)`` for 3D.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import logging
import math
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from . import blocklog, io
from .atomic import publish
from .checkpoint import read_checkpoint
from .model import UNet, valid_sizes
from .normalize import Normalization, NormalizationTable, normalization_table
from .tiling import axis_origins, read_reflected, tile_origins

__all__ = ["predict_tiled", "default_tile_shape", "forward_memory", "predict_image", "load_model", "CPU_MEMORY_BUDGET"]

# Memory budget of one forward pass (as estimated by forward_memory) that the default tile fills.
# On the CPU a setting: with a base-16 U-Net it allows output tiles up to about 436 px in 2D, in
# the fastest range of a measured sweep on a 2-core machine (388-516 px; larger tiles fall out of
# the caches). 3D tiles need more: the margin is a large part of a small cube.
# On CUDA the budget is a fraction of the device memory.
CPU_MEMORY_BUDGET = {2: 160 * 2**20, 3: 1024 * 2**20}
_CUDA_BUDGET_FRACTION = 0.25
# forward_memory = bytes of the tensors alive at the peak x this factor, for what the allocator
# holds beyond them. CPU: glibc keeps freed feature maps in its heaps once its mmap threshold has
# risen; the peak RSS of repeated passes measured 1.1-1.45x the live bytes (once 1.56x), 2D and 3D
# (docs/predict.md). CUDA: the caching allocator's rounding and cuDNN workspaces (not measured).
_MEMORY_SAFETY = {"cpu": 1.5, "cuda": 1.2}
# torch's CPU convolutions (use_mkldnn in ATen's Convolution.cpp): a batch of one whose
# C * S0 * S1 (channels x the first two spatial lengths) is at most this runs without oneDNN, through
# an im2col buffer, on a C-contiguous copy of its input, into a C-contiguous output.
_ONEDNN_MIN_ELEMENTS = 20480
# Default block (= output chunk) edge in tile steps of the default tile.
_BLOCK_TILES = 2
# Per worker stream: blocks whose input is read ahead, and writes that may be pending, while the
# model computes a block. Two reads in flight hide a storage latency up to twice the compute time.
_READ_AHEAD = 2
_WRITE_BEHIND = 2
# On a dask.distributed cluster: block tasks queued or running per worker (the client never holds
# more, whatever the volume), and the most blocks per task.
_TASKS_PER_WORKER = 2
_MAX_TASK_BLOCKS = 64
_SCHEDULERS = ("synchronous", "threads", "processes", "distributed", "slurm")

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Architecture:
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


def _architecture(model: UNet, dtype: torch.dtype | None = None) -> _Architecture:
    conv = model.down[0][0]
    dtype = dtype or next(model.parameters()).dtype
    return _Architecture(model.in_channels, model.n_classes, model.base_channels, model.depth, model.ndim,
                         model.batch_norm, conv.kernel_size[0] - 1 - 2 * conv.padding[0], model.margin(),
                         valid_sizes(model.depth, kind="output", near=1)[-1], dtype.itemsize)


def _walk(arch: _Architecture, input_shape: tuple, batch_size: int, cpu: bool) -> tuple:
    """Peak elements alive and multiply-accumulates of one inference forward pass.

    Follows :func:`_forward` and ``UNet.forward`` tensor by tensor: the input batch (and its
    channels_last copy when it has several channels) lives throughout; every skip map stays in
    ``skips`` until the end; inside a block its input and both convolution outputs are alive
    together (ReLU is in place; an eval-mode batch norm makes a new map); on the way up the
    up-convolution output, the concatenation and the block's outputs coexist. On the CPU,
    convolutions that torch runs without oneDNN add their im2col buffer and format copies.
    Lengths may be int64 arrays (broadcast together): then both results are arrays.
    """
    n = arch.ndim
    peak = macs = 0
    if any(isinstance(s, np.ndarray) for s in input_shape):
        maximum, where, both, negate, lowest = np.maximum, np.where, np.logical_and, np.logical_not, np.min
    else:  # plain Python numbers: about 10x faster than numpy scalars
        maximum, both, negate, lowest = max, (lambda a, b: a and b), (lambda a: not a), (lambda a: a)
        where = (lambda condition, a, b: a if condition else b)

    def size(t):
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
    return peak, macs


def _safety(device_type: str) -> float:
    return _MEMORY_SAFETY["cpu" if device_type == "cpu" else "cuda"]


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
    arch = _architecture(model, dtype)
    peak, _ = _walk(arch, shape, batch_size, device.type == "cpu")
    return math.ceil(int(peak) * arch.itemsize * _safety(device.type))


def _lengths(model: UNet, shape: Sequence[int], name: str, batch_size: int) -> tuple[int, ...]:
    """``shape`` as ints, checked: one positive length per spatial axis of ``model``, and a batch >= 1."""
    lengths = tuple(int(s) for s in shape)
    if len(lengths) != model.ndim or min(lengths) < 1:
        raise ValueError(f"{name} must be {model.ndim} positive lengths for this model, got {tuple(shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return lengths


def _memory_budget(ndim: int, device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * _CUDA_BUDGET_FRACTION)
    return CPU_MEMORY_BUDGET[ndim]


def default_tile_shape(model: UNet, spatial_shape: Sequence[int], device: torch.device | str,
                       memory_budget: int | None = None, batch_size: int = 1) -> tuple[int, ...]:
    """The output tile that predicts ``spatial_shape`` with the least computation within a memory budget.

    Among the valid output tiles whose forward pass fits the budget (:func:`forward_memory`),
    the one with the fewest multiply-accumulates for the whole image: tiles needed (on the
    pooling grid, as :func:`predict_tiled` places them) times the work of one pass. On a large
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
    budget = int(memory_budget) if memory_budget is not None else _memory_budget(model.ndim, device)
    tile = _best_tile(_architecture(model), spatial, device.type, budget, batch_size)
    if isinstance(tile, tuple):
        return tile
    smallest, needed = tile["smallest"], tile["needed"]
    source = "memory_budget" if memory_budget is not None else (
        f"CPU_MEMORY_BUDGET[{model.ndim}]" if device.type == "cpu" else f"{_CUDA_BUDGET_FRACTION} of the device memory")
    raise ValueError(
        f"no output tile fits the memory budget of {budget / 2**20:.0f} MiB ({source}): the smallest valid "
        f"tile for {spatial}, {smallest} (input {model.input_shape_for(smallest)}), needs about "
        f"{needed / 2**20:.0f} MiB for a forward pass of this {model.ndim}D U-Net (base {model.base_channels}, "
        f"depth {model.depth}, batch {batch_size}) on {device.type}; raise the budget (memory_budget, or "
        f"unet_core.predict.CPU_MEMORY_BUDGET[{model.ndim}] on the CPU), lower batch_size, pass tile_shape "
        f"explicitly (predict.tile in the config), or use a model with fewer base channels or less depth"
    )


@functools.lru_cache(maxsize=256)
def _best_tile(arch: _Architecture, spatial: tuple[int, ...], device_type: str, budget: int,
               batch_size: int) -> tuple[int, ...] | dict:
    """The tile of :func:`default_tile_shape`, or a dict describing the smallest tile when none fits."""
    grid = 2**arch.depth
    cpu = device_type == "cpu"
    factor = arch.itemsize * _safety(device_type)

    def inputs(tile):
        return tuple(t + 2 * arch.margin for t in tile)

    def needed(tile):  # bytes of one forward pass
        return math.ceil(_walk(arch, inputs(tile), batch_size, cpu)[0] * factor)

    def beyond(tile):
        """Whether this tile (lengths may be arrays) and every larger one exceed the budget.
        The CPU estimate can drop where a longer axis moves a convolution onto oneDNN; the
        estimate without those extras cannot, and bounds it from below."""
        over = np.ceil(_walk(arch, inputs(tile), batch_size, cpu)[0] * factor) > budget
        if cpu:
            over = np.logical_and(over, np.ceil(_walk(arch, inputs(tile), batch_size, False)[0] * factor) > budget)
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
        peak, macs = _walk(arch, inputs(prefix + (rows, columns)), batch_size, cpu)
        bytes_ = np.ceil(peak * factor).ravel()
        work = (tiles * np.asarray(first_counts, np.float64)[:, None] * np.asarray(second_counts, np.float64)[None, :]
                * macs).ravel()
        fits = np.flatnonzero(bytes_ <= budget)
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


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def _transforms(ndim: int):
    """(forward, inverse) pairs over the trailing spatial axes of an (N, C, *spatial) tensor.

    In 2D the 8 flips and 90-degree rotations; a rotated (H, W) tile is a (W, H) tile, which is
    as valid, so tiles need not be square. In 3D the 8 flips.
    """
    axes = list(range(2, 2 + ndim))
    flips = [[a for a, bit in zip(axes, bits) if bit] for bits in itertools.product([0, 1], repeat=ndim)]
    if ndim == 2:
        pairs = []
        for k in range(4):
            for flip in ([], [3]):
                pairs.append((lambda t, k=k, f=flip: torch.rot90(t.flip(f) if f else t, k, (2, 3)),
                              lambda t, k=k, f=flip: (lambda r: r.flip(f) if f else r)(torch.rot90(t, -k, (2, 3)))))
        return pairs
    return [(lambda t, f=flip: t.flip(f) if f else t, lambda t, f=flip: t.flip(f) if f else t) for flip in flips]


def _forward(model: UNet, x: torch.Tensor, tta: bool) -> torch.Tensor:
    """Softmax probabilities of a batch, optionally averaged over test-time augmentations."""
    memory_format = _memory_format(model.ndim)
    if not tta:
        return torch.softmax(model(x.contiguous(memory_format=memory_format)).float(), dim=1)
    total = None
    pairs = _transforms(model.ndim)
    for forward, inverse in pairs:
        y = torch.softmax(model(forward(x).contiguous(memory_format=memory_format)).float(), dim=1)
        y = inverse(y)
        total = y if total is None else total + y
    return total / len(pairs)


def predict_tiled(
    model: UNet,
    image: np.ndarray,
    tile_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Class probabilities of ``image`` by the paper's overlap-tile strategy.

    Parameters
    ----------
    model : UNet
        A valid-convolution U-Net; put in eval mode and moved to ``device`` (channels_last).
    image : ndarray ``(C, *spatial)`` or ``(*spatial)``
        The (already normalised) image.
    tile_shape : sequence of int, optional
        OUTPUT tile shape; must be a valid output shape of the model. None picks a fast
        default for the device (see :func:`default_tile_shape`).
    batch_size : int
        Tiles per forward pass.
    device : torch device, optional
        Default: CUDA when available, else CPU.
    tta : bool
        Test-time augmentation: average the probabilities over flips and 90-degree
        rotations of each input tile (8 in 2D; 8 flips in 3D), as the paper did.

    Returns
    -------
    ndarray float32 ``(n_classes, *spatial)``: softmax probabilities.

    Notes
    -----
    The image is mirrored (numpy ``reflect``) at its borders by the model's margin
    ``(input_shape_for(out) - out) / 2``. Tile origins lie on the pooling grid, so the
    result equals whole-image prediction of the reflect-padded image (no seams, no
    blending): Fig. 2 of Ronneberger et al. (2015).
    """
    image = np.asarray(image)
    if image.ndim == model.ndim:
        image = image[None]
    if image.ndim != model.ndim + 1 or image.shape[0] != model.in_channels:
        raise ValueError(
            f"image must be (C, *spatial) with C = {model.in_channels} and {model.ndim} spatial "
            f"axes for this model, got shape {image.shape}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spatial = image.shape[1:]
    tile = (tuple(tile_shape) if tile_shape is not None
            else default_tile_shape(model, spatial, device, batch_size=batch_size))
    tile_in = model.input_shape_for(tile)
    margin = model.margin()
    grid = 2**model.depth
    model.eval().to(device=device, memory_format=_memory_format(model.ndim))
    origins = tile_origins(spatial, tile, grid)
    result = np.empty((model.n_classes, *spatial), np.float32)
    with torch.inference_mode():
        for start in range(0, len(origins), batch_size):
            batch_origins = origins[start:start + batch_size]
            inputs = np.stack([
                read_reflected(image, [o - margin for o in origin], [o - margin + t for o, t in zip(origin, tile_in)])
                for origin in batch_origins
            ])
            x = torch.from_numpy(inputs.astype(np.float32, copy=False)).to(device)
            probs = _forward(model, x, tta).cpu().numpy()
            for origin, p in zip(batch_origins, probs):
                keep = tuple(slice(0, min(t, s - o)) for o, t, s in zip(origin, tile, spatial))
                target = tuple(slice(o, o + k.stop) for o, k in zip(origin, keep))
                result[(slice(None),) + target] = p[(slice(None),) + keep]
    return result


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    """Load a checkpoint written by :mod:`unet_core.train` (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    checkpoint = read_checkpoint(path, device)
    if "model" not in checkpoint or "architecture" not in checkpoint:
        raise ValueError(f"{path}: not a unet_core checkpoint (missing 'model'/'architecture')")
    model = UNet(**checkpoint["architecture"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, device: str, sha256: str) -> UNet:
    """One model per worker process, device and checkpoint content (tasks of a worker share it;
    a retrained checkpoint at the same path is a new key). A worker refuses a checkpoint that is
    not the one the run started with: blocks of two models must not mix in one output."""
    if sha256 and io.sha256_file(path) != sha256:
        raise ValueError(f"{path}: the checkpoint changed after this prediction started (sha256 is no longer "
                         f"{sha256[:12]}...); rerun predict to start over with the new model")
    model, _ = load_model(path, device)
    return model.to(memory_format=_memory_format(model.ndim))


class _ChannelView:
    """An OME-Zarr image seen as ``(C, *spatial)`` at fixed loop-axis positions (for reads)."""

    def __init__(self, array, axes: str, where: dict, spatial: str) -> None:
        self.array, self.axes, self.where, self.spatial = array, axes, where, spatial
        channels = array.shape[axes.index("c")] if "c" in axes else 1
        self.shape = (channels, *(array.shape[axes.index(a)] for a in spatial))
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        channel, *box = index
        selection = []
        for axis in self.axes:
            if axis in self.where:
                selection.append(self.where[axis])
            elif axis == "c":
                selection.append(channel)
            else:
                selection.append(box[self.spatial.index(axis)])
        data = np.asarray(self.array[tuple(selection)])
        kept = [a for a in self.axes if a not in self.where]
        if "c" not in kept:
            data, kept = data[None], ["c", *kept]
        return np.transpose(data, [kept.index(a) for a in ("c", *self.spatial)])


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs to predict blocks (picklable for process and cluster workers)."""

    model_path: str
    image_path: str
    output_path: str
    spatial: str
    loop_axes: tuple[str, ...]
    loop_shape: tuple[int, ...]
    block: tuple[int, ...]
    block_grid: tuple[int, ...]
    tile: tuple[int, ...] | None
    batch_size: int
    device: str
    normalization: NormalizationTable
    scale: float
    tta: bool
    model_sha256: str = ""

    def block_region(self, block_id: int) -> tuple[dict, tuple[int, ...], tuple[int, ...]]:
        position = np.unravel_index(block_id, self.loop_shape + self.block_grid)
        where = dict(zip(self.loop_axes, (int(p) for p in position[:len(self.loop_axes)])))
        origin = tuple(int(p) * b for p, b in zip(position[len(self.loop_axes):], self.block))
        return where, origin, position


def _block_input(job: _Job, image, block_id: int, margin: int, model: UNet):
    where, origin, _ = job.block_region(block_id)
    view = _ChannelView(image.array, image.axes, where, job.spatial)
    spatial = view.shape[1:]
    size = tuple(min(b, s - o) for b, s, o in zip(job.block, spatial, origin))
    tile = tuple(job.tile) if job.tile else default_tile_shape(model, size, job.device, batch_size=job.batch_size)
    grid = 2**model.depth
    origins = tile_origins(size, tile, grid)
    reach = [max(o + t for o in sorted({org[k] for org in origins})) for k, t in enumerate(tile)]
    start = [o - margin for o in origin]
    stop = [o + r + margin for o, r in zip(origin, reach)]
    data = read_reflected(view, start, stop).astype(np.float32)
    return where, origin, size, tile, job.normalization.apply(data, where)


def _predict_block(model: UNet, job: _Job, padded: np.ndarray, size, tile) -> np.ndarray:
    """Probabilities of one block from its input with context (already mirrored where needed)."""
    result = np.empty((model.n_classes, *size), np.float32)
    tile_in = model.input_shape_for(tile)
    origins = tile_origins(size, tile, 2**model.depth)
    with torch.inference_mode():
        for first in range(0, len(origins), job.batch_size):
            batch = origins[first:first + job.batch_size]
            inputs = np.stack([padded[(slice(None),) + tuple(slice(o, o + i) for o, i in zip(org, tile_in))]
                               for org in batch])
            probs = _forward(model, torch.from_numpy(inputs).to(job.device), job.tta).cpu().numpy()
            for org, p in zip(batch, probs):
                keep = tuple(slice(0, min(t, s - o)) for o, t, s in zip(org, tile, size))
                result[(slice(None),) + tuple(slice(o, o + k.stop) for o, k in zip(org, keep))] = \
                    p[(slice(None),) + keep]
    return result


def _log_dir(partial: str | Path) -> Path:
    """Folder of the finished-block logs (:mod:`unet_core.blocklog`) beside the partial output."""
    return Path(partial) / ".blocks"


def _run_blocks(job: _Job, task: str, block_ids, progress=None) -> dict:
    """Predict the blocks of one task, pipelined; returns what it did (see :func:`_report_task`).

    Reads of the next ``_READ_AHEAD`` blocks and writes of the last ``_WRITE_BEHIND`` run in
    background threads while the model computes, so storage stalls the model only when it is
    slower than the model. Each block is recorded in the task's log once its chunk is written;
    a repeated attempt of the task (its worker was lost) skips what the log holds.
    """
    with blocklog.TaskLog(_log_dir(job.output_path), task) as log:
        block_ids = [int(b) for b in block_ids]
        todo = [b for b in block_ids if b not in log.previous]
        if progress is not None and len(todo) < len(block_ids):
            progress(len(block_ids) - len(todo))
        if todo:
            _pipeline(job, todo, log, progress)
    return {"task": task, "blocks": len(block_ids), "rerun": log.rerun, "redone": todo if log.rerun else []}


def _pipeline(job: _Job, block_ids: list[int], log: blocklog.TaskLog, progress) -> None:
    model = _cached_model(job.model_path, job.device, job.model_sha256)
    image = io.open_image(job.image_path)
    output = zarr.open_array(Path(job.output_path) / "0", mode="r+")
    out_axes = io.canonical_axes(set(job.loop_axes) | set(job.spatial) | {"c"})
    margin = model.margin()

    def write(where, origin, size, probs, block_id):
        if job.scale != 1.0:
            probs = np.rint(probs * job.scale)
        selection = []
        for axis in out_axes:
            if axis in where:
                selection.append(where[axis])
            elif axis == "c":
                selection.append(slice(None))
            else:
                k = job.spatial.index(axis)
                selection.append(slice(origin[k], origin[k] + size[k]))
        order = ["c", *job.spatial]
        kept = [a for a in out_axes if a not in where]
        output[tuple(selection)] = np.transpose(probs, [order.index(a) for a in kept]).astype(output.dtype)
        log.add(block_id)

    with ThreadPoolExecutor(_READ_AHEAD, thread_name_prefix="unet-read") as reader, \
            ThreadPoolExecutor(_WRITE_BEHIND, thread_name_prefix="unet-write") as writer:
        reads = collections.deque(reader.submit(_block_input, job, image, b, margin, model)
                                  for b in block_ids[:_READ_AHEAD])
        writes: collections.deque = collections.deque()
        for index, block_id in enumerate(block_ids):
            where, origin, size, tile, padded = reads.popleft().result()
            if index + _READ_AHEAD < len(block_ids):
                reads.append(reader.submit(_block_input, job, image, block_ids[index + _READ_AHEAD], margin, model))
            probs = _predict_block(model, job, padded, size, tile)
            writes.append(writer.submit(write, where, origin, size, probs, block_id))
            while len(writes) > _WRITE_BEHIND:
                writes.popleft().result()
            if progress is not None:
                progress(1)
        for future in writes:
            future.result()


def _fingerprint(model_path: Path, image: io.Image, settings: dict) -> dict:
    return {"model_sha256": io.sha256_file(model_path), "image": str(image.path),
            "image_sha256": image.attrs.get("unet_core", {}).get("provenance", {}).get("sha256", ""),
            "shape": list(image.shape), **settings}


def predict_image(
    model_path: str | Path,
    image_path: str | Path,
    output_path: str | Path,
    *,
    block_shape: Sequence[int] | None = None,
    tile_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "float16",
    tta: bool = False,
    planewise: bool = False,
    scheduler: str = "threads",
    partitions: int | None = None,
    slurm: dict | None = None,
) -> dict:
    """Blockwise overlap-tile prediction of an OME-Zarr image into an OME-Zarr of probabilities.

    Parameters
    ----------
    block_shape : spatial block shape (a multiple of ``2**depth`` per axis); also the output
        chunk shape, so no two workers ever write one chunk. Default: two tile steps per axis
        (``2 * (tile // 2**depth) * 2**depth``, the tile being ``tile_shape`` or the default tile
        for the image), capped by the image: a full block is covered by two tiles per axis,
        which reach 4 px past it.
    tile_shape : output tile inside a block; None = fast default for the device.
    dtype : ``float16``, ``float32`` or ``uint8`` (probability x 255).
    tta : average over flips/rotations (test-time augmentation).
    planewise : allow a 2D model on an image with a z axis (predicted slice by slice).
    scheduler : ``synchronous``, ``threads`` or ``processes`` (dask's local schedulers),
        ``distributed`` to use the current ``dask.distributed`` client, or ``slurm`` to start
        worker jobs with dask-jobqueue for this call (:mod:`unet_core.cluster`; always closed).
    partitions : number of tasks the blocks are split into (default: 1 for local schedulers,
        where one pipelined stream keeps all cores busy; on a cluster, tasks of at most
        ``_MAX_TASK_BLOCKS`` blocks, 16 per worker on small volumes). On a cluster at most
        ``_TASKS_PER_WORKER`` tasks per worker are submitted at a time.
    slurm : the ``slurm`` scheduler's worker jobs (:class:`unet_core.cluster.SlurmSettings` fields).

    Returns a summary: blocks in total, blocks computed in this call, blocks reused.

    Notes
    -----
    Each block reads its real neighbouring context from the volume (mirrored only at the
    volume border) and tiles start on the pooling grid, so the output equals whole-volume
    prediction of the mirror-padded volume. The intensity normalisation uses whole-volume
    statistics computed once. Finished blocks are recorded in append-only logs beside the
    partial output (``.<name>.partial/.blocks``); an interrupted run resumes with the missing
    blocks only, a task whose worker was lost is redone by another worker (the blocks it redid
    are logged), and the output is published by rename when all blocks are done.
    """
    model_path, image_path, output_path = Path(model_path), Path(image_path), Path(output_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, checkpoint = load_model(model_path, "cpu")
    scale = _probability_scale(dtype)
    if scheduler not in _SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(_SCHEDULERS)}, got {scheduler!r}")
    if scheduler == "slurm":
        from .cluster import SlurmSettings

        slurm_settings = SlurmSettings.from_config(slurm)
    layout = _layout(model, model_path, image_path, block_shape, tile_shape, device, batch_size, planewise)
    image, spatial, block_shape = layout.image, layout.spatial, layout.block_shape
    loop_axes, loop_shape, block_grid = layout.loop_axes, layout.loop_shape, layout.block_grid
    table = normalization_table(image, Normalization.from_checkpoint(checkpoint.get("normalization")), loop_axes)
    settings = {"block": list(block_shape), "tile": list(tile_shape) if tile_shape else None, "dtype": dtype,
                "tta": tta,
                "normalization": hashlib.sha256(json.dumps(table.as_dict(max_rows=10**9)).encode()).hexdigest()}
    fingerprint = _fingerprint(model_path, image, settings)
    partial = output_path.parent / f".{output_path.name}.partial"
    resumed = partial.exists() and _read_fingerprint(partial) == fingerprint
    if not resumed:
        if partial.exists():
            shutil.rmtree(partial)
        provenance = {"model": str(model_path), "model_card": str(model_path.with_name("model_card.json")),
                      "source": str(image_path), "model_ndim": model.ndim, "probability_scale": scale,
                      "normalization": table.as_dict(), "block_shape": list(block_shape), "tta": tta}
        if "training_objects" in checkpoint:
            provenance["training_objects"] = checkpoint["training_objects"]
        partial.mkdir(parents=True)
        _create_output(partial, model, layout, dtype, output_path.name, {"unet_core": provenance})
        (partial / ".fingerprint.json").write_text(json.dumps(fingerprint))
        _log_dir(partial).mkdir()
    total = layout.blocks
    todo = np.setdiff1d(np.arange(total, dtype=np.int64), blocklog.finished_blocks(_log_dir(partial)))
    job = _Job(str(model_path), str(image_path), str(partial), spatial, loop_axes, loop_shape, block_shape,
               block_grid, tuple(tile_shape) if tile_shape else None, batch_size, device, table, scale, tta,
               fingerprint["model_sha256"])
    desc = f"predict {image_path.name}"
    if scheduler == "slurm":
        from .cluster import slurm_client

        with slurm_client(slurm_settings) as client:
            _schedule_distributed(client, job, todo, partitions, desc, slurm_settings.maximum_workers)
    else:
        _schedule(job, todo, scheduler, partitions, desc)
    missing = total - len(blocklog.finished_blocks(_log_dir(partial)))
    if missing:
        raise RuntimeError(f"{output_path}: {missing} of {total} blocks did not finish; rerun to complete them")
    shutil.rmtree(_log_dir(partial))
    (partial / ".fingerprint.json").unlink()
    # One atomic step (unet_core.atomic): killed anywhere, the output is the old one or the new one.
    publish(partial, output_path)
    return {"blocks": total, "computed": len(todo), "reused": total - len(todo), "resumed": resumed}


def _probability_scale(dtype: str) -> float:
    """What probabilities are multiplied by when stored as ``dtype`` (255 for uint8); checks ``dtype``."""
    if dtype not in ("float16", "float32", "uint8"):
        raise ValueError(f"dtype must be 'float16', 'float32' or 'uint8', got {dtype!r}")
    return 255.0 if dtype == "uint8" else 1.0


@dataclass(frozen=True)
class _Layout:
    """Where the blocks of an image lie: spatial axes, block shape and grid, loop axes (t, or z planewise)."""

    image: io.Image
    spatial: str
    spatial_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    loop_axes: tuple[str, ...]
    loop_shape: tuple[int, ...]
    block_grid: tuple[int, ...]

    @property
    def blocks(self) -> int:
        return int(np.prod(self.loop_shape + self.block_grid, dtype=np.int64))


def _layout(model: UNet, model_path: Path, image_path: Path, block_shape, tile_shape, device: str, batch_size: int,
            planewise: bool) -> _Layout:
    """Check that ``model`` can predict the image and place its blocks (metadata only)."""
    image = io.open_image(image_path)
    spatial = "yx" if model.ndim == 2 else "zyx"
    if not set(spatial) <= set(image.axes):
        raise ValueError(f"{image_path}: a {model.ndim}D model needs axes {spatial!r}, the image has {image.axes!r}")
    if model.ndim == 2 and "z" in image.axes and not planewise:
        raise ValueError(
            f"{image_path}: a 2D model cannot predict the 3D volume (axes {image.axes!r}) of {model_path}; "
            f"set planewise (predict.planewise: true) to predict it slice by slice, or train a 3D model"
        )
    channels = image.shape[image.axes.index("c")] if "c" in image.axes else 1
    if channels != model.in_channels:
        raise ValueError(f"{image_path}: image has {channels} channel(s), the model {model_path} expects "
                         f"{model.in_channels}")
    grid = 2**model.depth
    spatial_shape = tuple(image.shape[image.axes.index(a)] for a in spatial)
    if tile_shape is not None:
        model.input_shape_for(tuple(tile_shape))
    if block_shape is None:
        block_shape = _default_block_shape(model, spatial_shape, device, tile_shape, batch_size)
    block_shape = tuple(int(b) for b in block_shape)
    if len(block_shape) != model.ndim or any(b % grid or b <= 0 for b in block_shape):
        raise ValueError(f"block_shape {block_shape} must have {model.ndim} positive multiples of {grid} "
                         f"(2**depth, the pooling grid), e.g. {(32 * grid,) * model.ndim}, or None for the default "
                         f"(two tile steps per axis)")
    if tile_shape is None:  # fail here, not in a worker, when no tile fits the memory budget
        default_tile_shape(model, tuple(min(b, s) for b, s in zip(block_shape, spatial_shape)), device,
                           batch_size=batch_size)
    loop_axes = tuple(a for a in image.axes if a not in spatial and a != "c")
    loop_shape = tuple(image.shape[image.axes.index(a)] for a in loop_axes)
    block_grid = tuple(-(-s // b) for s, b in zip(spatial_shape, block_shape))
    return _Layout(image, spatial, spatial_shape, block_shape, loop_axes, loop_shape, block_grid)


def _create_output(path: Path, model: UNet, layout: _Layout, dtype: str, name: str, attributes: dict) -> None:
    """The empty probability image: the image's axes and one channel per class, chunk = block."""
    image = layout.image
    out_axes = io.canonical_axes(set(image.axes) | {"c"})
    out_shape = [model.n_classes if a == "c" else image.shape[image.axes.index(a)] for a in out_axes]
    chunks = [model.n_classes if a == "c" else 1 if a in layout.loop_axes else layout.block_shape[layout.spatial.index(a)]
              for a in out_axes]
    io.create_image(path, out_axes, out_shape, dtype, image.scale_for(out_axes), chunks, name, attributes,
                     compressor=io.FAST_COMPRESSOR)


def _default_block_shape(model: UNet, spatial_shape: Sequence[int], device: str | torch.device,
                         tile_shape: Sequence[int] | None = None, batch_size: int = 1) -> tuple[int, ...]:
    """``_BLOCK_TILES`` tile steps per axis, capped by the image (rounded up to the pooling grid).

    The tile is ``tile_shape`` or the default tile for the whole image. A tile of ``t`` advances
    by ``step = (t // 2**depth) * 2**depth`` (``t - 4`` for depth >= 3), so a block of k steps is covered by k
    tiles per axis that overhang it by 4 px; and block origins stay on the pooling grid.
    """
    grid = 2**model.depth
    tile = tuple(tile_shape) if tile_shape is not None else default_tile_shape(model, spatial_shape, device,
                                                                              batch_size=batch_size)
    return tuple(min(_BLOCK_TILES * max((t // grid) * grid, grid), -(-s // grid) * grid)
                 for t, s in zip(tile, spatial_shape))


def _read_fingerprint(partial: Path) -> dict | None:
    try:
        return json.loads((partial / ".fingerprint.json").read_text())
    except (OSError, ValueError):
        return None


def _schedule(job: _Job, todo: np.ndarray, scheduler: str, partitions: int | None, desc: str) -> None:
    """Run the blocks: local schedulers get ``partitions`` tasks (default 1 pipelined stream)."""
    if not len(todo):
        return
    if scheduler == "distributed":
        from distributed import get_client

        _schedule_distributed(get_client(), job, todo, partitions, desc)
        return
    run = uuid.uuid4().hex[:8]
    chunks = [c for c in np.array_split(todo, partitions or 1) if len(c)]
    with tqdm(total=len(todo), desc=desc, unit="block") as bar:
        lock = threading.Lock()

        def progress(n):
            with lock:
                bar.update(n)

        tasks = [dask.delayed(_run_blocks)(job, f"{run}-{k}", chunk, progress if scheduler != "processes" else None)
                 for k, chunk in enumerate(chunks)]
        results = dask.compute(*tasks, scheduler=scheduler)
        if scheduler == "processes":
            bar.update(len(todo))
    for result in results:
        _report_task(result)


def _schedule_distributed(client, job: _Job, todo: np.ndarray, partitions: int | None, desc: str,
                          expected_workers: int = 1) -> None:
    """Submit the blocks as tasks of consecutive ids, at most ``_TASKS_PER_WORKER`` per worker at a time.

    The client holds the array of block ids to do and the futures in flight, never a graph or
    futures for the whole volume. A task whose worker is lost is rerun by dask on another
    worker; its log tells it which blocks are already written (:func:`_report_task`).
    """
    if not len(todo):
        return
    from distributed import as_completed

    def workers() -> int:
        return max(len(client.scheduler_info().get("workers", {})), 1)

    count = workers()
    if partitions:
        per_task = -(-len(todo) // partitions)
    else:
        per_task = min(_MAX_TASK_BLOCKS, max(1, len(todo) // (16 * max(count, expected_workers))))
    run = uuid.uuid4().hex[:8]
    starts = iter(range(0, len(todo), per_task))
    in_flight: dict = {}
    pending = as_completed()

    def submit() -> bool:
        start = next(starts, None)
        if start is None:
            return False
        task = f"{run}-{start // per_task}"
        future = client.submit(_run_blocks, job, task, todo[start:start + per_task], key=f"unet-blocks-{task}",
                               pure=False)
        in_flight[future] = task
        pending.add(future)
        return True

    # Enough tasks for the workers expected (adaptive SLURM jobs start as work is queued).
    limit, checked = _TASKS_PER_WORKER * max(count, expected_workers), time.monotonic()
    while len(in_flight) < limit and submit():
        pass
    with tqdm(total=len(todo), desc=desc, unit="block") as bar:
        try:
            for future in pending:
                task = in_flight.pop(future)
                try:
                    result = future.result()
                except Exception:
                    _LOG.error("%s: block task %s failed; rerun to resume from the finished blocks", desc, task)
                    raise
                future.release()
                bar.update(result["blocks"])
                _report_task(result)
                if time.monotonic() - checked > 1.0:  # workers come and go (adaptive SLURM jobs)
                    limit, checked = _TASKS_PER_WORKER * max(workers(), expected_workers), time.monotonic()
                while len(in_flight) < limit and submit():
                    pass
        finally:
            if in_flight:
                client.cancel(list(in_flight))


def _report_task(result: dict) -> None:
    """Log the blocks that a repeated attempt of a task (its worker was lost) had to compute again."""
    if result["rerun"]:
        if result["redone"]:
            _LOG.warning("block task %s ran again (its worker was lost): redid %d block(s): %s", result["task"],
                         len(result["redone"]), blocklog.ranges(result["redone"]))
        else:
            _LOG.warning("block task %s ran again (its worker was lost): all %d block(s) were already written",
                         result["task"], result["blocks"])
