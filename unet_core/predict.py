"""Blockwise overlap-tile prediction of OME-Zarr volumes (zarr to zarr) and its scheduling.

Each block (= output chunk) reads its input with real neighbouring context, is predicted by
the one tile loop of :mod:`unet_core.overlap_tile`, and is written once; blocks run pipelined
in one stream per worker, on dask's local schedulers, a ``dask.distributed`` cluster or SLURM
worker jobs (:mod:`unet_core.cluster`). Tile and block sizes come from :mod:`unet_core.cost`.

Axis order: images are numpy ``(C, *spatial)``; probabilities ``(n_classes, *spatial)``.
Spatial is ``(Y, X)`` for a 2D model and ``(Z, Y, X)`` for 3D.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import logging
import shutil
import socket
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
from .atomic import publish, remove_stale
from .checkpoint import load_model
from .cost import CPU_MEMORY_BUDGET, default_block_shape, default_tile_shape, device_memory_budget, forward_memory
from .model import UNet
from .defaults import choices, default
from .normalize import Normalization, NormalizationTable, normalization_table
from .overlap_tile import compiled, memory_format, padded_region, predict_padded, predict_tiled
from .precision import resolve_precision
from .tiling import read_reflected

# predict_tiled, default_tile_shape, forward_memory, load_model and CPU_MEMORY_BUDGET live in
# overlap_tile, cost and checkpoint; they are importable from here as before.
__all__ = ["predict_image", "Job", "Layout", "block_layout", "check_inputs", "create_output", "run_blocks",
           "read_block_input", "resolve_device", "probability_scale", "predict_tiled", "default_tile_shape",
           "forward_memory", "load_model", "CPU_MEMORY_BUDGET"]

# Per worker stream: blocks whose input is read ahead, and writes that may be pending, while the
# model computes a block. Two reads in flight hide a storage latency up to twice the compute time.
_READ_AHEAD = 2
_WRITE_BEHIND = 2
# On a dask.distributed cluster: block tasks queued or running per worker (the client never holds
# more, whatever the volume), and the most blocks per task.
_TASKS_PER_WORKER = 2
_MAX_TASK_BLOCKS = 64

_LOG = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, device: str, sha256: str, compile: bool = False) -> UNet:
    """One model per worker process, device and checkpoint content (tasks of a worker share it;
    a retrained checkpoint at the same path is a new key). A worker refuses a checkpoint that is
    not the one the run started with: blocks of two models must not mix in one output. With
    ``compile`` the model runs through ``torch.compile`` (:func:`compiled`)."""
    if sha256 and io.sha256_file(path) != sha256:
        raise ValueError(f"{path}: the checkpoint changed after this prediction started (sha256 is no longer "
                         f"{sha256[:12]}...); rerun predict to start over with the new model")
    model, _ = load_model(path, device)
    model = model.to(device=device, memory_format=memory_format(model.ndim))
    return compiled(model) if compile else model


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
class Job:
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
    batch_size: int | None  # None: unet_core.cost.default_batch_size per block
    device: str
    normalization: NormalizationTable
    scale: float
    tta: bool
    model_sha256: str = ""
    precision: str = "fp32"
    compile: bool = False  # torch.compile the model (once per worker and tile shape)

    def block_region(self, block_id: int) -> tuple[dict, tuple[int, ...], tuple[int, ...]]:
        position = np.unravel_index(block_id, self.loop_shape + self.block_grid)
        where = dict(zip(self.loop_axes, (int(p) for p in position[:len(self.loop_axes)])))
        origin = tuple(int(p) * b for p, b in zip(position[len(self.loop_axes):], self.block))
        return where, origin, position


def read_block_input(job: Job, image, block_id: int, model: UNet):
    """The block's position, size and tile, and its normalised float32 input with context."""
    where, origin, _ = job.block_region(block_id)
    view = _ChannelView(image.array, image.axes, where, job.spatial)
    spatial = view.shape[1:]
    size = tuple(min(b, s - o) for b, s, o in zip(job.block, spatial, origin))
    tile = tuple(job.tile) if job.tile else default_tile_shape(model, size, job.device, batch_size=job.batch_size or 1)
    data = read_reflected(view, *padded_region(model, origin, size, tile))
    return where, origin, size, tile, job.normalization.apply(data, where)


