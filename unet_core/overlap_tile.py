"""The paper's overlap-tile strategy: one tile loop, used in memory and by each block of a volume.

Axis order: images are numpy ``(C, *spatial)`` or ``(*spatial)``; probabilities are
``(n_classes, *spatial)``. Spatial is ``(Y, X)`` for a 2D model and ``(Z, Y, X)`` for 3D.
Tiles start on the pooling grid and read their context from a mirror-padded input, so the
result equals whole-image prediction (Fig. 2 of Ronneberger et al. 2015).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from .cost import default_batch_size, default_tile_shape
from .model import UNet
from .precision import autocast, resolve_precision
from .tiling import read_reflected, tile_origins

__all__ = ["predict_tiled", "predict_padded", "padded_region", "forward_probabilities", "memory_format", "compiled"]

_LOG = logging.getLogger(__name__)
# Input shapes a compiled model may see (see compiled): up to 2**3 block shapes, twice that for
# rotated 2D tiles, and room for batches halved after running out of memory.
_COMPILED_SHAPES = 64


def memory_format(ndim: int) -> torch.memory_format:
    """The memory layout that models run in for prediction: channels last (2D and 3D)."""
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def compiled(model: UNet) -> UNet:
    """``model`` run through ``torch.compile`` (TorchInductor), for prediction.

    The first pass of each input shape compiles (seconds to a minute); later passes of that
    shape reuse it, so a worker compiles once per tile shape and batch of its blocks (interior
    and border blocks: at most 2**ndim shapes, twice that with 2D test-time rotations of a
    non-square tile; :func:`predict_padded` fills a block's last batch up to the block's batch
    size). Static shapes: torch 2.13's dynamic-shape lowering of the 3D transposed convolution
    fails on a CPU. Dynamo's limit of compiled shapes per function is raised to
    ``_COMPILED_SHAPES``: past it, it would run eager without saying so. Results equal the eager
    model's within float rounding (bitwise in the tests here). Needs a C++ compiler on a CPU,
    Triton on CUDA (part of CUDA builds of torch). Measured in ``bench/gpu.py --compile``
    (docs/predict.md).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _COMPILED_SHAPES)
    return torch.compile(model, dynamic=False)


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


def forward_probabilities(model: UNet, x: torch.Tensor, tta: bool, precision: str = "fp32") -> torch.Tensor:
    """Softmax probabilities (float32) of a batch, optionally averaged over test-time
    augmentations; the forward passes in ``precision`` (``fp32``, ``bf16`` or ``fp16``)."""
    layout = memory_format(model.ndim)
    pairs = _transforms(model.ndim) if tta else [(lambda t: t, lambda t: t)]
    total = None
    for forward, inverse in pairs:
        with autocast(precision, x.device):
            logits = model(forward(x).contiguous(memory_format=layout))
        y = inverse(torch.softmax(logits.float(), dim=1))
        total = y if total is None else total + y
    return total if len(pairs) == 1 else total / len(pairs)


