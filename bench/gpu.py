"""Benchmark: prediction throughput, model only and zarr -> zarr, fp32 against bf16, same run.

For a 2D U-Net (the paper's: 64 features, depth 4) and a 3D U-Net (32 features, depth 4 on a
GPU; smaller on a CPU, where the paper sizes take minutes per block), with random weights, on
a synthetic uint16 OME-Zarr volume:

- model only: every block's normalised input with context is read first (untimed), each
  block shape is run once (warm-up: kernels are chosen per shape), then the tile loop
  (``predict_padded``: uploads, forward passes, softmax, back to the host) is timed block by
  block;
- zarr -> zarr: ``predict_image`` end to end (statistics, reads, forward passes, writes),
  timed after a warm-up run of the same call.

The two alternate ``--repeats`` times (default 3), so that each pair runs under the same load
of a shared machine. Throughput is unique output voxels per second of the fastest run of each.
Printed per model and precision: both rates, zarr -> zarr / model only as the median of the
paired ratios (how much of the model's speed the pipeline keeps) and fastest against fastest,
bf16 / fp32, and the largest difference of the bf16 probabilities to the fp32 ones. Runs on a
CPU too (the default there is smaller; a bf16 CPU pass needs AVX512-BF16 or AMX to be fast).

--compile adds the same runs with ``predict.compile`` (torch.compile; compiled in the untimed
warm-ups, whose extra seconds are printed), each against the eager run of its precision.

Usage: python bench/gpu.py [--device cuda] [--precisions fp32 bf16] [--only 2d|3d] [--compile] [--repeats N]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (features, depth, volume shape z y x) per model and device kind; blocks are predict's defaults.
# Each volume has 6 or more blocks: a block's read (with context) and its write overlap the
# next and previous blocks' forward passes, so with one or two blocks (the earlier 3D sizes,
# 256 x 512 x 512 on an 80 GiB GPU and 128 x 256 x 256 here) the ratio measured the start and end
# of the pipeline rather than its throughput (0.64-0.96 between runs on a 2-core CPU).
SIZES = {
    "cuda": {"2d": (64, 4, (16, 2048, 2048)), "3d": (32, 4, (256, 1024, 1024))},
    "cpu": {"2d": (64, 4, (2, 768, 768)), "3d": (8, 3, (128, 512, 512))},
}


def _volume(path: Path, shape) -> None:
    from scipy import ndimage

    from unet_core import io

    rng = np.random.default_rng(0)
    data = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2)
    data = 300 + 3000 * (data - data.min()) / (data.max() - data.min()) + rng.normal(0, 30, shape)
    _, array = io.create_image(path, "zyx", shape, "uint16", [1.0] * 3, None, path.name)
    array[...] = data.clip(0, 65535).astype(np.uint16)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _model_only(model_path: Path, image_path: Path, device: str, precision: str, planewise: bool,
                compile: bool):
    """A function that times the tile loop over every block (inputs read beforehand; returns
    seconds), and the seconds of the warm-up passes of each block shape (where a compiled model
    compiles). Batches as predict_image's default (``batch_size`` null)."""
    from unet_core import io
    from unet_core.checkpoint import load_model
    from unet_core.normalize import Normalization, normalization_table
    from unet_core.overlap_tile import compiled, memory_format, predict_padded
    from unet_core.predict import Job, block_layout, read_block_input

    model, checkpoint = load_model(model_path, "cpu")
    layout = block_layout(model, model_path, image_path, None, None, device, None, planewise)
    image = io.open_image(image_path)
    table = normalization_table(image, Normalization.from_checkpoint(checkpoint.get("normalization")),
                                layout.loop_axes)
    job = Job(str(model_path), str(image_path), "", layout.spatial, layout.loop_axes, layout.loop_shape,
              layout.block_shape, layout.block_grid, None, None, device, table, 1.0, False, "", precision)
    model.eval().to(device=device, memory_format=memory_format(model.ndim))
    model = compiled(model) if compile else model
    inputs = [read_block_input(job, image, block, model) for block in range(layout.blocks)]
    run = dict(device=device, precision=precision, batch_size=None, full_batches=compile)
    began = time.perf_counter()
    for _, _, size, tile, padded in {(s, t): (w, o, s, t, p) for w, o, s, t, p in inputs}.values():
        predict_padded(model, padded, size, tile, **run)  # warm-up, every shape
    _sync(device)
    warm_up = time.perf_counter() - began

    def timed() -> float:
        seconds = 0.0
        for _, _, size, tile, padded in inputs:
            _sync(device)
            began = time.perf_counter()
            predict_padded(model, padded, size, tile, **run)
            _sync(device)
            seconds += time.perf_counter() - began
        return seconds

    return timed, warm_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cpu or cuda[:N] (default: CUDA when available)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--only", choices=["2d", "3d"], help="one of the two models")
    parser.add_argument("--compile", action="store_true", help="also run each precision with torch.compile")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs of model-only and zarr -> zarr runs")
    args = parser.parse_args()

    import torch

    from unet_core import io
    from unet_core.model import UNet
    from unet_core.predict import predict_image

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(device).type
    where = torch.cuda.get_device_name(device) if kind == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {device} ({where}), torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        work = Path(scratch)
        for name, (features, depth, shape) in SIZES[kind].items():
            if args.only and name != args.only:
                continue
            ndim = 2 if name == "2d" else 3
            torch.manual_seed(0)
            model = UNet(base_channels=features, depth=depth, ndim=ndim, dropout=0.0)
            torch.save({"model": model.state_dict(), "architecture": model.config()}, work / f"{name}.pt")
            image = work / f"{name}.ome.zarr"
            _volume(image, shape)
            voxels = int(np.prod(shape))
            outputs = {}
            for precision, compile in itertools.product(args.precisions, (False, True) if args.compile else (False,)):
                model_only, warm_up = _model_only(work / f"{name}.pt", image, device, precision, ndim == 2, compile)

                def zarr_to_zarr(run: str) -> float:
                    out = work / f"{name}-{precision}-{compile}-{run}.ome.zarr"
                    shutil.rmtree(out, ignore_errors=True)
                    _sync(device)
                    began = time.perf_counter()
                    predict_image(work / f"{name}.pt", image, out, device=device, precision=precision,
                                  planewise=ndim == 2, dtype="float32", compile=compile)
                    _sync(device)
                    return time.perf_counter() - began

                zarr_to_zarr("warm-up")
                pairs = [(model_only(), zarr_to_zarr("timed")) for _ in range(args.repeats)]
                outputs[precision, compile] = np.asarray(
                    io.open_image(work / f"{name}-{precision}-{compile}-timed.ome.zarr").array)
                variant = precision + (" compiled" if compile else "")
                fastest = (min(m for m, _ in pairs), min(z for _, z in pairs))
                paired = statistics.median(m / z for m, z in pairs)
                rows.append((name, features, depth, shape, variant, voxels / fastest[0] / 1e6,
                             voxels / fastest[1] / 1e6, paired))
                print(f"  {name} {variant}: model only {rows[-1][5]:.2f} MVox/s, zarr -> zarr {rows[-1][6]:.2f} MVox/s; "
                      f"zarr/model per pair {', '.join(f'{m / z:.3f}' for m, z in pairs)}"
                      + (f"; first pass of each block shape (compiling) {warm_up:.0f} s" if compile else ""), flush=True)
            for (precision, compile), probs in outputs.items():
                if (precision, compile) != ("fp32", False) and ("fp32", False) in outputs:
                    difference = np.abs(probs - outputs["fp32", False])
                    print(f"  {name} {precision}{' compiled' if compile else ''}: max |p - p(fp32)| = "
                          f"{difference.max():.4g}, mean {difference.mean():.3g}")

    print(f"\nzarr/model: median of {args.repeats} paired runs (fastest/fastest); rates: the fastest runs")
    print("model  features depth  volume              precision      model MVox/s  zarr->zarr MVox/s  "
          "zarr/model       vs fp32  vs eager")
    rate = {(r[0], r[4]): r[6] for r in rows}
    for name, features, depth, shape, variant, model_rate, zarr_rate, paired in rows:
        versus = f"{zarr_rate / rate[name, 'fp32']:.3f}" if (name, "fp32") in rate else "-"
        eager = variant.removesuffix(" compiled")
        speedup = f"{zarr_rate / rate[name, eager]:.3f}" if variant != eager else "-"
        print(f"{name:6s} {features:8d} {depth:5d}  {str(shape):19s} {variant:14s} {model_rate:12.2f} "
              f"{zarr_rate:18.2f} {paired:7.3f} ({zarr_rate / model_rate:.3f})  {versus:7s}  {speedup}")


if __name__ == "__main__":
    main()