def _log_dir(partial: str | Path) -> Path:
    """Folder of the finished-block logs (:mod:`unet_core.blocklog`) beside the partial output."""
    return Path(partial) / ".blocks"


def run_blocks(job: Job, task: str, block_ids, progress=None) -> dict:
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


def _pipeline(job: Job, block_ids: list[int], log: blocklog.TaskLog, progress) -> None:
    model = _cached_model(job.model_path, job.device, job.model_sha256, job.compile)
    image = io.open_image(job.image_path)
    output = zarr.open_array(Path(job.output_path) / "0", mode="r+")
    out_axes = io.canonical_axes(set(job.loop_axes) | set(job.spatial) | {"c"})

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
        output[tuple(selection)] = np.transpose(probs, [order.index(a) for a in kept]).astype(output.dtype, copy=False)
        log.add(block_id)

    with ThreadPoolExecutor(_READ_AHEAD, thread_name_prefix="unet-read") as reader, \
            ThreadPoolExecutor(_WRITE_BEHIND, thread_name_prefix="unet-write") as writer:
        reads = collections.deque(reader.submit(read_block_input, job, image, b, model)
                                  for b in block_ids[:_READ_AHEAD])
        writes: collections.deque = collections.deque()
        for index, block_id in enumerate(block_ids):
            where, origin, size, tile, padded = reads.popleft().result()
            if index + _READ_AHEAD < len(block_ids):
                reads.append(reader.submit(read_block_input, job, image, block_ids[index + _READ_AHEAD], model))
            probs = predict_padded(model, padded, size, tile, batch_size=job.batch_size, device=job.device,
                                   tta=job.tta, precision=job.precision, full_batches=job.compile)
            writes.append(writer.submit(write, where, origin, size, probs, block_id))
            while len(writes) > _WRITE_BEHIND:
                writes.popleft().result()
            if progress is not None:
                progress(1)
        for future in writes:
            future.result()


def _fingerprint(model_path: Path, image: io.Image, block_shape, tile_shape, dtype: str, tta: bool,
                 table: NormalizationTable, precision: str) -> dict:
    """What a partial output was started with: it is resumed only when all of it is the same."""
    normalization = hashlib.sha256(json.dumps(table.as_dict(max_rows=10**9)).encode()).hexdigest()
    return {"model_sha256": io.sha256_file(model_path), "image": str(image.path),
            "image_sha256": image.attrs.get("unet_core", {}).get("provenance", {}).get("sha256", ""),
            "shape": list(image.shape), "block": list(block_shape), "tile": list(tile_shape) if tile_shape else None,
            "dtype": dtype, "tta": tta, "normalization": normalization,
            **({"precision": precision} if precision != "fp32" else {})}  # fp32 runs before precisions resume


