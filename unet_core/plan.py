"""Plan a blockwise prediction before running it: blocks, bytes and the expected wall time.

:func:`plan_prediction` reads only the image's metadata (a terabyte volume answers in seconds),
places the blocks exactly as :func:`unet_core.predict.predict_image` would, and calibrates on
this machine's device: it runs the real block pipeline (read with context, normalise, tiles
through the model, write) on a few full-size blocks into a temporary output, and times the
intensity-statistics pass that a run starts with. The estimate is

    statistics + start-up + (work of all blocks / work of a full block)
                            x (seconds per full block) / workers

Work is counted per block size (border blocks are smaller and get their own default tile): tiles
times multiply-accumulates per pass, so the estimate follows the volume's shape, not just its
voxel count. Run it on a node of the kind
the workers get (e.g. ``srun --gpus=1 unet-core plan ...``): the calibration measures the device
it runs on.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model
from .cost import architecture, default_tile_shape, walk
from .defaults import default
from .normalize import Normalization, normalization_table
from .predict import Job, block_layout, create_output, probability_scale, resolve_device, run_blocks
from .tiling import axis_origins

__all__ = ["Plan", "plan_prediction"]

# Full blocks timed for the calibration: at least this many, and more (up to the maximum) while
# they take under _CALIBRATION_SECONDS in all; a single noisy block then does not set the estimate.
_CALIBRATION_BLOCKS = 3
_CALIBRATION_SECONDS = 3.0
_MAX_CALIBRATION_BLOCKS = 16


@dataclass(frozen=True)
class Plan:
    """What a prediction of one image costs (see :func:`plan_prediction`)."""

    image: str
    device: str
    workers: int
    shape: tuple[int, ...]
    axes: str
    block_shape: tuple[int, ...]
    tile_shape: tuple[int, ...]
    blocks: int
    voxels: int
    input_bytes: int
    output_bytes: int
    seconds_per_block: float  # a full block, measured (pipelined: read, model, write)
    block_seconds: float  # all blocks on one worker
    statistics_seconds: float
    startup_seconds: float
    calibration_blocks: int

    @property
    def wall_seconds(self) -> float:
        """Expected wall time on ``workers`` workers."""
        return self.statistics_seconds + self.startup_seconds + self.block_seconds / self.workers

    def text(self) -> str:
        gib = 2**30
        return "\n".join([
            f"plan for {self.image} on {self.device}, {self.workers} worker(s)",
            f"  volume       {self.shape} {self.axes}: {self.voxels:,} voxels, {self.input_bytes / gib:,.2f} GiB in, "
            f"{self.output_bytes / gib:,.2f} GiB out (uncompressed)",
            f"  blocks       {self.blocks:,} of {self.block_shape}, tiles {self.tile_shape}",
            f"  calibration  {self.seconds_per_block:.3f} s per full block ({self.calibration_blocks} blocks, "
            f"read + model + write, pipelined)",
            f"  statistics   {self.statistics_seconds:.1f} s; start-up {self.startup_seconds:.1f} s",
            f"  expected     {_duration(self.wall_seconds)} wall time on {self.workers} worker(s) "
            f"({_duration(self.block_seconds)} of block work)",
        ])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _relative_work(model, layout, tile_shape, device: str, batch_size: int | None) -> float:
    """Work of all blocks in units of one full block: per block size (interior and border blocks
    differ per axis), tiles x multiply-accumulates of a pass, with the tile predict would use."""
    grid, arch, batch_size = 2**model.depth, architecture(model), batch_size or 1  # relative: the batch cancels

    def work(size):
        tile = tuple(tile_shape) if tile_shape else default_tile_shape(model, size, device, batch_size=batch_size)
        passes = math.prod(len(axis_origins(n, t, grid)) for n, t in zip(size, tile))
        _, macs, _ = walk(arch, model.input_shape_for(tile), batch_size, torch.device(device).type == "cpu")
        return passes * macs

    per_axis = []  # (length, how many blocks have it) per axis
    for size, block in zip(layout.spatial_shape, layout.block_shape):
        full, rest = divmod(size, block)
        per_axis.append([(block, full)] * bool(full) + [(rest, 1)] * bool(rest))
    full = work(tuple(min(b, s) for b, s in zip(layout.block_shape, layout.spatial_shape)))
    total = sum(math.prod(count for _, count in combo) * work(tuple(n for n, _ in combo))
                for combo in itertools.product(*per_axis))
    return math.prod(layout.loop_shape) * total / full


def plan_prediction(model_path: str | Path, image_path: str | Path, *, workers: int = 1,
                    block_shape=None, tile_shape=None, batch_size: int | None = default("predict", "batch_size"),
                    device: str | None = None, dtype: str = default("predict", "dtype"),
                    tta: bool = default("predict", "tta"), planewise: bool = default("predict", "planewise"),
                    precision: str = default("predict", "precision"), compile: bool = default("predict", "compile"),
                    calibration_blocks: int = _CALIBRATION_BLOCKS) -> Plan:
    """Blocks, bytes and expected wall time of ``predict_image`` with these settings.

    Raises the errors ``predict_image`` would raise for this model and image.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    scale = probability_scale(dtype)
    model_path, image_path = Path(model_path), Path(image_path)
    started = time.perf_counter()
    model, checkpoint = load_model(model_path, "cpu")
    device, _, precision = resolve_device(device, precision, model.ndim)
    layout = block_layout(model, model_path, image_path, block_shape, tile_shape, device, batch_size, planewise)
    image, tile = layout.image, layout.tile
    startup = time.perf_counter() - started

    began = time.perf_counter()
    table = normalization_table(image, Normalization.from_checkpoint(checkpoint.get("normalization")),
                                layout.loop_axes)
    statistics = time.perf_counter() - began

    # Calibration: full blocks spread over the volume, the first one a warm-up (model load, caches).
    picks = _calibration_ids(layout, 1)
    with tempfile.TemporaryDirectory(prefix="unet-plan-") as scratch:
        output = Path(scratch) / "plan.ome.zarr"
        output.mkdir()
        create_output(output, model, layout, dtype, output.name, {})
        (output / ".blocks").mkdir()
        job = Job(str(model_path), str(image_path), str(output), layout.spatial, layout.loop_axes, layout.loop_shape,
                   layout.block_shape, layout.block_grid, tile, batch_size, device, table, scale, tta, "", precision,
                   compile)
        # In a worker thread, as predict_image runs its blocks (the main thread's allocator behaves
        # differently: 10-15 % slower passes, docs/predict.md). The per-block time is the median
        # interval between computed blocks: the pipeline's steady state. Its first read and last
        # write, which a run pays once, go to the start-up.
        done = []
        with ThreadPoolExecutor(1) as thread:
            began = time.perf_counter()
            thread.submit(run_blocks, job, "warm-up", picks[:1]).result()
            warm_up = time.perf_counter() - began
            startup += warm_up
            # at least calibration_blocks, more while they take under _CALIBRATION_SECONDS together
            count = min(max(calibration_blocks, math.ceil(_CALIBRATION_SECONDS / max(warm_up, 1e-3))),
                        _MAX_CALIBRATION_BLOCKS)
            timed = _calibration_ids(layout, count)
            began = time.perf_counter()
            thread.submit(run_blocks, job, "calibration", timed, lambda n: done.append(time.perf_counter())).result()
            ended = time.perf_counter()
    if len(done) > 1:  # the median interval: one noisy block does not set the estimate
        per_block = float(np.median(np.diff(done)))
        startup += max((ended - began) - per_block * len(done), 0.0)  # the pipeline's fill and drain
    else:
        per_block = ended - began
    startup = max(startup - per_block, 0.0)  # the warm-up block itself is counted with the blocks

    voxels = math.prod(layout.loop_shape) * math.prod(layout.spatial_shape)
    out_itemsize = np.dtype(dtype).itemsize
    return Plan(image=str(image_path), device=str(device), workers=workers, shape=tuple(image.shape),
                axes=image.axes, block_shape=layout.block_shape, tile_shape=tile, blocks=layout.blocks,
                voxels=voxels, input_bytes=int(image.array.nbytes), output_bytes=voxels * model.n_classes * out_itemsize,
                seconds_per_block=per_block,
                block_seconds=per_block * _relative_work(model, layout, tile_shape, device, batch_size),
                statistics_seconds=statistics, startup_seconds=startup, calibration_blocks=len(timed))


def _calibration_ids(layout, count: int) -> np.ndarray:
    """Ids of ``count`` blocks of the full block shape (no axis cut by the image border) spread
    evenly over the volume; where every block is cut (a small image), the first ones."""
    counts = tuple(s // b if s >= b else 1 for s, b in zip(layout.spatial_shape, layout.block_shape))
    shape = tuple(layout.loop_shape) + counts
    flat = np.unique(np.linspace(0, math.prod(shape) - 1, count).round().astype(np.int64))
    return np.ravel_multi_index(np.unravel_index(flat, shape), tuple(layout.loop_shape) + tuple(layout.block_grid))
