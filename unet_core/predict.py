"""Overlap-tile inference with a valid-convolution U-Net, in memory and zarr to zarr.

Axis order: images are numpy ``(C, *spatial)`` or ``(*spatial)``; probabilities are
``(n_classes, *spatial)``. Spatial is ``(Y, X)`` for a 2D model and ``(Z, Y, X)`` for 3D.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from . import io
from .model import UNet, valid_sizes
from .tiling import read_reflected, tile_origins

__all__ = ["predict_tiled", "default_tile_shape", "forward_memory", "predict_image", "load_model", "CPU_MEMORY_BUDGET"]

# Memory budget of one forward pass on the CPU. With a base-16 U-Net it selects 388-516 px
# output tiles in 2D, the fastest in a measured sweep on a 2-core machine (larger tiles fall
# out of the caches). 3D tiles need more: the margin is a large part of a small cube.
# On CUDA the budget is a fraction of the device memory.
CPU_MEMORY_BUDGET = {2: 160 * 2**20, 3: 1024 * 2**20}
_CUDA_BUDGET_FRACTION = 0.25


def forward_memory(model: UNet, input_shape: Sequence[int], batch_size: int = 1) -> int:
    """Estimated peak bytes of an inference forward pass (float32).

    At the first level the contracting path keeps its skip map while two more maps of
    ``base_channels`` are live, and the expanding path concatenates (2 maps) next to the
    up-convolution output: about six level-0 maps at the peak; deeper levels are smaller.
    """
    pixels = int(np.prod(input_shape))
    return int(6 * model.base_channels * 4 * pixels * batch_size + 2 * model.in_channels * 4 * pixels * batch_size)


def default_tile_shape(model: UNet, spatial_shape: Sequence[int], device: torch.device | str,
                       memory_budget: int | None = None, batch_size: int = 1) -> tuple[int, ...]:
    """The largest valid output tile (equal edges) whose forward pass fits the memory budget.

    ``memory_budget`` in bytes; default: :data:`CPU_MEMORY_BUDGET` on the CPU, a quarter of
    the device memory on CUDA. Axes shorter than the tile get the smallest valid tile that
    covers them, so small images are not padded far past their border.
    """
    device = torch.device(device)
    if memory_budget is None:
        if device.type == "cuda":
            memory_budget = int(torch.cuda.get_device_properties(device).total_memory * _CUDA_BUDGET_FRACTION)
        else:
            memory_budget = CPU_MEMORY_BUDGET[model.ndim]
    sizes = valid_sizes(model.depth, kind="output", near=1, count=1)
    edge = sizes[-1]
    while True:
        bigger = valid_sizes(model.depth, kind="output", near=edge, count=1)[-1]
        inp = model.input_shape_for((bigger,) * model.ndim)
        if forward_memory(model, inp, batch_size) > memory_budget or bigger > 8192:
            break
        edge = bigger
    tile = []
    for size in spatial_shape:
        fits = valid_sizes(model.depth, kind="output", near=max(size, 1))
        smallest_cover = fits[0] if fits[0] >= size else fits[-1]
        tile.append(min(edge, smallest_cover))
    return tuple(tile)


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def _transforms(ndim: int, square: bool):
    """(forward, inverse) pairs over the trailing spatial axes of an (N, C, *spatial) tensor."""
    axes = list(range(2, 2 + ndim))
    flips = [[a for a, bit in zip(axes, bits) if bit] for bits in itertools.product([0, 1], repeat=ndim)]
    if ndim == 2 and square:
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
    square = len(set(x.shape[2:])) == 1
    total = None
    pairs = _transforms(model.ndim, square)
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
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt files
        raise ValueError(f"{path}: not a readable unet_core checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "architecture" not in checkpoint:
        raise ValueError(f"{path}: not a unet_core checkpoint (missing 'model'/'architecture')")
    model = UNet(**checkpoint["architecture"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, device: str, sha256: str) -> UNet:
    """One model per worker process, device and checkpoint content (tasks of a worker share it;
    a retrained checkpoint at the same path is a new key)."""
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
    mean: tuple[float, ...]
    std: tuple[float, ...]
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
    tile = tuple(job.tile) if job.tile else default_tile_shape(model, size, job.device)
    grid = 2**model.depth
    origins = tile_origins(size, tile, grid)
    reach = [max(o + t for o in sorted({org[k] for org in origins})) for k, t in enumerate(tile)]
    start = [o - margin for o in origin]
    stop = [o + r + margin for o, r in zip(origin, reach)]
    data = read_reflected(view, start, stop).astype(np.float32)
    mean = np.asarray(job.mean, np.float32).reshape(-1, *[1] * len(spatial))
    std = np.asarray(job.std, np.float32).reshape(-1, *[1] * len(spatial))
    return where, origin, size, tile, (data - mean) / std


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


def _done_dir(output_path: str | Path) -> Path:
    return Path(output_path) / ".done"


def _run_blocks(job: _Job, block_ids: list[int], progress=None) -> int:
    """Predict ``block_ids`` with reads prefetched and writes in the background; returns the count."""
    model = _cached_model(job.model_path, job.device, job.model_sha256)
    image = io.open_image(job.image_path)
    output = zarr.open_array(Path(job.output_path) / "0", mode="r+")
    out_axes = io.canonical_axes(set(job.loop_axes) | set(job.spatial) | {"c"})
    margin = model.margin()
    done = _done_dir(job.output_path)

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
        (done / str(block_id)).touch()

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending_writes: list = []
        upcoming = pool.submit(_block_input, job, image, block_ids[0], margin, model) if block_ids else None
        for index, block_id in enumerate(block_ids):
            where, origin, size, tile, padded = upcoming.result()
            if index + 1 < len(block_ids):
                upcoming = pool.submit(_block_input, job, image, block_ids[index + 1], margin, model)
            probs = _predict_block(model, job, padded, size, tile)
            pending_writes.append(pool.submit(write, where, origin, size, probs, block_id))
            while len(pending_writes) > 2:
                pending_writes.pop(0).result()
            if progress is not None:
                progress(1)
        for future in pending_writes:
            future.result()
    return len(block_ids)


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
) -> dict:
    """Blockwise overlap-tile prediction of an OME-Zarr image into an OME-Zarr of probabilities.

    Parameters
    ----------
    block_shape : spatial block shape (a multiple of ``2**depth`` per axis); also the output
        chunk shape, so no two workers ever write one chunk. Default: 512 (2D) / 128 (3D),
        capped by the image.
    tile_shape : output tile inside a block; None = fast default for the device.
    dtype : ``float16``, ``float32`` or ``uint8`` (probability x 255).
    tta : average over flips/rotations (test-time augmentation).
    planewise : allow a 2D model on an image with a z axis (predicted slice by slice).
    scheduler : ``synchronous``, ``threads`` or ``processes`` (dask's local schedulers), or
        ``distributed`` to use the current ``dask.distributed`` client.
    partitions : number of dask tasks the blocks are split into (default: 1 for local
        schedulers, where one pipelined stream keeps all cores busy; 4 per worker otherwise).

    Returns a summary: blocks in total, blocks computed in this call, blocks reused.

    Notes
    -----
    Each block reads its real neighbouring context from the volume (mirrored only at the
    volume border) and tiles start on the pooling grid, so the output equals whole-volume
    prediction of the mirror-padded volume. The intensity normalisation uses whole-volume
    statistics computed once. Finished blocks are recorded beside the partial output
    (``.<name>.partial``); an interrupted run resumes with the missing blocks only, and
    the output is published by rename when all blocks are done.
    """
    model_path, image_path, output_path = Path(model_path), Path(image_path), Path(output_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, checkpoint = load_model(model_path, "cpu")
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
    if dtype not in ("float16", "float32", "uint8"):
        raise ValueError(f"dtype must be 'float16', 'float32' or 'uint8', got {dtype!r}")
    if scheduler not in ("synchronous", "threads", "processes", "distributed"):
        raise ValueError(f"scheduler must be synchronous, threads, processes or distributed, got {scheduler!r}")
    grid = 2**model.depth
    spatial_shape = tuple(image.shape[image.axes.index(a)] for a in spatial)
    if block_shape is None:
        block_shape = tuple(min(512 if model.ndim == 2 else 128, -(-s // grid) * grid) for s in spatial_shape)
    block_shape = tuple(int(b) for b in block_shape)
    if len(block_shape) != model.ndim or any(b % grid or b <= 0 for b in block_shape):
        raise ValueError(f"block_shape {block_shape} must have {model.ndim} positive multiples of {grid} "
                         f"(2**depth, the pooling grid), e.g. {tuple(512 if model.ndim == 2 else 128 for _ in spatial)}")
    if tile_shape is not None:
        model.input_shape_for(tuple(tile_shape))
    loop_axes = tuple(a for a in image.axes if a not in spatial and a != "c")
    loop_shape = tuple(image.shape[image.axes.index(a)] for a in loop_axes)
    block_grid = tuple(-(-s // b) for s, b in zip(spatial_shape, block_shape))
    mean, std = io.intensity_statistics(image)
    scale = 255.0 if dtype == "uint8" else 1.0
    out_axes = io.canonical_axes(set(image.axes) | {"c"})
    out_shape = [model.n_classes if a == "c" else image.shape[image.axes.index(a)] for a in out_axes]
    chunks = [model.n_classes if a == "c" else 1 if a in loop_axes else block_shape[spatial.index(a)]
              for a in out_axes]
    settings = {"block": list(block_shape), "tile": list(tile_shape) if tile_shape else None, "dtype": dtype,
                "tta": tta, "mean": mean, "std": std}
    fingerprint = _fingerprint(model_path, image, settings)
    partial = output_path.parent / f".{output_path.name}.partial"
    resumed = partial.exists() and _read_fingerprint(partial) == fingerprint
    if not resumed:
        if partial.exists():
            shutil.rmtree(partial)
        provenance = {"model": str(model_path), "model_card": str(model_path.with_name("model_card.json")),
                      "source": str(image_path), "model_ndim": model.ndim, "probability_scale": scale,
                      "normalization": {"method": "zscore", "mean": mean, "std": std},
                      "block_shape": list(block_shape), "tta": tta}
        partial.mkdir(parents=True)
        io._create_image(partial, out_axes, out_shape, dtype, image.scale_for(out_axes), chunks,
                         output_path.name, {"unet_core": provenance})
        (partial / ".fingerprint.json").write_text(json.dumps(fingerprint))
        _done_dir(partial).mkdir()
    total = int(np.prod(loop_shape + block_grid))
    finished = {int(p.name) for p in _done_dir(partial).iterdir()}
    todo = [b for b in range(total) if b not in finished]
    job = _Job(str(model_path), str(image_path), str(partial), spatial, loop_axes, loop_shape, block_shape,
               block_grid, tuple(tile_shape) if tile_shape else None, batch_size, device, tuple(mean), tuple(std),
               scale, tta, fingerprint["model_sha256"])
    _schedule(job, todo, scheduler, partitions, desc=f"predict {image_path.name}")
    if len(list(_done_dir(partial).iterdir())) != total:
        raise RuntimeError(f"{output_path}: not all blocks finished; rerun to complete the missing blocks")
    shutil.rmtree(_done_dir(partial))
    (partial / ".fingerprint.json").unlink()
    if output_path.exists():
        shutil.rmtree(output_path)
    os.rename(partial, output_path)
    return {"blocks": total, "computed": len(todo), "reused": total - len(todo), "resumed": resumed}


def _read_fingerprint(partial: Path) -> dict | None:
    try:
        return json.loads((partial / ".fingerprint.json").read_text())
    except (OSError, ValueError):
        return None


def _schedule(job: _Job, todo: list[int], scheduler: str, partitions: int | None, desc: str) -> None:
    """Run the blocks as dask tasks, a bounded number of partitions of block ids."""
    if not todo:
        return
    if scheduler == "distributed":
        from distributed import get_client

        client = get_client()
        workers = max(len(client.scheduler_info().get("workers", {})), 1)
        count = partitions or 4 * workers
        chunks = [todo[i::count] for i in range(count) if todo[i::count]]
        futures = client.map(_run_blocks, [job] * len(chunks), chunks, pure=False)
        with tqdm(total=len(todo), desc=desc, unit="block") as bar:
            for future in distributed_as_completed(futures):
                bar.update(future.result())
        return
    count = partitions or 1
    chunks = [todo[i::count] for i in range(count) if todo[i::count]]
    with tqdm(total=len(todo), desc=desc, unit="block") as bar:
        lock = threading.Lock()

        def progress(n):
            with lock:
                bar.update(n)

        tasks = [dask.delayed(_run_blocks)(job, chunk, progress if scheduler != "processes" else None)
                 for chunk in chunks]
        dask.compute(*tasks, scheduler=scheduler)
        if scheduler == "processes":
            bar.update(len(todo))


def distributed_as_completed(futures):
    from distributed import as_completed

    return as_completed(futures)