def predict_image(
    model_path: str | Path,
    image_path: str | Path,
    output_path: str | Path,
    *,
    block_shape: Sequence[int] | None = None,
    tile_shape: Sequence[int] | None = None,
    batch_size: int | None = default("predict", "batch_size"),
    device: str | None = None,
    dtype: str = default("predict", "dtype"),
    tta: bool = default("predict", "tta"),
    planewise: bool = default("predict", "planewise"),
    scheduler: str = default("predict", "scheduler"),
    precision: str = default("predict", "precision"),
    compile: bool = default("predict", "compile"),
    partitions: int | None = None,
    slurm: dict | None = None,
) -> dict:
    """Blockwise overlap-tile prediction of an OME-Zarr image into an OME-Zarr of probabilities.

    Parameters
    ----------
    block_shape : spatial block shape (multiples of ``2**depth``), also the output chunk shape:
        no two workers ever write one chunk. Default: two tile steps per axis (``2 * (tile //
        2**depth) * 2**depth``, of ``tile_shape`` or the image's default tile), capped by the
        image: two tiles per axis cover a full block, reaching 4 px past it.
    tile_shape : output tile inside a block; None = fast default for the device.
    device : where the blocks run; None = CUDA where torch sees a GPU, else the CPU, decided by
        the machine that runs them (on a cluster a worker, asked once: :func:`resolve_device`).
    dtype : ``float16``, ``float32`` or ``uint8`` (probability x 255).
    tta : average over flips/rotations (test-time augmentation).
    precision : ``fp32`` (exact), ``bf16``, ``fp16``, or ``auto`` (bf16 on a CUDA GPU that has it).
    compile : run the model through ``torch.compile`` (each tile shape compiles once per worker).
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
    model, checkpoint = load_model(model_path, "cpu")
    scale, slurm_settings = probability_scale(dtype), _slurm_settings(scheduler, slurm)
    check_inputs(model, model_path, image_path, block_shape, tile_shape, planewise)  # before worker jobs start
    with _cluster(scheduler, slurm_settings) as client:
        # The device that runs the blocks decides the tile, the block and the precision: on a
        # cluster a worker's (the head is often a CPU node), asked once here.
        device, budget, precision = (resolve_device(device, precision, model.ndim) if client is None else
                                     client.submit(resolve_device, device, precision, model.ndim, pure=False).result())
        layout = block_layout(model, model_path, image_path, block_shape, tile_shape, device, batch_size, planewise,
                              budget)
        image, spatial, block_shape = layout.image, layout.spatial, layout.block_shape
        loop_axes, loop_shape, block_grid = layout.loop_axes, layout.loop_shape, layout.block_grid
        table = normalization_table(image, Normalization.from_checkpoint(checkpoint.get("normalization")), loop_axes)
        fingerprint = _fingerprint(model_path, image, block_shape, tile_shape, dtype, tta, table, precision)
        partial = output_path.parent / f".{output_path.name}.partial"
        remove_stale(output_path)  # a folder renamed aside by a killed publish (file systems that cannot exchange)
        resumed = partial.exists() and _read_fingerprint(partial) == fingerprint
        if not resumed:
            provenance = {"model": str(model_path), "model_card": str(model_path.with_name("model_card.json")),
                          "source": str(image_path), "model_ndim": model.ndim, "probability_scale": scale,
                          "normalization": table.as_dict(), "block_shape": list(block_shape), "tta": tta,
                          "compiled": compile, "precision": precision, **_tile_record(layout, tile_shape, device),
                          **{k: checkpoint[k] for k in ("training_objects",) if k in checkpoint}}
            _start_partial(partial, fingerprint, model, layout, dtype, output_path.name, provenance)
        todo = np.setdiff1d(np.arange(layout.blocks, dtype=np.int64), blocklog.finished_blocks(_log_dir(partial)))
        job = Job(str(model_path), str(image_path), str(partial), spatial, loop_axes, loop_shape, block_shape,
                  block_grid, tuple(tile_shape) if tile_shape else None, batch_size, device, table, scale, tta,
                  fingerprint["model_sha256"], precision, compile)
        _schedule(job, todo, scheduler, partitions, f"predict {image_path.name}", client,
                  slurm_settings.maximum_workers if slurm_settings else 1)
    _publish(partial, output_path, layout.blocks)
    return {"blocks": layout.blocks, "computed": len(todo), "reused": layout.blocks - len(todo), "resumed": resumed}


def resolve_device(device: str | None, precision: str, ndim: int) -> tuple[str, int | None, str]:
    """Where this process runs blocks: the device (``device``, default CUDA when torch sees a GPU,
    else the CPU), the memory budget of a ``ndim``-D model's forward pass there (None on a CPU:
    ``CPU_MEMORY_BUDGET``) and ``precision`` resolved for it. On a cluster it runs on a worker.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch on {socket.gethostname()} sees no CUDA GPU (torch "
                         f"{torch.__version__}, built for CUDA {torch.version.cuda or 'no'}); run on a GPU node "
                         f"with a CUDA build of torch (README, 'GPU'), or leave the device unset to use the CPU")
    budget = device_memory_budget(ndim, device) if torch.device(device).type == "cuda" else None
    return device, budget, resolve_precision(precision, device)


