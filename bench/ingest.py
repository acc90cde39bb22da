"""Benchmark: streamed ingest against the naive in-memory route, measured in the same run.

Generates a BigTIFF of uint16 pages (smooth blobs plus noise, so that blosc-zstd compresses it
about as well as real fluorescence data) in a temporary folder, then times each route in its
own subprocess, which reports its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` at exit):

- ``read``: a plain sequential read of the file (8 MiB reads), the I/O ceiling;
- ``naive``: ``tifffile.imread`` of the whole file, then one zarr write with the same codec,
  chunks and array settings as ingest;
- ``naive+pyramid``: the same, plus the pyramid levels computed in memory and written;
- ``ingest``: ``unet_core.ingest.ingest(..., pyramid=False)`` (validates and hashes the input too);
- ``ingest+pyramid``: ``unet_core.ingest.ingest(...)`` with the default pyramid;
- ``dask``: the previous implementation (dask array on tifffile's zarr store, rechunked to the
  output chunks, ``da.store``), for reference;
- ``imports``: python with the same imports only (the RSS floor of every route).

Throughput is input bytes / wall time. Ratios are against the naive route of the same run
(and ``ingest+pyramid`` also against ``naive+pyramid``), and against the plain read. The page
cache is warm (the file was just written; 24 GB RAM) unless ``--cold`` asks to drop the file
from it before each route. The file and all outputs are deleted at the end.

Usage: python bench/ingest.py [--size-gb 4] [--small-gb 0.5] [--page 2048] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUTES = ["read", "naive", "ingest", "naive+pyramid", "ingest+pyramid", "dask", "imports"]


# --- data ----------------------------------------------------------------------------------

def _bases(size: int, count: int, rng):
    import numpy as np

    axis = np.arange(size, dtype=np.float32)
    bases = []
    for _ in range(count):
        image = np.full((size, size), 100.0, np.float32)
        for _ in range(80):
            cy, cx = rng.uniform(0, size, 2)
            radius = rng.uniform(8, 48)
            window = slice(max(0, int(cy - 4 * radius)), int(cy + 4 * radius)), slice(max(0, int(cx - 4 * radius)),
                                                                                     int(cx + 4 * radius))
            gy = np.exp(-((axis[window[0]] - cy) ** 2) / (2 * radius**2))
            gx = np.exp(-((axis[window[1]] - cx) ** 2) / (2 * radius**2))
            image[window] += rng.uniform(200, 3000) * np.outer(gy, gx)
        bases.append(image.astype(np.uint16))
    return bases


def generate(path: Path, size_gb: float, page: int, seed: int = 0) -> int:
    """Write a BigTIFF of ``size_gb`` GB of uint16 ``page`` x ``page`` pages; returns the page count."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(seed)
    pages = max(1, round(size_gb * 1e9 / (page * page * 2)))
    bases = _bases(page, 8, rng)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index in range(pages):
            a, b = bases[(index // 16) % 8], bases[(index // 16 + 1) % 8]
            image = a if index % 16 < 8 else b  # structure changes slowly along z
            noise = rng.integers(0, 48, (page, page), dtype=np.uint16)  # ~5.5 bits of shot/read noise
            tif.write(image + noise, photometric="minisblack", contiguous=True)
    return pages


# --- routes (run in a subprocess each) ---------------------------------------------------------

def _create(path: Path, shape, dtype, chunks):
    import zarr

    from unet_core import io

    group = zarr.open_group(path, mode="w", zarr_format=2)
    return group.create_array("0", shape=shape, dtype=dtype, chunks=chunks, compressors=io.COMPRESSOR, fill_value=0,
                              chunk_key_encoding={"name": "v2", "separator": "/"},
                              config={"write_empty_chunks": True}), group


def run_route(route: str, source: Path, output: Path) -> None:
    import numpy as np
    import tifffile

    from unet_core import ingest, io, pyramid

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    if route == "read":
        with open(source, "rb", buffering=0) as handle:
            buffer = bytearray(8 << 20)
            while handle.readinto(buffer):
                pass
    elif route in ("naive", "naive+pyramid"):
        data = tifffile.imread(source)
        axes = "zyx"
        chunks = io.default_chunks(axes, data.shape)
        array, group = _create(output, data.shape, data.dtype, chunks)
        array[:] = data
        if route == "naive+pyramid":
            previous = data
            for number, factors in enumerate(pyramid.pyramid_factors(axes, data.shape, [1.0, 1.0, 1.0]), start=1):
                shape = tuple(-(-n // f) for n, f in zip(previous.shape, factors))
                acc = np.zeros(shape, np.uint32)
                pyramid._accumulate_mean(acc, (0,) * 3, previous, [(0, n) for n in previous.shape], factors,
                                    previous.shape)
                acc += int(np.prod(factors)) // 2
                acc >>= int(np.prod(factors)).bit_length() - 1
                previous = acc.astype(data.dtype)
                del acc
                level = group.create_array(str(number), shape=shape, dtype=data.dtype,
                                           chunks=tuple(min(c, n) for c, n in zip(chunks, shape)),
                                           compressors=io.COMPRESSOR, fill_value=0,
                                           chunk_key_encoding={"name": "v2", "separator": "/"},
                                           config={"write_empty_chunks": True})
                level[:] = previous
    elif route == "ingest":
        ingest.ingest(source, output, pyramid=False)
    elif route == "ingest+pyramid":
        ingest.ingest(source, output, pyramid=True)
    elif route == "dask":
        import dask.array as da
        import zarr

        with tifffile.TiffFile(source) as tif:
            store = zarr.open(tif.series[0].aszarr(), mode="r")
            data = da.from_zarr(store)
            array, _ = _create(output, data.shape, data.dtype, io.default_chunks("zyx", data.shape))
            da.store(data.rechunk(array.chunks), array, lock=False)
    elif route != "imports":
        raise SystemExit(f"unknown route {route!r}")
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu_before
    maxrss = usage.ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"route": route, "seconds": seconds, "cpu_seconds": cpu, "maxrss_mb": maxrss}))


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(route: str, source: Path, workdir: Path, cold: bool) -> dict:
    output = workdir / f"{route.replace('+', '_')}.ome.zarr"
    if cold:
        _drop_cache(source)
    result = subprocess.run([sys.executable, __file__, "--route", route, "--input", str(source), "--output",
                             str(output)], capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"route {route} failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    if output.exists():
        record["output_mb"] = sum(f.stat().st_size for f in output.rglob("*") if f.is_file()) / 1e6
        shutil.rmtree(output)
    return record


def bench_size(size_gb: float, args, workdir: Path) -> dict:
    source = workdir / f"stack_{size_gb:g}GB.tif"
    start = time.perf_counter()
    pages = generate(source, size_gb, args.page)
    nbytes = source.stat().st_size
    print(f"\n== {nbytes / 1e9:.2f} GB BigTIFF: {pages} uint16 pages of {args.page}x{args.page} "
          f"(generated in {time.perf_counter() - start:.0f} s) ==")
    results: dict[str, dict] = {}
    try:
        for _ in range(args.repeats):
            for route in args.routes:
                record = measure(route, source, workdir, args.cold)
                best = results.get(route)
                if best is None or record["seconds"] < best["seconds"]:
                    results[route] = record
                print(f"   {route:<15} {record['seconds']:7.2f} s  (CPU {record['cpu_seconds']:6.2f} s)  peak RSS "
                      f"{record['maxrss_mb']:7.0f} MB", flush=True)
    finally:
        source.unlink(missing_ok=True)
    naive = results.get("naive")
    read = results.get("read")
    print(f"{'route':<15} {'seconds':>8} {'MB/s':>7} {'x naive':>8} {'x read':>7} {'CPU s':>7} {'CPU x naive':>11} "
          f"{'peak RSS MB':>12} {'output MB':>10}")
    for route, record in results.items():
        if route == "imports":
            print(f"{route:<15} {'':>8} {'':>7} {'':>8} {'':>7} {'':>7} {'':>11} {record['maxrss_mb']:12.0f}")
            continue
        speed = nbytes / record["seconds"] / 1e6
        vs_naive = naive["seconds"] / record["seconds"] if naive else float("nan")
        cpu_vs_naive = naive["cpu_seconds"] / record["cpu_seconds"] if naive else float("nan")
        vs_read = read["seconds"] / record["seconds"] if read else float("nan")
        out_mb = record.get("output_mb")
        print(f"{route:<15} {record['seconds']:8.2f} {speed:7.0f} {vs_naive:8.2f} {vs_read:7.3f} "
              f"{record['cpu_seconds']:7.2f} {cpu_vs_naive:11.2f} {record['maxrss_mb']:12.0f} "
              f"{out_mb if out_mb is not None else float('nan'):10.0f}")
    if "naive+pyramid" in results and "ingest+pyramid" in results:
        ratio = results["naive+pyramid"]["seconds"] / results["ingest+pyramid"]["seconds"]
        cpu = results["naive+pyramid"]["cpu_seconds"] / results["ingest+pyramid"]["cpu_seconds"]
        print(f"ingest+pyramid vs naive+pyramid: {ratio:.2f}x throughput, {cpu:.2f}x CPU")
    return {"bytes": nbytes, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0, help="size of the main test file (GB)")
    parser.add_argument("--small-gb", type=float, default=0.5,
                        help="second, small file for the RSS comparison; 0: none")
    parser.add_argument("--page", type=int, default=2048, help="page width and height (pixels)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every route (the fastest is kept)")
    parser.add_argument("--routes", nargs="+", default=ROUTES, choices=ROUTES)
    parser.add_argument("--tmpdir", default=tempfile.gettempdir(), help="where the test files go (deleted after)")
    parser.add_argument("--cold", action="store_true", help="drop the file from the page cache before each route")
    parser.add_argument("--route", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.route:
        run_route(args.route, Path(args.input), Path(args.output))
        return
    needed = 1.8 * args.size_gb * 1e9
    free = shutil.disk_usage(args.tmpdir).free
    if free < needed:
        raise SystemExit(f"{args.tmpdir}: {free / 1e9:.1f} GB free, the benchmark needs about {needed / 1e9:.1f} GB; "
                         f"use --size-gb or --tmpdir")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; page cache "
          f"{'cold' if args.cold else 'warm'}; best of {args.repeats}")
    workdir = Path(tempfile.mkdtemp(prefix="unet_ingest_bench_", dir=args.tmpdir))
    try:
        summary = {args.size_gb: bench_size(args.size_gb, args, workdir)}
        if args.small_gb:
            summary[args.small_gb] = bench_size(args.small_gb, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")
    big = summary[args.size_gb]["results"]
    if "naive" in big:
        for route in ("ingest", "ingest+pyramid"):
            if route in big:
                ratio = big["naive"]["seconds"] / big[route]["seconds"]
                rss = big[route]["maxrss_mb"]
                print(f"bar: {route} throughput {ratio:.2f} x naive (>= 0.8: {'yes' if ratio >= 0.8 else 'NO'}); "
                      f"peak RSS {rss:.0f} MB (<= 1024: {'yes' if rss <= 1024 else 'NO'}) "
                      f"vs naive {big['naive']['maxrss_mb']:.0f} MB")
    if args.small_gb:
        small = summary[args.small_gb]["results"]
        for route in ("ingest", "ingest+pyramid"):
            if route in big and route in small:
                print(f"peak RSS of {route}: {big[route]['maxrss_mb']:.0f} MB at {args.size_gb:g} GB, "
                      f"{small[route]['maxrss_mb']:.0f} MB at {args.small_gb:g} GB")


if __name__ == "__main__":
    main()
