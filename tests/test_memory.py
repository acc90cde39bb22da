"""Memory of a forward pass and the default tile: estimate against measured peaks, budget, errors."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unet_core import UNet
from unet_core.cost import (CPU_MEMORY_BUDGET, MEMORY_SAFETY, architecture, default_batch_size, default_block_shape,
                            default_tile_shape, forward_memory, walk)
from unet_core.tiling import tile_origins

MiB = 2**20

# Runs in a fresh process: the peak of one inference pass through overlap_tile.forward_probabilities, after a
# warm-up pass of the same shape, as the growth of VmHWM (reset with clear_refs) plus the input
# batch allocated before the reset. A fixed mmap threshold makes glibc return every freed feature
# map to the kernel, so the RSS follows the tensors alive (the default dynamic threshold keeps
# freed maps in the heap; that is what forward_memory's safety factor is for).
_CHILD = """
import json, sys
import numpy as np, torch
from unet_core import UNet
from unet_core.overlap_tile import forward_probabilities, memory_format

def peak_rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

spec = json.loads(sys.argv[1])
torch.manual_seed(0)
model = UNet(in_channels=spec["channels"], base_channels=spec["base"], depth=spec["depth"], ndim=spec["ndim"],
             batch_norm=spec["batch_norm"]).eval().to(memory_format=memory_format(spec["ndim"]))
x = torch.from_numpy(np.random.default_rng(0).standard_normal(
    (spec["batch"], spec["channels"], *spec["shape"])).astype(np.float32))
with torch.inference_mode():
    forward_probabilities(model, x, False)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = peak_rss()
    forward_probabilities(model, x, False)
    print(json.dumps({"peak": peak_rss() - before + x.numel() * 4}))
