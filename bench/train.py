"""Benchmark: does augmentation starve the model? Training step time with the full pipeline
(random mirrored tiles, elastic deformation + rotation, flips, gray values) against the step
time on pre-augmented tiles held in memory, same model, same tile, same run. Prints the ratio
(goal <= 1.10) and steps/s for the ISBI cpu-preset model, the CPU demo model and the paper model.

--workers 0 (the default, as in training on a CPU) augments each batch in the training thread
(one batched resampling per array on torch's threads); --workers N uses N data-loader
processes (as on a GPU node). Both sides are timed alike (mean wall time per step, fetching
included), in alternating order; the bench prints the ratio of the fastest repeats and the
median of the per-repeat ratios.

Usage: python bench/train.py [--steps 30] [--repeats 6] [--workers 0] [--paper-steps 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unet_core import ingest, weighted_cross_entropy
from unet_core.demo import write_demo_data
from unet_core.model import UNet
from unet_core.train import TileDataset, TrainSettings, load_training_stack


def _train_step(model, optimizer, batch, memory_format):
    image, target, weight = batch
    loss = weighted_cross_entropy(model(image.contiguous(memory_format=memory_format)), target, weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _seconds_per_step(model, optimizer, batches, steps, memory_format):
    """Mean wall time per step over ``steps`` steps after two warm-up steps, fetching included."""
    batches = iter(batches)
    for _ in range(2):  # warm-up; a data loader's first batch also starts its workers
        _train_step(model, optimizer, next(batches), memory_format)
    start = time.perf_counter()
    for _ in range(steps):
        _train_step(model, optimizer, next(batches), memory_format)
    return (time.perf_counter() - start) / steps


def measure(name, settings, stacks, steps, workers, repeats):
    torch.manual_seed(0)
    model = UNet(in_channels=1, base_channels=settings.base_channels, depth=settings.depth,
                 dropout=settings.dropout).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    dataset = TileDataset(stacks, model, settings)
    held = [dataset[i] for i in range(4)]  # pre-augmented tiles in memory
    runs = {"in-memory": lambda: itertools.cycle(held),
            "pipeline": lambda: torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                            prefetch_factor=4 if workers else None)}
    times = {side: [] for side in runs}
    for repeat in range(repeats):
        # Both sides measured alike (mean wall time per step), one after the other, the order
        # alternating (ABBA) so that neither always runs in the machine's faster moments.
        for side in (("in-memory", "pipeline") if repeat % 2 == 0 else ("pipeline", "in-memory")):
            times[side].append(_seconds_per_step(model, optimizer, runs[side](), steps, torch.channels_last))
    a, b = min(times["in-memory"]), min(times["pipeline"])
    pairs = sorted(p / m for m, p in zip(times["in-memory"], times["pipeline"]))
    paired = statistics.median(pairs)
    print(f"{name:<28} tile {settings.tile}x{settings.tile} batch {settings.batch_size}: "
          f"in-memory {a * 1e3:8.1f} ms/step ({1 / a:5.2f} steps/s), full pipeline {b * 1e3:8.1f} ms/step "
          f"({1 / b:5.2f} steps/s); ratio fastest/fastest {b / a:.3f}, median of the paired repeats {paired:.3f} "
          f"(per repeat {', '.join(f'{r:.3f}' for r in pairs)})")
    return b / a, paired


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=0,
                        help="data-loader worker processes (0: in the training thread)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--paper-steps", type=int, default=2, help="steps for the 31M-parameter paper model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo_data(tmp / "demo")
        stacks = []
        for name in ("timelapse_a", "timelapse_b", "timelapse_d"):
            zarr_path = ingest.ingest(tmp / "demo" / f"{name}.tif", tmp / f"{name}.ome.zarr",
                                  labels_path=tmp / "demo" / f"{name}_labels.tif")
            stacks.append(load_training_stack(zarr_path, None, 2))
        preset = TrainSettings(base_channels=16, depth=4, tile=164, batch_size=4, steps=10_000)
        ratios = measure("ISBI cpu preset (16, depth 4)", preset, stacks, max(args.steps // 3, 6), args.workers,
                         args.repeats)
        print(f"cpu preset: full pipeline / in-memory step time: {ratios[0]:.3f} fastest/fastest, {ratios[1]:.3f} "
              f"median of pairs (goal <= 1.10), {args.workers} worker(s), torch threads {torch.get_num_threads()}")
        demo = TrainSettings(steps=10_000)
        ratios = measure("CPU demo model (16, depth 3)", demo, stacks, args.steps, args.workers, args.repeats)
        print(f"demo model: full pipeline / in-memory step time: {ratios[0]:.3f} fastest/fastest, {ratios[1]:.3f} "
              f"median of pairs (goal <= 1.10)")
        if args.paper_steps:
            paper = TrainSettings(base_channels=64, depth=4, tile=388, batch_size=1, dropout=0.5, steps=10_000)
            measure("paper model (64, depth 4)", paper, stacks, args.paper_steps, args.workers, 1)


if __name__ == "__main__":
    main()
