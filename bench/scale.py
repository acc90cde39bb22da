"""Benchmark: blockwise prediction as the block count grows, and storage latency hidden by pipelining.

Only scheduling, bookkeeping and I/O are timed: a stand-in replaces the model's forward pass
(``unet_core.overlap_tile.forward_probabilities``) with constant probabilities of the right shape, so each block
still reads its input with the real context (the margin of a depth-4 2D U-Net, 92 px), is
normalised, tiled and written as an OME-Zarr chunk, and is recorded in its task's log.

(overhead) ``predict_image(scheduler="distributed")`` on a ``LocalCluster`` of 2 worker processes
    (1 thread each), 64x64 blocks of a ``(T, 6400, 6400)`` uint8 volume: 10^4 blocks per plane,
    T = 1, 10, 100 for 10^4, 10^5, 10^6 blocks. The input exists as zarr metadata only (its chunks
    read as fill values, no disk I/O); the outputs are real chunk files. Each size runs in its own
    client process; printed: wall time per block, the ratio of 10^6 to 10^4 (goal <= 2), and the
    client process's peak RSS (the dask scheduler runs in it too; goal <= 2 GB at 10^6). Then the
    overhead of a terabyte: blocks of 1 TB (uint8) at the default block of a CUDA device with 80 GB
    (the paper's 2D U-Net, float32 feature maps) times the overhead per block, as a fraction of
    the model's compute for 1 TB at an assumed effective GPU rate (``--gpu-tmacs``, TMAC/s).
(latency) One worker stream (the threads scheduler) whose stand-in model takes ``--compute-ms`` per
    block (a sleep, as a GPU kernel leaves the CPU free). Throughput with an added per-block read
    latency equal to the compute time, against the same run without it: goal >= 0.8. Also
    printed: the same latency with reads done one after another (no pipelining, ~0.5 expected).

Usage: python bench/scale.py [--quick] [--parts overhead,latency] [--blocks 10000,100000,1000000]
       [--compute-ms 20] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars in the figures

import numpy as np  # noqa: E402
import torch  # noqa: E402

from unet_core import UNet, io  # noqa: E402
from unet_core import cost, overlap_tile  # noqa: E402
from unet_core import predict as predict_module  # noqa: E402
from unet_core.predict import default_tile_shape, predict_image  # noqa: E402
from unet_core.tiling import axis_origins  # noqa: E402

BLOCK = 64
PLANE = 6400  # 100 x 100 blocks of 64 px per plane


def _stand_in_forward(compute_s: float = 0.0):
    """A replacement for overlap_tile.forward_probabilities: constant probabilities of the model's output shape."""

    def forward(model, x, tta):
        if compute_s:
            time.sleep(compute_s)
        margin = model.margin()
        shape = (x.shape[0], model.n_classes, *(s - 2 * margin for s in x.shape[2:]))
        return torch.full(shape, 1.0 / model.n_classes)

    return forward


def _model(path: Path) -> UNet:
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=4, dropout=0.0)  # the margin of any depth-4 2D U-Net: 92 px
    torch.save({"model": model.state_dict(), "architecture": model.config()}, path)
    return model


def _virtual_volume(path: Path, planes: int, size: int) -> Path:
    """An OME-Zarr image of zarr metadata only: chunks read as zeros, nothing on disk."""
    path.mkdir(parents=True)
    io.create_image(path, "tyx", (planes, size, size), "uint8", (1.0, 1.0, 1.0), (1, 512, 512), path.name)
    return path


class _StandInPlugin:
    """Worker plugin: the stand-in forward pass in every worker process."""

    name = "unet-stand-in"

    def setup(self, worker):
        import unet_core.overlap_tile

        unet_core.overlap_tile.forward_probabilities = _stand_in_forward()


