"""Benchmark: which optimiser trains the U-Net better here, in the same number of steps?

The paper's recipe (SGD, momentum 0.99, constant learning rate) against Adam with a one-cycle
schedule (the config's default) and SGD 0.99 with the same one-cycle schedule, on the demo's
training stacks, held-out foreground IoU and loss after the same steps, same seed, same run.
The training data, augmentation and model are identical; only the optimiser differs.

Usage: python bench/optimizer.py [--steps 300] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from unet_core import ingest
from unet_core.demo import write_demo_data
from unet_core.train import TrainSettings, train

RECIPES = {
    "adam, one-cycle (default)": dict(optimizer="adam", schedule="onecycle", learning_rate=1e-3),
    "sgd 0.99, constant (paper)": dict(optimizer="sgd", momentum=0.99, schedule="constant", learning_rate=1e-2),
    "sgd 0.99, one-cycle": dict(optimizer="sgd", momentum=0.99, schedule="onecycle", learning_rate=1e-2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo_data(tmp / "demo")

        def ingested(name):
            return str(ingest.ingest(tmp / "demo" / f"{name}.tif", tmp / f"{name}.ome.zarr",
                                     labels_path=tmp / "demo" / f"{name}_labels.tif"))

        images = [ingested("timelapse_a"), ingested("timelapse_b")]
        val = [ingested("timelapse_c")]
        base = TrainSettings(steps=args.steps, validate_every=args.steps, log_every=args.steps)
        print(f"demo model (16 base channels, depth 3), {args.steps} steps, batch 4 of 92^2 tiles, "
              f"seeds {seeds}; validation on timelapse_c")
        print(f"{'recipe':<28} {'val IoU':>18} {'val loss':>18} {'s/run':>7}")
        for name, recipe in RECIPES.items():
            ious, losses, seconds = [], [], []
            for seed in seeds:
                out = tmp / f"{name.split(',')[0]}-{len(ious)}-{seed}".replace(" ", "_")
                start = time.perf_counter()
                train(train_images=images, val_images=val, out_dir=out,
                      settings=replace(base, seed=seed, **recipe))
                seconds.append(time.perf_counter() - start)
                with open(out / "training_log.tsv") as handle:
                    last = list(csv.DictReader(handle, delimiter="\t"))[-1]
                ious.append(float(last["val_iou"]))
                losses.append(float(last["val_loss"]))
            print(f"{name:<28} {' '.join(f'{v:.3f}' for v in ious):>18} "
                  f"{' '.join(f'{v:.3f}' for v in losses):>18} {sum(seconds) / len(seconds):7.0f}")


if __name__ == "__main__":
    main()
