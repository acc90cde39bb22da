"""Benchmark: blockwise zarr→zarr prediction against the model alone, against MONAI, and its memory.

Every figure is a ratio against a baseline measured in the same run (the machine is shared and
noisy: runs are interleaved, repeated, and the fastest of each kind is kept).

(a) ``predict_image`` (OME-Zarr → OME-Zarr, default block and tile) on a ``(T, Y, X)`` uint16
    volume with a base-16, depth-4 2D U-Net, against the model alone: forward passes over
    in-memory channels_last tensors of the same tile input shapes and the same count
    (``torch.inference_mode``). Ratio = model-only time / predict_image time = output px/s of
    predict_image / output px/s of the same forward passes; goal >= 0.90 (reading, mirroring,
    normalising, scheduling, softmax and writing cost <= 10 %). Also printed: the tiling
    efficiency of the block plan (computed tile px / output px) and the same pair for another
    block and tile (``--compare-block``, ``--compare-tile``; by default 512 and 468, the defaults
    before the block was matched to the tile), to separate I/O cost from tile waste.
(b) In-memory throughput at equal forward memory: ``predict_tiled`` (default tile, chosen by
    ``default_tile_shape`` within ``CPU_MEMORY_BUDGET`` by ``forward_memory``) against MONAI's
    ``sliding_window_inference`` (overlap 0.25, gaussian blending, sw_batch_size 1) running a
    padded-convolution twin of the same U-Net (same layers, widths and weights, 3x3 convs with
    zero padding 1). Equal memory is measured, not assumed: the peak of one forward pass is
    measured in a subprocess (growth of VmHWM after a reset), and MONAI's roi is the largest
    multiple of 2**depth whose measured peak fits the budget. Also timed: MONAI with the roi
    that ``forward_memory`` (the estimate ours uses) gives, and ours with the cubic tile whose
    measured peak fills the budget. Ratio ours/MONAI of output px/s; goal >= 1.0 in 2D (planes
    of the (a) volume). In 3D (base-16, depth-3 3D U-Net on a synthetic volume) the ratio is
    printed for the default tile and for a sweep of larger cubic tiles, with the tile size at
    which it reaches 1.0. "Interior" ratios use one forward pass per side (output px per pass /
    pass time: the tile's px for ours, MONAI's step^n for MONAI), i.e. the ratio on an
    infinitely large image, without the border effects of a given image size. Beside the
    measured peaks the bench prints ``forward_memory`` and the live bytes it is made of
    (``forward_memory`` without its safety factor).
(c) Peak RSS of ``predict_image`` (tiny model: base 2, depth 2; ``dtype="uint8"``) on a 4 GB
    uint16 ``(T, Y, X)`` OME-Zarr against a 0.5 GB one, each in its own subprocess; goal <= 1.2.

Volumes are OME-Zarr written with ``unet_core.io.atomic_image`` (smooth blobs plus noise,
filled one plane at a time) in a temporary folder under ``--tmp`` that is deleted at the end.
Runs one heavy process at a time (torch uses all cores).

Usage: python bench/predict.py [--quick] [--parts a,b,c] [--planes 4] [--size 2048] [--repeats 3]
       [--compare-block 512 --compare-tile 468]
       [--rss-gb 4 --rss-small-gb 0.5] [--tmp /tmp]
Requires monai for (b): pip install monai (with --no-deps if pip wants to change torch).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # predict_image's progress bar would flood the output

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from unet_core import io, normalize  # noqa: E402
from unet_core.model import UNet, valid_sizes  # noqa: E402
from unet_core.cost import (CPU_MEMORY_BUDGET, MEMORY_SAFETY, default_block_shape, default_tile_shape,  # noqa: E402
                            forward_memory)
from unet_core.overlap_tile import predict_tiled  # noqa: E402
from unet_core.predict import predict_image  # noqa: E402
from unet_core.tiling import tile_origins  # noqa: E402

MiB = 2**20


# --- data and models -----------------------------------------------------------------------

def _bases(size_y: int, size_x: int, count: int, rng) -> list[np.ndarray]:
    """Smooth blob images (uint16), like fluorescence; noise is added per plane."""
    ay, ax = np.arange(size_y, dtype=np.float32), np.arange(size_x, dtype=np.float32)
    bases = []
    for _ in range(count):
        image = np.full((size_y, size_x), 100.0, np.float32)
        for _ in range(max(8, size_y * size_x // 50_000)):
            cy, cx = rng.uniform(0, size_y), rng.uniform(0, size_x)
            radius = rng.uniform(6, 40)
            wy = slice(max(0, int(cy - 4 * radius)), int(cy + 4 * radius))
            wx = slice(max(0, int(cx - 4 * radius)), int(cx + 4 * radius))
            gy = np.exp(-((ay[wy] - cy) ** 2) / (2 * radius**2))
            gx = np.exp(-((ax[wx] - cx) ** 2) / (2 * radius**2))
            image[wy, wx] += rng.uniform(200, 3000) * np.outer(gy, gx)
        bases.append(image.astype(np.uint16))
    return bases


def write_volume(path: Path, planes: int, size: int, seed: int = 0) -> Path:
    """A uint16 ``tyx`` OME-Zarr of ``planes`` planes of ``size`` x ``size``, written plane by plane."""
    rng = np.random.default_rng(seed)
    bases = _bases(size, size, 4, rng)
    with io.atomic_image(path, "tyx", (planes, size, size), dtype="uint16", scale=[1.0, 1.0, 1.0]) as writer:
        for t in range(planes):
            noise = rng.integers(0, 48, (size, size), dtype=np.uint16)
            writer.array[t] = bases[(t // 8) % len(bases)] + noise
    return path


def volume_3d(shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    """A normalised float32 ``(1, Z, Y, X)`` volume: blobs stacked with a slow drift, plus noise."""
    rng = np.random.default_rng(seed)
    bases = _bases(shape[1], shape[2], 4, rng)
    volume = np.empty(shape, np.float32)
    for z in range(shape[0]):
        volume[z] = bases[(z // 16) % len(bases)] + rng.normal(0, 20, shape[1:])
    volume -= volume.mean()
    volume /= volume.std()
    return volume[None]


def make_model(ndim: int, base: int, depth: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(in_channels=1, n_classes=2, base_channels=base, depth=depth, ndim=ndim, dropout=0.5).eval()


def save_model(model: UNet, path: Path) -> Path:
    torch.save({"model": model.state_dict(), "architecture": model.config()}, path)
    return path


class PaddedTwin(UNet):
    """The same U-Net with zero-padded ("same") 3x3 convolutions: the usual peer for MONAI.

    Same layers, widths, depth and weights; with input sizes that are multiples of 2**depth
    the skip maps already match, so the centre crop is a no-op.
    """

    def __init__(self, model: UNet) -> None:
        super().__init__(**model.config())
        self.load_state_dict(model.state_dict())
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.kernel_size[0] == 3:
                module.padding = (1,) * self.ndim
        self.eval()

    def _check_input(self, x: torch.Tensor) -> None:  # any multiple of 2**depth is valid
        pass


def memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


def live_bytes(model: UNet, input_shape) -> float:
    """The bytes of the tensors alive at the peak of a CPU forward pass: forward_memory without its safety factor."""
    return forward_memory(model, input_shape) / MEMORY_SAFETY["cpu"]


def equal_memory_roi(twin: UNet, budget: int) -> int:
    """Largest multiple of 2**depth whose (roi,)*ndim forward pass of the padded twin fits ``budget``
    by ``forward_memory`` (which reads the padding from the model)."""
    grid = 2**twin.depth
    roi = grid
    while forward_memory(twin, (roi + grid,) * twin.ndim) <= budget:
        roi += grid
    return roi


# --- timing helpers ----------------------------------------------------------------------------

def forward_seconds(model: nn.Module, input_shape, repeats: int = 3) -> float:
    """Fastest of ``repeats`` inference forward passes (after one warm-up) on an in-memory tensor."""
    ndim = len(input_shape)
    x = torch.randn(1, 1, *input_shape).contiguous(memory_format=memory_format(ndim))
    model.to(memory_format=memory_format(ndim))
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return min(times, default=0.0)


def block_plan(model: UNet, spatial_shape, block_shape=None, tile_shape=None) -> collections.Counter:
    """Tile input shapes and their count for one plane, as ``predict_image`` tiles its blocks.

    Mirrors ``unet_core.predict``: its default block (two tile steps of the default tile, capped
    by the image), per block ``default_tile_shape(model, block size)`` and ``tile_origins`` on the
    pooling grid.
    """
    grid = 2**model.depth
    if block_shape is None:
        block_shape = default_block_shape(model, spatial_shape, "cpu", tile_shape)
    plan: collections.Counter = collections.Counter()
    for origin in itertools.product(*(range(0, s, b) for s, b in zip(spatial_shape, block_shape))):
        size = tuple(min(b, s - o) for b, s, o in zip(block_shape, spatial_shape, origin))
        tile = tuple(tile_shape) if tile_shape else default_tile_shape(model, size, "cpu")
        plan[tile] += len(tile_origins(size, tile, grid))
    return plan


def in_worker(function, *args):
    """Run ``function(*args)`` in a worker thread, as predict_image runs its forward passes.

    glibc malloc treats the main thread differently: there it hands the ~30 MB feature maps back
    to the kernel after every forward pass and faults them in again on the next (about 20 k minor
    page faults and 10-15 % of the time of a 652² pass on this machine), while a thread arena
    keeps them. The model-only baseline of (a) runs in a thread so that it is the faster of the two.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(function, *args).result()