"""


def _measured_peak(ndim, shape, *, base=16, depth=3, channels=1, batch=1, batch_norm=False):
    spec = {"ndim": ndim, "shape": list(shape), "base": base, "depth": depth, "channels": channels, "batch": batch,
            "batch_norm": batch_norm}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, env=env,
                            check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["peak"]


def _clear_refs_works():
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return Path("/proc/self/status").read_text().count("VmHWM") == 1
    except OSError:
        return False


needs_vmhwm = pytest.mark.skipif(not _clear_refs_works(), reason="needs Linux /proc/self/clear_refs and VmHWM")


@needs_vmhwm
@pytest.mark.parametrize("ndim,shape,options", [
    (2, (652, 652), {"depth": 4}),                                   # peak at the end of the expanding path
    (2, (348, 476), {"depth": 4, "channels": 3, "batch": 2}),         # channels_last copy of the input, batch
    (2, (348, 348), {"depth": 4, "batch_norm": True}),
    (3, (132, 132, 132), {}),                                         # first convolution without oneDNN (im2col)
    (3, (140, 140, 140), {}),
    (3, (148, 148, 148), {}),                                         # ... and with it: less memory than 140^3
    (3, (100, 92, 116), {"base": 8, "channels": 2}),
    (3, (44, 44, 44), {"base": 4, "depth": 2}),                       # every convolution of level 0 without oneDNN
])
def test_forward_memory_equals_measured_peak(ndim, shape, options):
    """The walk (forward_memory without its safety factor) equals the measured peak within 2 %."""
    torch.manual_seed(0)
    model = UNet(in_channels=options.get("channels", 1), base_channels=options.get("base", 16),
                 depth=options.get("depth", 3), ndim=ndim, batch_norm=options.get("batch_norm", False))
    batch = options.get("batch", 1)
    measured = _measured_peak(ndim, shape, base=model.base_channels, depth=model.depth, channels=model.in_channels,
                              batch=batch, batch_norm=model.batch_norm)
    estimate = forward_memory(model, shape, batch)
    assert measured > 20 * MiB  # large enough for the allocator's small change not to matter
    assert estimate / MEMORY_SAFETY["cpu"] == pytest.approx(measured, rel=0.02)
    assert estimate >= measured


def test_forward_memory_non_onednn_step_is_real():
    """On the CPU the estimate drops where the first convolution moves onto oneDNN (measured: 474 MiB
    at 140^3, 372 MiB at 148^3); apart from that step it grows with the input along every axis."""
    model = UNet(base_channels=16, depth=3, ndim=3)
    assert forward_memory(model, (148,) * 3) < forward_memory(model, (140,) * 3)
    for axis in range(3):
        sizes = [tuple(s if k == axis else 188 for k in range(3)) for s in range(148, 300, 8)]
        estimates = [forward_memory(model, s) for s in sizes]
        assert estimates == sorted(estimates) and len(set(estimates)) == len(estimates)


@pytest.mark.parametrize("ndim,depth", [(2, 4), (3, 3)])
@pytest.mark.parametrize("device", ["cpu", "cuda"])  # the CUDA rule is arithmetic only: no GPU needed
def test_forward_memory_monotonic_in_input_size(ndim, depth, device):
    model = UNet(base_channels=8, depth=depth, ndim=ndim)
    grid = 2**depth
    start = model.input_shape_for((4 + 8 * grid,) * ndim)  # every convolution on oneDNN from here on
    previous = forward_memory(model, start, device=device)
    for axis, step in itertools.product(range(ndim), range(1, 6)):
        shape = tuple(s + step * grid if k == axis else s for k, s in enumerate(start))
        current = forward_memory(model, shape, device=device)
        assert current > forward_memory(model, tuple(s + (step - 1) * grid if k == axis else s
                                                       for k, s in enumerate(start)), device=device)
        assert current > previous
    assert forward_memory(model, start, 2, device=device) > forward_memory(model, start, 1, device=device)
    assert forward_memory(model, start, device=device, dtype=torch.float16) < previous


def test_forward_memory_bad_input():
    model = UNet(base_channels=4, depth=2)
    with pytest.raises(ValueError, match="2 positive lengths"):
        forward_memory(model, (100, 100, 100))
    with pytest.raises(ValueError, match="batch_size"):
        forward_memory(model, (100, 100), 0)
    with pytest.raises(ValueError, match="too small"):
        forward_memory(model, (20, 20))


@pytest.mark.parametrize("ndim,depth,budget", [(2, 4, None), (2, 4, 64 * MiB), (3, 3, None), (3, 3, 300 * MiB)])
def test_default_tile_fills_the_budget(ndim, depth, budget):
    """On a large image the chosen tile fits the budget and one more valid step on any axis does not."""
    model = UNet(base_channels=16, depth=depth, ndim=ndim)
    limit = budget or CPU_MEMORY_BUDGET[ndim]
    tile = default_tile_shape(model, (10**5,) * ndim if ndim == 2 else (10**4,) * ndim, "cpu", memory_budget=budget)
    assert forward_memory(model, model.input_shape_for(tile)) <= limit
    for axis in range(ndim):
        larger = tuple(t + 2**depth if k == axis else t for k, t in enumerate(tile))
        assert forward_memory(model, model.input_shape_for(larger)) > limit


@pytest.mark.parametrize("ndim,spatial,fraction", [(2, (150, 230), 0.3), (2, (61, 77), 0.5), (3, (30, 70, 45), 0.6)])
def test_default_tile_needs_least_computation_among_fitting_tiles(ndim, spatial, fraction):
    """Brute force over every valid tile up to one that covers the image, with a budget of a
    fraction of that covering tile's memory."""
    model = UNet(base_channels=4, depth=2, ndim=ndim)
    arch, grid = architecture(model), 4

    def work(tile):
        return len(tile_origins(spatial, tile, grid)) * walk(arch, model.input_shape_for(tile), 1, True)[1]

    lengths = [[t for t in range(4, s + grid + 1, grid) if t >= grid or t >= s] for s in spatial]
    budget = int(fraction * forward_memory(model, model.input_shape_for(tuple(axis[-1] for axis in lengths))))
    fitting = [tile for tile in itertools.product(*lengths)
               if forward_memory(model, model.input_shape_for(tile)) <= budget]
    chosen = default_tile_shape(model, spatial, "cpu", memory_budget=budget)
    assert chosen in fitting
    assert work(chosen) == min(work(tile) for tile in fitting)
    assert len(fitting) < math.prod(len(axis) for axis in lengths)  # the budget did constrain the choice


def test_default_tile_small_image_is_covered_by_one_tile():
    model = UNet(base_channels=4, depth=2)
    assert default_tile_shape(model, (33, 9), "cpu") == (36, 12)


def test_default_tile_raises_when_nothing_fits():
    model = UNet(base_channels=16, depth=4, ndim=3)
    smallest = forward_memory(model, model.input_shape_for((20, 20, 20)))
    with pytest.raises(ValueError, match=r"budget of 1024 MiB \(CPU_MEMORY_BUDGET\[3\]\).*\(20, 20, 20\) "
                                         rf"\(input \(204, 204, 204\)\), needs about {smallest / MiB:.0f} MiB"
                                         r".*raise the budget.*tile_shape"):
        default_tile_shape(model, (500, 500, 500), "cpu")
    with pytest.raises(ValueError, match=r"budget of 10 MiB \(memory_budget\).*batch 2"):
        default_tile_shape(UNet(base_channels=16, depth=4), (2048, 2048), "cpu", memory_budget=10 * MiB, batch_size=2)


def test_default_tile_scales_with_batch_size():
    model = UNet(base_channels=16, depth=4)
    one = default_tile_shape(model, (10**4, 10**4), "cpu")
    four = default_tile_shape(model, (10**4, 10**4), "cpu", batch_size=4)
    assert math.prod(four) < math.prod(one)
    assert forward_memory(model, model.input_shape_for(four), 4) <= CPU_MEMORY_BUDGET[2]