@contextlib.contextmanager
def _cluster(scheduler: str, slurm_settings):
    """The ``dask.distributed`` client that runs the blocks: the current one (``distributed``),
    SLURM worker jobs started for this call (``slurm``; always closed), or None (dask's local
    schedulers)."""
    if scheduler == "slurm":
        from .cluster import slurm_client

        with slurm_client(slurm_settings) as client:
            yield client
    elif scheduler == "distributed":
        from distributed import get_client

        yield get_client()
    else:
        yield None


def _slurm_settings(scheduler: str, slurm: dict | None):
    """The worker jobs of the slurm scheduler (None for the others); checks the scheduler."""
    if scheduler not in choices("predict", "scheduler"):
        raise ValueError(f"scheduler must be one of {', '.join(choices('predict', 'scheduler'))}, got {scheduler!r}")
    if scheduler != "slurm":
        return None
    from .cluster import SlurmSettings

    return SlurmSettings.from_config(slurm)


def _start_partial(partial: Path, fingerprint: dict, model, layout: Layout, dtype: str, name: str,
                   provenance: dict) -> None:
    """A new partial output (an unfinished one of other settings is removed): the empty arrays
    with their provenance, the settings' fingerprint and an empty block log."""
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    create_output(partial, model, layout, dtype, name, {"unet_core": provenance})
    (partial / ".fingerprint.json").write_text(json.dumps(fingerprint))
    _log_dir(partial).mkdir()


def _publish(partial: Path, output_path: Path, total: int) -> None:
    """Publish the partial output once every block is logged as finished (else raise: a rerun
    computes the missing blocks only)."""
    missing = total - len(blocklog.finished_blocks(_log_dir(partial)))
    if missing:
        raise RuntimeError(f"{output_path}: {missing} of {total} blocks did not finish; rerun to complete them")
    shutil.rmtree(_log_dir(partial))
    (partial / ".fingerprint.json").unlink()
    # One atomic step (unet_core.atomic): killed anywhere, the output is the old one or the new one.
    publish(partial, output_path)


def _tile_record(layout: Layout, tile_shape, device: str) -> dict:
    """The output tile that the blocks use, for the provenance: the one given, or the device's
    default for a full block (a block cut short by the volume's edge picks its own)."""
    source = ("given (predict.tile)" if tile_shape is not None else
              f"default for {device} and a full block; blocks at the volume's edge pick theirs")
    return {"tile": list(layout.tile), "tile_source": source}


def probability_scale(dtype: str) -> float:
    """What probabilities are multiplied by when stored as ``dtype`` (255 for uint8); checks ``dtype``."""
    if dtype not in choices("predict", "dtype"):
        raise ValueError(f"dtype must be one of {', '.join(choices('predict', 'dtype'))}, got {dtype!r}")
    return 255.0 if dtype == "uint8" else 1.0


@dataclass(frozen=True)
class Layout:
    """Where the blocks of an image lie: spatial axes, block shape and grid, loop axes (t, or z planewise)."""

    image: io.Image
    spatial: str
    spatial_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    loop_axes: tuple[str, ...]
    loop_shape: tuple[int, ...]
    block_grid: tuple[int, ...]
    tile: tuple[int, ...]  # the output tile of a full block: given, or the device's default

    @property
    def blocks(self) -> int:
        return int(np.prod(self.loop_shape + self.block_grid, dtype=np.int64))