def model_only_seconds(model: UNet, plan: collections.Counter, planes: int) -> float:
    """Wall time of the plan's forward passes on in-memory tensors (model only, no I/O)."""
    fmt = memory_format(model.ndim)
    model.to(memory_format=fmt)
    inputs = {tile: torch.randn(1, model.in_channels, *model.input_shape_for(tile)).contiguous(memory_format=fmt)
              for tile in plan}
    with torch.inference_mode():
        for x in inputs.values():  # warm-up, one per shape
            model(x)
        start = time.perf_counter()
        for tile, count in plan.items():
            for _ in range(count * planes):
                model(inputs[tile])
        return time.perf_counter() - start


def predict_image_seconds(model_path: Path, image_path: Path, output_path: Path, **kwargs) -> float:
    start = time.perf_counter()
    predict_image(model_path, image_path, output_path, device="cpu", **kwargs)
    seconds = time.perf_counter() - start
    shutil.rmtree(output_path)
    return seconds


# --- subprocess measurements -------------------------------------------------------------------

def _peak_rss() -> int:
    """Peak resident bytes of this process since the last reset (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the peak to the current RSS (Linux ``clear_refs`` 5); returns the new peak."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _peak_rss()


def _child(argument: str) -> None:
    """Entry point of the measurement subprocesses; prints one JSON line."""
    spec = json.loads(argument)
    if spec["what"] == "peak":  # peak memory of one forward pass
        model = make_model(spec["ndim"], spec["base"], spec["depth"])
        if spec["kind"] == "twin":
            model = PaddedTwin(model)
            small = (2 ** spec["depth"],) * spec["ndim"]
        else:
            small = (valid_sizes(spec["depth"], kind="input", near=1)[-1],) * spec["ndim"]
        fmt = memory_format(spec["ndim"])
        model.to(memory_format=fmt)
        x = torch.randn(1, 1, *spec["shape"]).contiguous(memory_format=fmt)
        with torch.inference_mode():
            model(torch.randn(1, 1, *small).contiguous(memory_format=fmt))  # warm-up: allocator, kernels
            before = _reset_peak_rss()
            model(x)
            after = _peak_rss()
        # the input, allocated before the reset, counts as forward_memory counts it
        print(json.dumps({"peak_mib": (after - before + x.numel() * 4) / MiB}))
    elif spec["what"] == "rss":  # peak RSS of predict_image (or of the imports and model alone)
        start = time.perf_counter()
        if spec.get("output"):
            predict_image(spec["model"], spec["image"], spec["output"], dtype="uint8", device="cpu")
        else:
            from unet_core.checkpoint import load_model
            load_model(spec["model"])
        # VmHWM, not ru_maxrss: ru_maxrss carries the parent's RSS over fork + exec
        print(json.dumps({"maxrss_mib": _peak_rss() / MiB, "seconds": time.perf_counter() - start}))
    else:
        raise SystemExit(f"unknown child measurement {spec['what']!r}")


def run_child(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            check=False)
    if result.returncode:
        raise SystemExit(f"subprocess {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- (a) zarr→zarr against the model alone ---------------------------------------------------------

def part_a(args, workdir: Path, model: UNet, model_path: Path, image_path: Path) -> dict:
    spatial = (args.size, args.size)
    pixels = args.planes * args.size**2
    default_tile = default_tile_shape(model, spatial, "cpu")
    default_block = default_block_shape(model, spatial, "cpu")
    variants = {"default block": (None, None)}
    if args.compare_block:
        tile = (args.compare_tile,) * 2 if args.compare_tile else None
        variants[f"block {args.compare_block}" + (f", tile {args.compare_tile}" if tile else "")] = \
            ((args.compare_block,) * 2, tile)
    plans = {name: block_plan(model, spatial, block, tile) for name, (block, tile) in variants.items()}
    print(f"\n(a) predict_image zarr→zarr vs model-only forward, {args.planes}x{args.size}x{args.size} uint16 'tyx', "
          f"UNet base {model.base_channels} depth {model.depth} 2D, torch threads {torch.get_num_threads()}; "
          f"default tile for the plane {default_tile}, default block {default_block}")
    for name, plan in plans.items():
        computed = sum(math.prod(t) * n for t, n in plan.items())
        print(f"    {name}: tiles per plane {dict((f'{t[0]}x{t[1]}', n) for t, n in plan.items())}, "
              f"computed/output px {computed / args.size**2:.2f}")
    times = {name: {"model": [], "predict": []} for name in variants}
    # Repeat 0 warms up (page cache, kernels) and is not counted. The two sides alternate their
    # order (ABBA): this machine often runs the first minute after a pause faster, and a fixed
    # order would hand that to one side.
    for repeat in range(args.repeats + 1):
        for name, (block, tile) in variants.items():
            runs = {"model": lambda: in_worker(model_only_seconds, model, plans[name], args.planes),
                    "predict": lambda: predict_image_seconds(model_path, image_path, workdir / "out.ome.zarr",
                                                             block_shape=block, tile_shape=tile)}
            order = ("model", "predict") if repeat % 2 else ("predict", "model")
            measured = {side: runs[side]() for side in order}
            if repeat == 0:
                continue
            for side in order:
                times[name][side].append(measured[side])
            print(f"    repeat {repeat} {name}: model-only {measured['model']:6.1f} s, "
                  f"predict_image {measured['predict']:6.1f} s (run first: {order[0]})", flush=True)
    ideal = math.prod(default_tile) / in_worker(forward_seconds, model, model.input_shape_for(default_tile))
    result = {"ideal_px_s": ideal, "tile": default_tile, "block": default_block}
    for name in variants:
        model_s, predict_s = min(times[name]["model"]), min(times[name]["predict"])
        pairs = sorted(m / p for m, p in zip(times[name]["model"], times[name]["predict"]))
        paired = statistics.median(pairs)
        result[name] = {"model_s": model_s, "predict_s": predict_s, "px_s": pixels / predict_s,
                        "ratio": model_s / predict_s, "paired": paired}
        print(f"    {name}: predict_image {pixels / predict_s / 1e6:.3f} Mpx/s, model-only same tiles "
              f"{pixels / model_s / 1e6:.3f} Mpx/s → ratio (a) fastest/fastest {model_s / predict_s:.3f}, "
              f"median of the paired repeats {paired:.3f} (goal >= 0.90; "
              f"per repeat {', '.join(f'{r:.3f}' for r in pairs)}); x one {default_tile[0]}x{default_tile[1]} "
              f"pass's output px/s {pixels / predict_s / ideal:.3f}")
    if len(variants) > 1:
        other = next(name for name in variants if name != "default block")
        print(f"    default block / {other}: {result['default block']['px_s'] / result[other]['px_s']:.2f}x "
              f"predict_image throughput")
    return result


# --- (b) ours vs MONAI at equal memory -----------------------------------------------------------

def _time_ours(model: UNet, images: list[np.ndarray], tile) -> float:
    start = time.perf_counter()
    for image in images:
        predict_tiled(model, image, tile_shape=tile, device="cpu")
    return time.perf_counter() - start


def _time_monai(twin: PaddedTwin, images: list[np.ndarray], roi: int) -> float:
    from monai.inferers import sliding_window_inference

    fmt = memory_format(twin.ndim)
    twin.to(memory_format=fmt)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return twin(x.contiguous(memory_format=fmt))

    start = time.perf_counter()
    with torch.inference_mode():
        for image in images:
            logits = sliding_window_inference(torch.from_numpy(image)[None], (roi,) * twin.ndim, 1, predictor,
                                              overlap=0.25, mode="gaussian")
            torch.softmax(logits, dim=1)[0].numpy()
    return time.perf_counter() - start


def measured_peak(model: UNet, kind: str, input_shape) -> float:
    """Measured peak bytes of one forward pass of ours or the twin on ``input_shape`` (input included)."""
    spec = {"what": "peak", "ndim": model.ndim, "base": model.base_channels, "depth": model.depth, "kind": kind,
            "shape": list(input_shape)}
    return run_child(spec)["peak_mib"] * MiB


def fill_measured(model: UNet, kind: str, budget: int, start: int, cache: dict) -> int:
    """Largest edge (valid output tile for ours, multiple of 2**depth for the twin) whose measured
    forward peak fits ``budget``; starts from ``start`` and scales by the measured bytes per voxel."""
    grid = 2**model.depth
    if kind == "ours":
        candidates = list(range(4, 4096, grid))  # the valid output sizes: 4 more than a multiple of 2**depth
        shape = lambda e: model.input_shape_for((e,) * model.ndim)  # noqa: E731
    else:
        candidates = list(range(grid, 4096, grid))
        shape = lambda e: (e,) * model.ndim  # noqa: E731

    def peak(edge):
        if (kind, shape(edge)) not in cache:
            cache[kind, shape(edge)] = measured_peak(model, kind, shape(edge))
        return cache[kind, shape(edge)]

    per_voxel = peak(start) / math.prod(shape(start))
    edge = max([c for c in candidates if math.prod(shape(c)) * per_voxel <= budget] or candidates[:1])
    while peak(edge) > budget and edge > candidates[0]:
        edge = candidates[candidates.index(edge) - 1]
    while candidates.index(edge) + 1 < len(candidates) and peak(candidates[candidates.index(edge) + 1]) <= budget:
        edge = candidates[candidates.index(edge) + 1]
    return edge


def interior_ratio(model: UNet, twin: PaddedTwin, tile, roi: int, monai_pass: float | None = None) -> float:
    """Output px/s of one pass of ours (the tile's px per pass) over MONAI's (step^n per pass): no border effects."""
    ours = math.prod(tile) / forward_seconds(model, model.input_shape_for(tile), repeats=3)
    monai_pass = monai_pass or forward_seconds(twin, (roi,) * model.ndim, repeats=3)
    return ours / (int(roi * 0.75) ** model.ndim / monai_pass)


def _text(tile) -> str:
    return "x".join(str(t) for t in tile)


def _compare(label: str, model: UNet, images: list[np.ndarray], budget: int, repeats: int, sweep=()) -> dict:
    """Ours (default tile, and the cubic tile that fills the budget by measurement) against MONAI with the
    roi that fills the budget by measurement (and, for reference, by the forward_memory estimate)."""
    twin = PaddedTwin(model)
    n = model.ndim
    spatial = images[0].shape[1:]
    voxels = sum(math.prod(image.shape[1:]) for image in images)
    cache: dict = {}
    tile = default_tile_shape(model, spatial, "cpu", memory_budget=budget)
    roi_est = equal_memory_roi(twin, budget)
    tile_fill = fill_measured(model, "ours", budget, max(tile), cache)
    roi = fill_measured(model, "twin", budget, roi_est, cache)
    cube_fill = (tile_fill,) * n
    rows = ((f"ours default tile {_text(tile)} (input {_text(model.input_shape_for(tile))})", "ours", twin, tile,
             model.input_shape_for(tile)),
            (f"ours tile filling the budget by measurement {_text(cube_fill)}", "ours", twin, cube_fill,
             model.input_shape_for(cube_fill)),
            (f"MONAI roi by the forward_memory estimate {roi_est}^{n}", "twin", twin, None, (roi_est,) * n),
            (f"MONAI roi filling the budget by measurement {roi}^{n}", "twin", twin, None, (roi,) * n))
    print(f"    budget {budget / MiB:.0f} MiB; forward peak in MiB: measured (x budget; forward_memory estimate, "
          f"live bytes = estimate / {MEMORY_SAFETY['cpu']}; measured / live)")
    peaks = {}
    for text, kind, _, _, shape in rows:
        if (kind, shape) not in cache:
            cache[kind, shape] = measured_peak(model, kind, shape)
        net = model if kind == "ours" else twin
        live = live_bytes(net, shape)
        peaks[text] = cache[kind, shape]
        print(f"      {text:<62} {cache[kind, shape] / MiB:6.0f} (x{cache[kind, shape] / budget:.2f}; "
              f"{forward_memory(net, shape) / MiB:5.0f}, {live / MiB:5.0f}; {cache[kind, shape] / live:.2f})")
    configs = {f"ours {_text(tile)} (default)": ("ours", tile),
               f"MONAI roi {roi}^{n} (measured fill)": ("monai", roi)}
    if roi_est != roi:
        configs[f"MONAI roi {roi_est}^{n} (estimate fill)"] = ("monai", roi_est)
    if cube_fill != tile:
        configs[f"ours {_text(cube_fill)} (measured fill)"] = ("ours", cube_fill)
    seconds: dict = {name: [] for name in configs}
    for kind, size in configs.values():  # warm-up: the first pass of a shape builds its kernels
        forward_seconds(model if kind == "ours" else twin,
                        model.input_shape_for(size) if kind == "ours" else (size,) * n, repeats=0)
    for _ in range(repeats):
        for name, (kind, size) in configs.items():
            seconds[name].append(_time_ours(model, images, size) if kind == "ours"
                                 else _time_monai(twin, images, size))
    rates = {name: voxels / min(times) for name, times in seconds.items()}
    monai_name = f"MONAI roi {roi}^{n} (measured fill)"
    monai_pass = forward_seconds(twin, (roi,) * n)
    interiors = {}
    for name, rate in rates.items():
        kind, size = configs[name]
        extra = ""
        if kind == "ours":
            interiors[name] = interior_ratio(model, twin, size, roi, monai_pass)
            extra = f", interior {interiors[name]:.3f}"
        print(f"    {label} {name:<38} {rate / 1e6:7.3f} M/s → x MONAI (measured fill) "
              f"{rate / rates[monai_name]:.3f}{extra}", flush=True)
    ours_name = f"ours {_text(tile)} (default)"
    result = {"tile": tile, "tile_fill": tile_fill, "roi": roi, "roi_est": roi_est, "rates": rates,
              "ratio": rates[ours_name] / rates[monai_name], "interior": interiors[ours_name],
              "peaks_mib": {text: value / MiB for text, value in peaks.items()}}
    if roi_est != roi:
        result["ratio_estimate_fill"] = rates[ours_name] / rates[f"MONAI roi {roi_est}^{n} (estimate fill)"]
    print(f"    ratio (b) {label}: ours default / MONAI at equal measured memory = {result['ratio']:.3f}"
          + (" (goal >= 1.0)" if n == 2 else "")
          + (f"; / MONAI at equal estimated memory = {result['ratio_estimate_fill']:.3f}" if roi_est != roi else ""))
    if sweep:
        margin = model.margin()
        table = [(tile, result["ratio"], interiors[ours_name])]
        for edge in sorted(set(sweep) | {tile_fill}):
            cube = (edge,) * n
            if math.prod(cube) <= math.prod(tile):
                continue
            r = voxels / min(_time_ours(model, images, cube) for _ in range(repeats)) / rates[monai_name]
            inner = interior_ratio(model, twin, cube, roi, monai_pass)
            table.append((cube, r, inner))
            estimate = forward_memory(model, model.input_shape_for(cube))
            print(f"    ours tile {_text(cube)} (input {model.input_shape_for(cube)[0]}^{n}, estimate "
                  f"{estimate / MiB:.0f} MiB = {estimate / budget:.1f}x budget): x MONAI {r:.3f}, "
                  f"interior {inner:.3f}", flush=True)
        result["sweep"] = table
        for column, name in ((1, "on this volume"), (2, "interior")):
            reached = next((row[0] for row in table if row[column] >= 1.0), None)
            if reached:
                print(f"    ours reaches 1.0x MONAI {name} at tile {_text(reached)}")
                result[f"reached_{column}"] = reached
                continue
            if column == 1:  # tile counts on a small volume jump with the tile: no trend to extrapolate
                best = max(table, key=lambda row: row[1])
                print(f"    ours does not reach 1.0x MONAI {name} up to tile {_text(table[-1][0])} "
                      f"(best {best[1]:.3f} at {_text(best[0])})")
                continue
            # extrapolate: ratio ~ c * prod(tile / (tile + 2 margin)), c the median over the table
            c = float(np.median([row[column] / math.prod(t / (t + 2 * margin) for t in row[0]) for row in table]))
            q = (1 / c) ** (1 / n)
            if q < 1:
                edge = 2 * margin * q / (1 - q)
                valid = valid_sizes(model.depth, kind="output", near=int(edge), count=1)[-1]
                print(f"    ours does not reach 1.0x MONAI {name} up to tile {_text(table[-1][0])}; extrapolated "
                      f"(ratio = {c:.2f} x (tile/(tile+{2 * margin}))^{n}): about {valid}^{n} (input "
                      f"{model.input_shape_for((valid,) * n)[0]}^{n}, estimate "
                      f"{forward_memory(model, model.input_shape_for((valid,) * n)) / 2**30:.1f} GiB)")
                result[f"extrapolated_{column}"] = valid
            else:
                print(f"    ours does not reach 1.0x MONAI {name} up to tile {_text(table[-1][0])}, nor in the "
                      f"limit (ratio -> {c:.2f})")
    return result


def part_b(args, model2d: UNet, image_path: Path) -> dict:
    image = io.open_image(image_path)
    mean, std = normalize.intensity_statistics(image)
    planes = [((np.asarray(image.array[t], np.float32) - mean[0]) / std[0])[None] for t in range(args.b_planes)]
    print("\n(b) in-memory throughput at equal forward memory: predict_tiled vs MONAI sliding_window_inference "
          "(overlap 0.25, gaussian) with a padded twin of the same U-Net")
    print(f"  2D: {args.b_planes} planes {args.size}x{args.size} of the (a) volume, base {model2d.base_channels} "
          f"depth {model2d.depth}")
    result = {"2d": _compare("2D", model2d, planes, CPU_MEMORY_BUDGET[2], args.repeats)}
    del planes
    model3d = make_model(3, args.base_3d, args.depth_3d)
    volume = volume_3d(tuple(args.shape_3d))
    budget = args.budget_3d * MiB if args.budget_3d else CPU_MEMORY_BUDGET[3]
    print(f"  3D: synthetic volume {tuple(args.shape_3d)}, base {model3d.base_channels} depth {model3d.depth}")
    result["3d"] = _compare("3D", model3d, [volume], budget, max(1, args.repeats - 1), sweep=args.sweep_3d)
    return result


# --- (c) peak RSS against volume size ---------------------------------------------------------------

def part_c(args, workdir: Path) -> dict:
    tiny = make_model(2, 2, 2)
    model_path = save_model(tiny, workdir / "tiny.pt")
    plane_bytes = args.size**2 * 2
    small = max(1, round(args.rss_small_gb * 2**30 / plane_bytes))
    big = max(1, round(args.rss_gb * 2**30 / plane_bytes))
    free = shutil.disk_usage(workdir).free
    need = 3 * big * plane_bytes  # input (compresses to ~0.7x) + uint8 probabilities (2 classes)
    if free < need:
        raise SystemExit(f"(c) needs about {need / 2**30:.1f} GiB free under {workdir}, only {free / 2**30:.1f} GiB; "
                         f"pass a smaller --rss-gb or another --tmp")
    print("\n(c) peak RSS of predict_image (tiny UNet base 2 depth 2, dtype uint8), each in its own subprocess")
    floor = run_child({"what": "rss", "model": str(model_path)})
    print(f"    imports + model only: {floor['maxrss_mib']:.0f} MiB")
    result = {"floor_mib": floor["maxrss_mib"]}
    for name, planes in (("small", small), ("big", big)):
        path = workdir / f"rss_{name}.ome.zarr"
        start = time.perf_counter()
        write_volume(path, planes, args.size, seed=2)
        written = time.perf_counter() - start
        try:
            record = run_child({"what": "rss", "model": str(model_path), "image": str(path),
                                "output": str(workdir / f"rss_{name}_out.ome.zarr")})
        finally:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(workdir / f"rss_{name}_out.ome.zarr", ignore_errors=True)
        gib = planes * plane_bytes / 2**30
        result[name] = {"gib": gib, **record}
        print(f"    {gib:5.2f} GiB ({planes}x{args.size}x{args.size} uint16, written in {written:.0f} s): "
              f"peak RSS {record['maxrss_mib']:.0f} MiB, predict_image {record['seconds']:.0f} s "
              f"({planes * args.size**2 / record['seconds'] / 1e6:.1f} Mpx/s)", flush=True)
    ratio = result["big"]["maxrss_mib"] / result["small"]["maxrss_mib"]
    above = ((result["big"]["maxrss_mib"] - floor["maxrss_mib"])
             / max(result["small"]["maxrss_mib"] - floor["maxrss_mib"], 1))
    print(f"    ratio (c) peak RSS {result['big']['gib']:.2f} GiB / {result['small']['gib']:.2f} GiB: {ratio:.3f} "
          f"(goal <= 1.2); above the imports+model floor: {above:.3f}")
    result["ratio"] = ratio
    return result


# --- main ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every part in minutes")
    parser.add_argument("--parts", default="a,b,c", help="comma-separated subset of a, b, c")
    parser.add_argument("--planes", type=int, default=4, help="(a) volume planes (t)")
    parser.add_argument("--size", type=int, default=2048, help="plane edge of the (a) and (c) volumes")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest is kept")
    parser.add_argument("--compare-block", type=int, default=512,
                        help="(a) also run this block edge (a multiple of 16; 0: skip); 512 was the default "
                             "before the block was matched to the tile")
    parser.add_argument("--compare-tile", type=int, default=468,
                        help="(a) output tile edge of the --compare-block run (0: the default tile per block); "
                             "468 was the default before")
    parser.add_argument("--b-planes", type=int, default=2, help="(b) 2D: planes of the (a) volume")
    parser.add_argument("--shape-3d", type=int, nargs=3, default=[144, 192, 192])
    parser.add_argument("--base-3d", type=int, default=16)
    parser.add_argument("--depth-3d", type=int, default=3)
    parser.add_argument("--budget-3d", type=int, default=0, help="MiB; 0: CPU_MEMORY_BUDGET[3]")
    parser.add_argument("--sweep-3d", type=int, nargs="*", default=[76, 92, 108, 124],
                        help="larger output tile edges for ours in 3D")
    parser.add_argument("--rss-gb", type=float, default=4.0, help="(c) big volume, GiB of uint16")
    parser.add_argument("--rss-small-gb", type=float, default=0.5, help="(c) small volume, GiB of uint16")
    parser.add_argument("--tmp", default="/tmp", help="folder for the temporary volumes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    if args.quick:
        args.planes, args.size, args.repeats, args.b_planes = 2, 1024, 1, 1
        args.shape_3d, args.sweep_3d = [96, 96, 96], [60]
        args.rss_gb, args.rss_small_gb = 0.125, 0.0156
    parts = set(args.parts.split(","))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"free under {args.tmp}: {shutil.disk_usage(args.tmp).free / 2**30:.0f} GiB")
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench_predict_") as tmp:
        workdir = Path(tmp)
        model = make_model(2, 16, 4)
        if parts & {"a", "b"}:
            model_path = save_model(model, workdir / "unet16.pt")
            image_path = write_volume(workdir / "volume.ome.zarr", args.planes, args.size)
        if "a" in parts:
            part_a(args, workdir, model, model_path, image_path)
        if "b" in parts:
            part_b(args, model, image_path)
        if "c" in parts:
            part_c(args, workdir)


if __name__ == "__main__":
    main()
