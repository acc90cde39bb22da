"""Overlap-tile inference with a valid-convolution U-Net, in memory and zarr to zarr.

Axis order: images are numpy ``(C, *spatial)`` or ``(*spatial)``; probabilities are
``(n_classes, *spatial)``. Spatial is ``(Y, X)`` for a 2D model and ``(Z, Y, X)`` for 3D.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import io
from .model import UNet, valid_sizes
from .tiling import read_reflected, tile_origins

__all__ = ["predict_tiled", "default_tile_shape", "predict_image", "load_model"]

# Output tile edge chosen from a measured sweep (base-16, depth-4 U-Net, channels_last):
# on this 2-core CPU 388-516 px tiles are fastest; GPUs prefer much larger tiles.
_DEFAULT_TILE = {("cpu", 2): 388, ("cpu", 3): 68, ("cuda", 2): 1012, ("cuda", 3): 132}


def default_tile_shape(model: UNet, spatial_shape: Sequence[int], device: torch.device | str) -> tuple[int, ...]:
    """A fast output tile for ``device``, shrunk to the smallest valid tile covering small images."""
    kind = torch.device(device).type
    edge = _DEFAULT_TILE.get((kind, model.ndim), _DEFAULT_TILE[("cpu", model.ndim)])
    edge = valid_sizes(model.depth, kind="output", near=edge)[0]
    tile = []
    for size in spatial_shape:
        fits = valid_sizes(model.depth, kind="output", near=max(size, 1))
        smallest_cover = fits[0] if fits[0] >= size else fits[-1]
        tile.append(min(edge, smallest_cover))
    return tuple(tile)


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def predict_tiled(
    model: UNet,
    image: np.ndarray,
    tile_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
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
    tile = tuple(tile_shape) if tile_shape is not None else default_tile_shape(model, spatial, device)
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
            x = x.contiguous(memory_format=_memory_format(model.ndim))
            probs = torch.softmax(model(x).float(), dim=1).cpu().numpy()
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
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt files
        raise ValueError(f"{path}: not a readable unet_core checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "architecture" not in checkpoint:
        raise ValueError(f"{path}: not a unet_core checkpoint (missing 'model'/'architecture')")
    model = UNet(**checkpoint["architecture"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def predict_image(
    model_path: str | Path,
    image_path: str | Path,
    output_path: str | Path,
    *,
    tile_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "float16",
) -> Path:
    """Predict class probabilities of an OME-Zarr image into a new OME-Zarr image.

    A 2D model is applied plane by plane over every non-spatial axis (t, z); a 3D model
    volume by volume over t. The intensity normalisation uses whole-image statistics,
    computed once. The output is published atomically.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, checkpoint = load_model(model_path, device)
    image = io.open_image(image_path)
    spatial_axes = "zyx"[-model.ndim:] if model.ndim == 3 else "yx"
    if model.ndim == 3 and "z" not in image.axes:
        raise ValueError(f"{image_path}: a 3D model needs a z axis, the image has axes {image.axes!r}")
    channels = image.shape[image.axes.index("c")] if "c" in image.axes else 1
    if channels != model.in_channels:
        raise ValueError(
            f"{image_path}: image has {channels} channel(s), the model {model_path} expects {model.in_channels}"
        )
    mean, std = io.intensity_statistics(image)
    loop_axes = [a for a in image.axes if a not in spatial_axes and a != "c"]
    out_axes = io.canonical_axes(set(image.axes) | {"c"})
    out_shape = [model.n_classes if a == "c" else image.shape[image.axes.index(a)] for a in out_axes]
    if dtype not in ("float16", "float32", "uint8"):
        raise ValueError(f"dtype must be 'float16', 'float32' or 'uint8', got {dtype!r}")
    scale = 255.0 if dtype == "uint8" else 1.0
    provenance = {"model": str(model_path), "model_card": str(Path(model_path).with_name("model_card.json")),
                  "source": str(image_path), "model_ndim": model.ndim, "probability_scale": scale,
                  "normalization": {"method": "zscore", "mean": mean, "std": std}}
    with io.atomic_image(output_path, out_axes, out_shape, dtype=dtype, scale=image.scale_for(out_axes),
                         chunks=None, attributes={"unet_core": provenance}) as out:
        loops = list(itertools.product(*[range(image.shape[image.axes.index(a)]) for a in loop_axes]))
        for position in tqdm(loops, desc=f"predict {Path(image_path).name}", unit="plane" if model.ndim == 2 else "volume"):
            where = dict(zip(loop_axes, position))
            plane = image.read(where, order=("c", *spatial_axes)).astype(np.float32)
            plane = (plane - np.asarray(mean, np.float32).reshape(-1, *[1] * model.ndim)) / np.asarray(std, np.float32).reshape(-1, *[1] * model.ndim)
            probs = predict_tiled(model, plane, tile_shape=tile_shape, batch_size=batch_size, device=device)
            if scale != 1.0:
                probs = np.rint(probs * scale)
            out.write(where, probs, order=("c", *spatial_axes))
    return Path(output_path)
