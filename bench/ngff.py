"""Benchmark: NGFF 0.5 with shards against NGFF 0.4, measured in the same run.

A 4096 x 4096 x 64 uint16 volume (2 GiB; smooth blobs plus noise, so it compresses as
fluorescence does) is written as a BigTIFF, then goes through ingest (with pyramid), predict
(a stand-in 2D U-Net, 4 features, depth 2, random weights, plane by plane: the model's cost is
not what is compared) and segment (components), once per format, in that order. Printed per
stage and format: files written, wall time, throughput (input voxels / s) and the ratios
0.5 / 0.4; then whether every output array (image levels, probabilities, labels) is identical
between the two routes.

Usage: python bench/ngff.py [--shape 64 4096 4096] [--chunks 8 256 256] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = ("ngff-0.4", "ngff-0.5")
STAGES = ("ingest", "predict", "segment")


def _volume(path: Path, shape, seed: int = 0) -> None:
    """A BigTIFF written plane by plane: a few blob planes, shifted and noised per z."""
    import tifffile
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    z, y, x = shape
    base = ndimage.gaussian_filter(rng.random((y // 8, x // 8)).astype(np.float32), 2)
    base = ndimage.zoom((base - base.min()) / (base.max() - base.min()), 8, order=1)[:y, :x]
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k in range(z):
            plane = 200 + 3000 * np.roll(base, 7 * k, axis=1) + rng.normal(0, 30, (y, x))
            tif.write(plane.clip(0, 65535).astype(np.uint16), photometric="minisblack", contiguous=True,
                      metadata={"axes": "ZYX", "shape": shape} if k == 0 else None)


def _files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def _same(a, b, step: int = 8) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return all(np.array_equal(a[i:i + step], b[i:i + step]) for i in range(0, a.shape[0], step))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 4096, 4096), help="z y x of the volume")
    parser.add_argument("--chunks", type=int, nargs=3, default=(8, 256, 256), help="ingest chunks (z y x)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    import torch
    import zarr

    from unet_core import io
    from unet_core.ingest import ingest
    from unet_core.model import UNet
    from unet_core.predict import predict_image
    from unet_core.segment import segment_image

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-ngff-"))
    work.mkdir(parents=True, exist_ok=True)
    voxels = int(np.prod(args.shape))
    try:
        began = time.perf_counter()
        _volume(work / "volume.tif", tuple(args.shape))
        print(f"volume {tuple(args.shape)} uint16 ({voxels * 2 / 2**30:.2f} GiB), chunks {tuple(args.chunks)}, "
              f"written in {time.perf_counter() - began:.0f} s")
        torch.manual_seed(0)
        model = UNet(base_channels=4, depth=2, dropout=0.0)
        torch.save({"model": model.state_dict(), "architecture": model.config()}, work / "model.pt")
        seconds, files, outputs = {}, {}, {}
        for fmt in FORMATS:
            base = work / fmt
            paths = {"ingest": base / "volume.ome.zarr", "predict": base / "probabilities.ome.zarr",
                     "segment": base / "labels.ome.zarr"}
            runs = {
                "ingest": lambda: ingest(work / "volume.tif", paths["ingest"], chunks=args.chunks, format=fmt),
                "predict": lambda: predict_image(work / "model.pt", paths["ingest"], paths["predict"], device="cpu",
                                                 planewise=True),
                "segment": lambda: segment_image(paths["predict"], paths["segment"], min_size=0),
            }
            for stage in STAGES:
                began = time.perf_counter()
                runs[stage]()
                seconds[fmt, stage] = time.perf_counter() - began
                files[fmt, stage] = _files(paths[stage])
                print(f"  {fmt} {stage:8s} {seconds[fmt, stage]:8.1f} s  {files[fmt, stage]:7d} files", flush=True)
            outputs[fmt] = paths

        print("\nstage     files 0.4  files 0.5  ratio   MVox/s 0.4  MVox/s 0.5  ratio (0.5 / 0.4)")
        for stage in STAGES:
            rates = [voxels / seconds[f, stage] / 1e6 for f in FORMATS]
            print(f"{stage:8s} {files[FORMATS[0], stage]:10d} {files[FORMATS[1], stage]:10d} "
                  f"{files[FORMATS[1], stage] / files[FORMATS[0], stage]:6.3f} {rates[0]:12.2f} {rates[1]:11.2f} "
                  f"{rates[1] / rates[0]:6.3f}")
        total = [sum(files[f, s] for s in STAGES) for f in FORMATS]
        print(f"{'all':8s} {total[0]:10d} {total[1]:10d} {total[1] / total[0]:6.3f}")

        same = {}
        a, b = (zarr.open_group(outputs[f]["ingest"], mode="r") for f in FORMATS)
        for level in sorted(k for k in a.array_keys()):
            same[f"image level {level}"] = _same(a[level], b[level])
        for stage in ("predict", "segment"):
            x, y = (io.open_image(outputs[f][stage]).array for f in FORMATS)
            same[stage] = _same(x, y)
        print("\nidentical between the routes: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()))
        if not all(same.values()):
            sys.exit(1)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