def block_layout(model: UNet, model_path: Path, image_path: Path, block_shape, tile_shape, device: str,
                 batch_size: int | None, planewise: bool, memory_budget: int | None = None) -> Layout:
    """Check that ``model`` can predict the image and place its blocks (metadata only); default
    tiles fill ``memory_budget`` (default: ``device``'s, :func:`unet_core.cost.device_memory_budget`)."""
    image = check_inputs(model, model_path, image_path, block_shape, tile_shape, planewise)
    spatial = "yx" if model.ndim == 2 else "zyx"
    spatial_shape = tuple(image.shape[image.axes.index(a)] for a in spatial)
    if block_shape is None:
        block_shape = default_block_shape(model, spatial_shape, device, tile_shape, batch_size or 1, memory_budget)
    block_shape = tuple(int(b) for b in block_shape)
    if tile_shape is None:  # fails here, not in a worker, when no tile fits the memory budget
        tile = default_tile_shape(model, tuple(min(b, s) for b, s in zip(block_shape, spatial_shape)), device,
                                  memory_budget, batch_size or 1)
    else:
        tile = tuple(tile_shape)
    loop_axes = tuple(a for a in image.axes if a not in spatial and a != "c")
    loop_shape = tuple(image.shape[image.axes.index(a)] for a in loop_axes)
    block_grid = tuple(-(-s // b) for s, b in zip(spatial_shape, block_shape))
    return Layout(image, spatial, spatial_shape, block_shape, loop_axes, loop_shape, block_grid, tile)


def check_inputs(model: UNet, model_path: Path, image_path: Path, block_shape, tile_shape, planewise: bool) -> io.Image:
    """The image, once checked against ``model`` and the given block and tile shapes: what can be
    checked before the device is known (before worker jobs are queued)."""
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
    if tile_shape is not None:
        model.input_shape_for(tuple(tile_shape))
    grid = 2**model.depth
    if block_shape is not None and (len(block_shape) != model.ndim or any(int(b) % grid or int(b) <= 0
                                                                          for b in block_shape)):
        raise ValueError(f"block_shape {tuple(block_shape)} must have {model.ndim} positive multiples of {grid} "
                         f"(2**depth, the pooling grid), e.g. {(32 * grid,) * model.ndim}, or None for the default "
                         f"(two tile steps per axis)")
    return image


def create_output(path: Path, model: UNet, layout: Layout, dtype: str, name: str, attributes: dict) -> None:
    """The empty probability image in the input image's format: the image's axes and one channel
    per class, chunk = block. A block is one worker's unit of writing, so in NGFF 0.5 it is not
    sharded further: two workers never write one chunk or shard."""
    image = layout.image
    out_axes = io.canonical_axes(set(image.axes) | {"c"})
    out_shape = [model.n_classes if a == "c" else image.shape[image.axes.index(a)] for a in out_axes]
    chunks = [model.n_classes if a == "c" else 1 if a in layout.loop_axes else layout.block_shape[layout.spatial.index(a)]
              for a in out_axes]
    io.create_image(path, out_axes, out_shape, dtype, image.scale_for(out_axes), chunks, name, attributes,
                    compressor=io.FAST_COMPRESSOR, format=image.format)


def _read_fingerprint(partial: Path) -> dict | None:
    try:
        return json.loads((partial / ".fingerprint.json").read_text())
    except (OSError, ValueError):
        return None


def _schedule(job: Job, todo: np.ndarray, scheduler: str, partitions: int | None, desc: str, client=None,
              expected_workers: int = 1) -> None:
    """Run the blocks: on ``client``'s cluster (:func:`_schedule_distributed`), else on a local
    scheduler in ``partitions`` tasks (default 1 pipelined stream)."""
    if client is not None:
        _schedule_distributed(client, job, todo, partitions, desc, expected_workers)
        return
    if not len(todo):
        return
    run = uuid.uuid4().hex[:8]
    chunks = [c for c in np.array_split(todo, partitions or 1) if len(c)]
    with tqdm(total=len(todo), desc=desc, unit="block") as bar:
        lock = threading.Lock()

        def progress(n):
            with lock:
                bar.update(n)

        tasks = [dask.delayed(run_blocks)(job, f"{run}-{k}", chunk, progress if scheduler != "processes" else None)
                 for k, chunk in enumerate(chunks)]
        results = dask.compute(*tasks, scheduler=scheduler)
        if scheduler == "processes":
            bar.update(len(todo))
    for result in results:
        _report_task(result)


def _schedule_distributed(client, job: Job, todo: np.ndarray, partitions: int | None, desc: str,
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
        future = client.submit(run_blocks, job, task, todo[start:start + per_task], key=f"unet-blocks-{task}",
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