def _volume_shape(blocks: int) -> tuple[int, int]:
    """(planes, plane edge) of a volume of about ``blocks`` 64x64 blocks."""
    per_plane = (PLANE // BLOCK) ** 2
    if blocks >= per_plane:
        return -(-blocks // per_plane), PLANE
    return 1, round(math.sqrt(blocks)) * BLOCK


def _overhead_child(blocks: int, tmp: Path) -> dict:
    from distributed import Client, LocalCluster, WorkerPlugin

    plugin = type("StandIn", (_StandInPlugin, WorkerPlugin), {})()
    model_path = tmp / "m.pt"
    _model(model_path)
    image = _virtual_volume(tmp / "in.ome.zarr", *_volume_shape(blocks))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(plugin)
        began = time.perf_counter()
        summary = predict_image(model_path, image, tmp / "out.ome.zarr", block_shape=(BLOCK, BLOCK),
                                scheduler="distributed", device="cpu")
        wall = time.perf_counter() - began
    return {"blocks": summary["blocks"], "wall_s": wall,
            "client_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _terabyte_fraction(per_block_s: float, gpu_tmacs: float) -> None:
    """Blocks of 1 TB at the default CUDA block of the paper model, and their overhead."""
    paper = UNet(base_channels=64, depth=4, dropout=0.0)
    budget = int(80e9 * cost.CUDA_BUDGET_FRACTION)
    side = 10_000  # 10^4 planes of 10^4 x 10^4 uint8 = 1 TB
    tile = default_tile_shape(paper, (side, side), "cuda", memory_budget=budget)
    grid = 2**paper.depth
    block = cost.default_block_shape(paper, (side, side), "cuda", tile_shape=tile)
    per_plane = math.prod(-(-side // b) for b in block)
    blocks = side * per_plane
    arch = cost.architecture(paper)
    _, macs, _ = cost.walk(arch, paper.input_shape_for(tile), 1, False)
    tiles_per_block = math.prod(len(axis_origins(b, t, grid)) for b, t in zip(block, tile))
    compute_s = blocks * tiles_per_block * macs / (gpu_tmacs * 1e12)
    overhead_s = blocks * per_block_s
    print(f"1 TB (10^4 planes of 10^4 x 10^4 uint8), paper 2D U-Net on an 80 GB GPU: tile {tile}, default block "
          f"{block}, {blocks:,} blocks")
    print(f"  overhead {per_block_s * 1e3:.2f} ms/block x {blocks:,} blocks = {overhead_s / 60:.1f} min of worker time; "
          f"model compute at an assumed {gpu_tmacs:g} TMAC/s: {compute_s / 3600:.1f} h; "
          f"overhead = {overhead_s / compute_s:.2%} of the run")


def overhead(sizes: list[int], tmp_root: Path, gpu_tmacs: float) -> None:
    print("(overhead) stand-in model, 2 worker processes, 64x64 blocks, distributed scheduler")
    rows = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="unet-scale-", dir=tmp_root))
        try:
            row = _run_child(["--child", "overhead", "--blocks", str(n), "--tmp", str(tmp)])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append(row)
        print(f"  {row['blocks']:>9,} blocks: {row['wall_s']:8.1f} s wall, {row['wall_s'] / row['blocks'] * 1e3:6.3f} "
              f"ms/block (= {2 * row['wall_s'] / row['blocks'] * 1e3:.3f} ms of worker time), client peak RSS "
              f"{row['client_peak_rss_mb']:,.0f} MB", flush=True)
    first, last = rows[0], rows[-1]
    ratio = (last["wall_s"] / last["blocks"]) / (first["wall_s"] / first["blocks"])
    print(f"  per-block overhead at {last['blocks']:,} / at {first['blocks']:,} blocks: {ratio:.3f} (goal <= 2)")
    print(f"  client peak RSS at {last['blocks']:,} blocks: {last['client_peak_rss_mb'] / 1024:.2f} GB (goal <= 2)")
    _terabyte_fraction(2 * last["wall_s"] / last["blocks"], gpu_tmacs)


def _latency_run(image: Path, output: Path, model_path: Path, compute_s: float, latency_s: float) -> float:
    """Seconds of predict_image (one stream) with the stand-in model and an added read latency."""
    original_input, original_forward = predict_module.read_block_input, overlap_tile.forward_probabilities

    def slow_input(*args, **kwargs):
        time.sleep(latency_s)
        return original_input(*args, **kwargs)

    predict_module.read_block_input = slow_input
    overlap_tile.forward_probabilities = _stand_in_forward(compute_s)
    try:
        began = time.perf_counter()
        predict_image(model_path, image, output, block_shape=(BLOCK, BLOCK), scheduler="threads", device="cpu")
        return time.perf_counter() - began
    finally:
        predict_module.read_block_input, overlap_tile.forward_probabilities = original_input, original_forward
        shutil.rmtree(output, ignore_errors=True)


def latency(blocks: int, compute_ms: float, tmp_root: Path) -> None:
    print(f"(latency) one stream, stand-in model of {compute_ms:g} ms per block, {blocks} blocks of 64x64")
    tmp = Path(tempfile.mkdtemp(prefix="unet-latency-", dir=tmp_root))
    try:
        margin = _model(tmp / "m.pt").margin()
        planes = -(-blocks // (PLANE // BLOCK // 10) ** 2)
        data = np.random.default_rng(0).integers(0, 255, (planes, PLANE // 10, PLANE // 10)).astype(np.uint8)
        with io.atomic_image(tmp / "latency.ome.zarr", "tyx", data.shape, dtype="uint8", scale=(1, 1, 1),
                             chunks=(1, 640, 640)) as writer:
            writer.write({}, data, "tyx")
        blocks = data.shape[0] * (data.shape[1] // BLOCK) * (data.shape[2] // BLOCK)
        compute = compute_ms / 1e3
        run = [tmp / "latency.ome.zarr", tmp / "out.ome.zarr", tmp / "m.pt", compute]
        _latency_run(*run, 0.0)  # warm-up
        fast = blocks / _latency_run(*run, 0.0)
        slow = blocks / _latency_run(*run, compute)
        print(f"  pipelined, no added latency:         {fast:7.1f} blocks/s ({blocks} blocks)")
        print(f"  pipelined, +{compute_ms:g} ms per read:         {slow:7.1f} blocks/s")
        print(f"  ratio {slow / fast:.3f} (goal >= 0.8)")
        serial = _serial_throughput(blocks, compute, tmp, data, margin)
        print(f"  unpipelined (read, then compute), +{compute_ms:g} ms per read: {serial:7.1f} blocks/s, "
              f"ratio {serial / fast:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _serial_throughput(blocks: int, compute_s: float, tmp: Path, data: np.ndarray, margin: int) -> float:
    """The same blocks (their input with the model's margin) with the read latency and the
    compute one after the other."""
    image = io.open_image(tmp / "latency.ome.zarr")
    began = time.perf_counter()
    per_plane = (data.shape[1] // BLOCK) * (data.shape[2] // BLOCK)
    for block_id in range(blocks):
        t, rest = divmod(block_id, per_plane)
        y, x = divmod(rest, data.shape[2] // BLOCK)
        time.sleep(compute_s)  # the added read latency
        _ = image.array[t, max(y * BLOCK - margin, 0):(y + 1) * BLOCK + margin,
                        max(x * BLOCK - margin, 0):(x + 1) * BLOCK + margin]
        time.sleep(compute_s)  # the stand-in compute
    return blocks / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^3 and 10^4 blocks, a short latency run")
    parser.add_argument("--parts", default="overhead,latency")
    parser.add_argument("--blocks", default="10000,100000,1000000", help="block counts of the overhead part")
    parser.add_argument("--latency-blocks", type=int, default=400)
    parser.add_argument("--compute-ms", type=float, default=20.0)
    parser.add_argument("--gpu-tmacs", type=float, default=200.0,
                        help="assumed effective GPU rate (TMAC/s) for the 1 TB fraction; high = conservative")
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "overhead":
        print(json.dumps(_overhead_child(int(args.blocks), Path(args.tmp))))
        return
    parts = set(args.parts.split(","))
    sizes = [1000, 10000] if args.quick else [int(n) for n in args.blocks.split(",")]
    if "overhead" in parts:
        overhead(sizes, Path(args.tmp), args.gpu_tmacs)
    if "latency" in parts:
        latency(100 if args.quick else args.latency_blocks, args.compute_ms, Path(args.tmp))


if __name__ == "__main__":
    main()