@pytest.mark.parametrize("ndim,tile", [(2, (92, 124)), (3, (28, 28, 36))])
def test_default_batch_fills_the_budget_on_cuda_and_is_one_on_a_cpu(ndim, tile):
    """The largest batch whose pass fits the budget (CUDA's estimate), capped by the region's tiles."""
    model = UNet(base_channels=16, depth=3, ndim=ndim)
    shape = model.input_shape_for(tile)
    one = forward_memory(model, shape, 1, device="cuda")
    for budget in (one // 2, one, int(3.5 * one), 40 * one):
        batch = default_batch_size(model, tile, 12, "cuda", memory_budget=budget)
        assert 1 <= batch <= 12
        if batch > 1:
            assert forward_memory(model, shape, batch, device="cuda") <= budget
        if batch < 12 and budget >= one:
            assert forward_memory(model, shape, batch + 1, device="cuda") > budget
    assert default_batch_size(model, tile, 12, "cuda", memory_budget=40 * one) == 12
    assert default_batch_size(model, tile, 12, "cuda", memory_budget=int(3.5 * one)) in (2, 3)
    assert default_batch_size(model, tile, 12, "cpu", memory_budget=40 * one) == 1
    with pytest.raises(ValueError, match="tiles must be >= 1"):
        default_batch_size(model, tile, 0, "cuda")


@pytest.mark.parametrize("ndim,depth,spatial", [(2, 4, (2048, 2048)), (2, 4, (1000, 1300)), (2, 3, (300, 70)),
                                                (3, 3, (144, 192, 192)), (3, 3, (512, 2048, 2048)),
                                                (3, 2, (13, 29, 22))])
def test_default_block_is_a_multiple_of_the_tile_step(ndim, depth, spatial):
    """Two tile steps per axis, capped by the image; blocks are covered by tiles with (almost) no waste."""
    model = UNet(base_channels=16, depth=depth, ndim=ndim)
    grid = 2**depth
    tile = default_tile_shape(model, spatial, "cpu")
    block = default_block_shape(model, spatial, "cpu")
    for b, t, s in zip(block, tile, spatial):
        step = max(t // grid * grid, grid)
        assert b % grid == 0
        assert b == 2 * step or b == -(-s // grid) * grid < 2 * step
    computed = 0
    for origin in itertools.product(*(range(0, s, b) for s, b in zip(spatial, block))):
        size = tuple(min(b, s - o) for b, s, o in zip(block, spatial, origin))
        inner = default_tile_shape(model, size, "cpu")
        computed += len(tile_origins(size, inner, grid)) * math.prod(inner)
    whole = len(tile_origins(spatial, tile, grid)) * math.prod(tile)  # tiling the image in memory
    assert computed <= 1.05 * whole  # the old 512-px blocks with 468-px tiles computed 3.34x the output


def test_cuda_tiles_keep_every_feature_map_within_32_bit_indexing():
    """On a GPU of 140 GiB the budget alone would give the 3D tile of a 32-feature, depth-4 U-Net a
    first convolution of 3.1e9 elements, past which torch leaves cuDNN for a slow path: the tile
    is capped, then the cap binds, not the budget. The walk counts the map by hand."""
    from unet_core.cost import CUDA_MAX_MAP_ELEMENTS

    model = UNet(base_channels=32, depth=4, ndim=3)
    budget = int(140 * 2**30 * 0.25)
    tile = default_tile_shape(model, (1000, 2048, 2048), "cuda", memory_budget=budget)
    arch, shape = architecture(model), model.input_shape_for(tile)
    assert walk(arch, shape, 1, False)[2] == 32 * math.prod(s - 2 for s in shape)  # the first convolution
    assert walk(arch, shape, 1, False)[2] <= CUDA_MAX_MAP_ELEMENTS
    assert forward_memory(model, shape, 1, device="cuda") < 0.8 * budget  # the cap binds, not the budget
    assert default_tile_shape(model, (1000, 2048, 2048), "cpu", memory_budget=budget) != tile  # no cap on a CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ndim,shape", [(2, (652, 652)), (3, (148, 148, 148))])
def test_forward_memory_on_cuda(ndim, shape):
    """Against torch.cuda.max_memory_allocated of a trial pass: the estimate covers it, and the walk
    (no safety factor) is within 10 % of it (cuDNN workspaces come on top of the tensors)."""
    from unet_core.overlap_tile import forward_probabilities, memory_format

    torch.manual_seed(0)
    model = UNet(base_channels=16, depth=4 if ndim == 2 else 3, ndim=ndim).eval()
    model.to("cuda", memory_format=memory_format(ndim))
    x = torch.randn(1, 1, *shape, device="cuda")
    with torch.inference_mode():
        forward_probabilities(model, x, False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward_probabilities(model, x, False)
        torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before + x.numel() * 4
    estimate = forward_memory(model, shape, device="cuda")
    assert measured <= estimate
    assert estimate / MEMORY_SAFETY["cuda"] == pytest.approx(measured, rel=0.10)