def predict_tiled(
    model: UNet,
    image: np.ndarray,
    tile_shape: Sequence[int] | None = None,
    batch_size: int | None = 1,
    device: torch.device | str | None = None,
    tta: bool = False,
    precision: str = "fp32",
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
    batch_size : int or None
        Tiles per forward pass; None: as many as fit the memory budget on CUDA, one on a CPU
        (:func:`unet_core.cost.default_batch_size`).
    device : torch device, optional
        Default: CUDA when available, else CPU.
    tta : bool
        Test-time augmentation: average the probabilities over flips and 90-degree
        rotations of each input tile (8 in 2D; 8 flips in 3D), as the paper did.
    precision : str
        ``fp32`` (exact: equals whole-image prediction), ``bf16``, ``fp16`` or ``auto``
        (:func:`unet_core.precision.resolve_precision`).

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
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spatial = image.shape[1:]
    tile = (tuple(tile_shape) if tile_shape is not None
            else default_tile_shape(model, spatial, device, batch_size=batch_size or 1))
    model.eval().to(device=device, memory_format=memory_format(model.ndim))
    padded = read_reflected(image, *padded_region(model, (0,) * len(spatial), spatial, tile))
    return predict_padded(model, padded.astype(np.float32, copy=False), spatial, tile, batch_size=batch_size,
                          device=device, tta=tta, precision=resolve_precision(precision, device))


def padded_region(model: UNet, origin: Sequence[int], size: Sequence[int],
                  tile: Sequence[int]) -> tuple[list[int], list[int]]:
    """Start and stop of the input that the tiles of a region (``origin``, ``size``) read: the
    region and the last tile's overhang, plus the model's margin on every side."""
    margin = model.margin()
    origins = tile_origins(size, tile, 2**model.depth)
    reach = [max(o + t for o in sorted({org[k] for org in origins})) for k, t in enumerate(tile)]
    return [o - margin for o in origin], [o + r + margin for o, r in zip(origin, reach)]


class _Uploads:
    """Host batches to the device. On CUDA: from pinned memory, non-blocking, on a side stream,
    so that the next batch is copied while the current one computes. Elsewhere: a plain copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, host: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(host)
        if self.stream is None:
            return tensor.to(self.device)
        with torch.cuda.stream(self.stream):
            return tensor.pin_memory().to(self.device, non_blocking=True)

    def ready(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` usable on the current stream (its copy finished)."""
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            tensor.record_stream(current)
        return tensor


def predict_padded(model: UNet, padded: np.ndarray, size: Sequence[int], tile: Sequence[int], *,
                   batch_size: int | None = 1, device: torch.device | str = "cpu", tta: bool = False,
                   precision: str = "fp32", full_batches: bool = False) -> np.ndarray:
    """Probabilities ``(n_classes, *size)`` of a region from its input with context.

    ``padded`` is the float32 input ``(C, *spatial)`` of :func:`padded_region` (real
    neighbouring context, mirrored only at the image border); ``model`` is in eval mode on
    ``device``. Tiles of ``tile`` start on the pooling grid, ``batch_size`` per forward pass
    (None: :func:`unet_core.cost.default_batch_size`), in ``precision`` (fp32, bf16 or fp16;
    :func:`unet_core.precision.resolve_precision`). On CUDA the next batch is uploaded while
    the current one computes. ``full_batches``: the last batch is filled up with zero tiles
    (whose results are dropped), so that a compiled model sees one batch shape per block shape.
    Out of memory with several tiles per pass, the region is predicted again with half as many
    (logged); with one, the error names the tile.
    """
    size, tile, device = tuple(size), tuple(tile), torch.device(device)
    origins = tile_origins(size, tile, 2**model.depth)
    batch_size = batch_size or default_batch_size(model, tile, len(origins), device)
    while True:
        try:
            return _tile_loop(model, padded, size, tile, origins, batch_size, device, tta, precision, full_batches)
        except torch.OutOfMemoryError as error:
            # The estimate (unet_core.cost) leaves room, but other work may share the GPU.
            if batch_size == 1:
                raise torch.OutOfMemoryError(
                    f"out of memory on {device} with one output tile {tile} per pass; set a smaller "
                    f"predict.tile (or free the device): {error}") from error
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _LOG.warning("out of memory on %s with %d tiles %s per pass: the region again with %d "
                         "(predict.batch_size fixes it)", device, batch_size, tile, batch_size // 2)
            batch_size //= 2


def _tile_loop(model: UNet, padded: np.ndarray, size: tuple, tile: tuple, origins: list, batch_size: int,
               device: torch.device, tta: bool, precision: str, full_batches: bool) -> np.ndarray:
    """The forward passes of :func:`predict_padded`, ``batch_size`` tiles each."""
    result = np.empty((model.n_classes, *size), np.float32)
    tile_in = model.input_shape_for(tile)
    batches = [origins[first:first + batch_size] for first in range(0, len(origins), batch_size)]

    def inputs(batch) -> np.ndarray:
        tiles = [padded[(slice(None),) + tuple(slice(o, o + i) for o, i in zip(org, tile_in))] for org in batch]
        if full_batches and len(tiles) < batch_size:
            tiles += [np.zeros_like(tiles[0])] * (batch_size - len(tiles))
        return np.stack(tiles)

    uploads = _Uploads(device)
    with torch.inference_mode():
        pending = uploads.start(inputs(batches[0])) if batches else None
        for k, batch in enumerate(batches):
            # Launched first: on CUDA the GPU computes while the host stacks and uploads the next batch.
            probs = forward_probabilities(model, uploads.ready(pending), tta, precision)
            if k + 1 < len(batches):
                pending = uploads.start(inputs(batches[k + 1]))
            probs = probs.cpu().numpy()
            for org, p in zip(batch, probs):
                keep = tuple(slice(0, min(t, s - o)) for o, t, s in zip(org, tile, size))
                result[(slice(None),) + tuple(slice(o, o + k.stop) for o, k in zip(org, keep))] = \
                    p[(slice(None),) + keep]
    return result
