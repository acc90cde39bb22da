"""Ingest: a raw stack (and its ground truth) into an OME-Zarr image with a viewing pyramid and
its provenance. See ``docs/ingest.md`` for the layout, the provenance fields and the measured
throughput and memory.

Examples
--------
>>> import numpy as np, tifffile, tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> tifffile.imwrite(folder / "in.tif", np.zeros((3, 16, 16), np.uint8), imagej=True,
...                  metadata={"axes": "ZYX", "spacing": 2.0})
>>> image = io.open_image(ingest(folder / "in.tif", folder / "out.ome.zarr"))
>>> image.axes, image.shape, image.scale["z"]
('zyx', (3, 16, 16), 2.0)
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
import zarr

from . import io, tiff
from .atomic import atomic_directory
from .pyramid import Level, plan_levels, pyramid_factors, write_image

__all__ = ["ingest", "parse_subset"]

_LOG = logging.getLogger(__name__)
# Layout of what ingest writes; bump when it changes so that older outputs are rewritten.
_INGEST_LAYOUT = 2
# --- ingest -----------------------------------------------------------------------------------

def _resolve_chunks(chunks: Sequence[int] | None, axes: str, shape: Sequence[int], path: Path) -> tuple[int, ...]:
    if chunks is None:
        return io.default_chunks(axes, shape)
    chunks = [int(c) for c in chunks]
    if len(chunks) > len(axes) or any(c < 1 for c in chunks):
        raise ValueError(f"{path}: chunks {tuple(chunks)} do not fit axes {axes!r} of shape {tuple(shape)} "
                         f"(give at most {len(axes)} positive sizes, in NGFF order)")
    # fewer sizes than axes apply to the last axes (e.g. y, x); the others keep their defaults
    resolved = list(io.default_chunks(axes, shape))
    resolved[len(axes) - len(chunks):] = chunks
    return tuple(min(c, n) for c, n in zip(resolved, shape))


def _existing_provenance(path: Path) -> dict | None:
    try:
        return dict(zarr.open_group(path, mode="r").attrs).get("unet_core", {}).get("provenance")
    except Exception:  # noqa: BLE001 - anything unreadable is simply rewritten
        return None


def _is_current(existing: dict | None, request: dict) -> bool:
    if not existing:
        return False
    labels = existing.get("labels") or {}
    return (existing.get("sha256") == request["sha256"] and labels.get("sha256") == request["labels_sha256"]
            and existing.get("ingest", {}).get("request") == request["ingest"])


class _Subset:
    """A source seen through a range along some of its axes (e.g. slices 0-19 of a stack)."""

    def __init__(self, source, subset: Mapping[str, slice], path: Path) -> None:
        unknown = set(subset) - set(source.axes)
        if unknown:
            raise tiff.TiffError(f"{path}: subset names axes {sorted(unknown)} that the stack {source.axes!r} "
                                 f"does not have")
        self.source = source
        self.starts, shape = [], []
        for axis, size in zip(source.axes, source.shape):
            start, stop, step = subset.get(axis, slice(None)).indices(size)
            if step != 1 or stop <= start:
                raise tiff.TiffError(f"{path}: subset {axis}={start}:{stop} is empty or strided for an axis of {size}")
            self.starts.append(start)
            shape.append(stop - start)
        self.shape = tuple(shape)

    def read(self, region: Sequence[slice]) -> np.ndarray:
        shifted = []
        for sl, start, size in zip(region, self.starts, self.shape):
            lo, hi, _ = sl.indices(size)
            shifted.append(slice(lo + start, hi + start))
        return self.source.read(shifted)

    def __getattr__(self, name):
        return getattr(self.source, name)


def _fit_labels(label_source, labels_path: Path, subset: Mapping[str, slice], out_axes: str,
                out_shape: Sequence[int], input_path: Path):
    """The labels seen in the image's NGFF axis order (whatever their own metadata says), through
    the image's subset; a shape that differs from the image's (without channels) is an error."""
    expected = tuple(n for a, n in zip(out_axes, out_shape) if a != "c")
    if subset and len(label_source.shape) == len(expected):
        label_source.axes = out_axes.replace("c", "")
        label_source = _Subset(label_source, {a: r for a, r in subset.items() if a != "c"}, labels_path)
    if tuple(label_source.shape) != expected:
        raise tiff.TiffError(f"{labels_path}: labels shape {tuple(label_source.shape)} differs from the image "
                             f"{input_path} (expected {expected}, the image {out_axes!r} {out_shape} "
                             f"without channels)")
    label_source.axes = out_axes.replace("c", "")
    return label_source


def parse_subset(text: str | None) -> dict[str, slice]:
    """``"z=0:20,t=5:"`` -> ``{"z": slice(0, 20), "t": slice(5, None)}`` (NGFF letters)."""
    subset: dict[str, slice] = {}
    for part in filter(None, (text or "").replace(" ", "").split(",")):
        axis, _, bounds = part.partition("=")
        start, colon, stop = bounds.partition(":")
        if axis not in io.AXIS_ORDER or not colon or not (start or "0").isdigit() or not (stop or "0").isdigit():
            raise ValueError(f"subset {text!r}: expected entries like 'z=0:20' (NGFF axis letter, slice bounds)")
        subset[axis] = slice(int(start) if start else None, int(stop) if stop else None)
    return subset


def ingest(input_path: str | Path, output_path: str | Path, *, labels_path: str | Path | None = None,
           axes: str | None = None, chunks: Sequence[int] | None = None, pyramid: bool = True,
           block_bytes: int = tiff.BLOCK_BYTES, subset: Mapping[str, slice] | str | None = None,
           format: str = io.DEFAULT_FORMAT, shards: Sequence[int] | None = None) -> Path:
    """Convert a raw stack (and optional instance ground truth) into an OME-Zarr image; returns
    ``output_path``.

    Parameters
    ----------
    input_path : str or Path
        A TIFF (multi-page, BigTIFF, OME-TIFF, ImageJ hyperstack) or a folder of per-slice
        TIFFs, stacked in natural name order along z (or along the override's first axis).
        Pixel types uint8, uint16 and float32.
    output_path : str or Path
        The ``.ome.zarr`` folder to publish. It appears only when complete (written beside it
        and renamed). If it exists and records the same input and labels (SHA-256), axes,
        chunks and pyramid setting, nothing is done.
    labels_path : str or Path, optional
        Instance ground truth, integers, shaped like the image without its channel axis
        (axes in the image's NGFF order); written to ``labels/ground_truth``.
    axes : str, optional
        NGFF letters for the axes of the stored data (e.g. ``"tyx"``), overriding the TIFF
        metadata (OME, ImageJ).
    chunks : sequence of int, optional
        Chunk shape in NGFF axis order; fewer sizes apply to the last axes. Default: one t,
        all channels, 32 z, 512 x 512 in y/x.
    pyramid : bool
        Also write levels ``"1"``, ``"2"``, ... each 2x smaller in y/x (and z when that keeps
        voxels closest to isotropic) until y and x are at most 512; labels by stride subsampling.
    block_bytes : int
        Largest block read from the input at once (a row of chunks, split along y/x when
        larger). Peak memory is about four times this (the block being read, the one being
        written, zarr's encoding copies and the pyramid sums), whatever the size of the stack.
    subset : mapping or str, optional
        Ingest only a range along some axes (NGFF letters), e.g. ``{"z": slice(0, 20)}`` or
        ``"z=0:20"``: held-out slices of one volume become their own stack. Applied to the
        labels alike.
    format, shards : str, sequence of int, optional
        ``ngff-0.4`` (zarr v2) or ``ngff-0.5`` (zarr v3, sharded: ``shards`` in NGFF order, or
        by default the blocks written at once, up to ``block_bytes``).

    Raises
    ------
    tiff.TiffError
        The input cannot be ingested (not a TIFF, truncated or damaged, no pages, pages of
        different shapes, unsupported pixel type, unreadable, labels of another shape); the
        message names the file and the problem, and no output is left behind.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    subset = parse_subset(subset) if isinstance(subset, str) else dict(subset or {})
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(tiff.open_source(input_path, axes, max_page_bytes=block_bytes))
        if subset:
            source = _Subset(source, subset, input_path)
        out_axes = io.canonical_axes(source.axes)
        out_shape = tuple(source.shape[source.axes.index(a)] for a in out_axes)
        chunk_shape = _resolve_chunks(chunks, out_axes, out_shape, input_path)
        labels_path = Path(labels_path) if labels_path is not None else None
        label_source = labels_path and _fit_labels(stack.enter_context(tiff.open_source(
            labels_path, None, check_dtype=tiff.label_dtype_problem, max_page_bytes=block_bytes)),
            labels_path, subset, out_axes, out_shape, input_path)
        request = {"layout": _INGEST_LAYOUT, "axes": out_axes, "shape": list(out_shape),
                   "chunks": list(chunk_shape), "pyramid": bool(pyramid),
                   "subset": {a: [r.start, r.stop] for a, r in subset.items()},
                   **_format_request(format, shards, out_axes, input_path)}

        with ThreadPoolExecutor(2, thread_name_prefix="ingest-hash") as hasher:
            # hashing runs beside the pixel copy (hashlib releases the GIL)
            digest = hasher.submit(tiff.source_sha256, source)
            label_digest = hasher.submit(tiff.source_sha256, label_source) if label_source is not None else None
            if os.path.lexists(output_path):
                current = {"sha256": digest.result(), "labels_sha256": label_digest and label_digest.result(),
                           "ingest": request}
                if _is_current(_existing_provenance(output_path), current):
                    _LOG.info("%s is up to date with %s; nothing to do", output_path, input_path)
                    return output_path
            scale = [source.sizes.get(a, 1.0) for a in out_axes]
            units = {a: u for a, u in source.units.items() if a in out_axes}
            factors = pyramid_factors(out_axes, out_shape, scale) if pyramid else []
            levels = plan_levels(out_axes, out_shape, chunk_shape, source.dtype.itemsize, factors, block_bytes)
            started = datetime.datetime.now(datetime.timezone.utc)
            with atomic_directory(output_path) as tmp:
                group = io.new_group(tmp, format)
                write_image(group, source, out_axes, levels, scale, units, output_path.name, method="mean",
                            attributes={}, write_empty_chunks=True, shards=shards)
                provenance = _provenance(input_path, source, digest.result(), request, axes, len(levels),
                                         block_bytes, started)
                if label_source is not None:
                    _write_labels(group, label_source, labels_path, out_axes, levels, scale, units, block_bytes,
                                  shards)
                    provenance["labels"] = {"source": str(labels_path), "size_bytes": label_source.size,
                                            "sha256": label_digest.result(), "tiff": label_source.summary}
                group.attrs["unet_core"] = {"provenance": provenance}
    return output_path


def _provenance(input_path: Path, source, sha256: str, request: dict, axes: str | None, levels: int,
                block_bytes: int, started: datetime.datetime) -> dict:
    """What the image records of its source and of the ingest that wrote it."""
    directory = isinstance(source, tiff.DirectorySource)
    provenance = {
        "source": str(input_path), "kind": "directory" if directory else "tiff",
        "size_bytes": source.size, "sha256": sha256, "tiff": source.summary,
        "ingest": {"request": request, "axes_override": axes, "levels": levels,
                   "block_bytes": block_bytes, "started": started.isoformat(timespec="seconds"),
                   "tifffile": tifffile.__version__, "zarr": zarr.__version__},
    }
    if directory:
        provenance["sha256_of"] = "sha256sum-style manifest of the files in stacking order"
    if source.warnings:
        provenance["warnings"] = source.warnings[:20]
    return provenance


def _format_request(format: str, shards: Sequence[int] | None, axes: str, path: Path) -> dict:
    """The format settings that decide the output (none for the default, so that outputs written
    before formats existed stay current)."""
    if format not in io.FORMATS:
        raise ValueError(f"format must be one of {', '.join(io.FORMATS)}, got {format!r}")
    if shards is not None and format != "ngff-0.5":
        raise ValueError(f"{path}: shards need format ngff-0.5 (zarr v3)")
    if shards is not None and (len(shards) != len(axes) or any(int(s) < 1 for s in shards)):
        raise ValueError(f"{path}: shards {tuple(shards)} do not fit axes {axes!r} (give one positive size per "
                         f"axis, in NGFF order)")
    request = {"format": format} if format != io.DEFAULT_FORMAT else {}
    if shards is not None:
        request["shards"] = [int(s) for s in shards]
    return request


def _write_labels(group: zarr.Group, source, path: Path, image_axes: str, image_levels: list[Level],
                  scale: Sequence[float], units: Mapping[str, str], block_bytes: int,
                  shards: Sequence[int] | None) -> None:
    """The NGFF label image ``labels/ground_truth``, with the image's levels (stride subsampled)."""
    keep = [i for i, a in enumerate(image_axes) if a != "c"]
    axes = "".join(image_axes[i] for i in keep)
    chunks = tuple(image_levels[0].chunks[i] for i in keep)
    factors = [tuple(level.factors[i] for i in keep) for level in image_levels[1:]]
    levels = plan_levels(axes, tuple(image_levels[0].shape[i] for i in keep), chunks, source.dtype.itemsize,
                                 factors, block_bytes)
    labels = group.require_group("labels")
    labels.attrs.update(io.ngff_attributes(io.group_format(group), labels=["ground_truth"]))
    sub = labels.require_group("ground_truth")
    signed = source.dtype.kind == "i"

    def check(block: np.ndarray) -> None:
        if signed and block.size and block.min() < 0:
            raise tiff.TiffError(f"{path}: labels hold negative ids ({int(block.min())}); instance ids must be >= 0")

    write_image(sub, source, axes, levels, [scale[i] for i in keep], units, "ground_truth", method="nearest",
                attributes={}, image_label={"source": {"image": "../../"}}, write_empty_chunks=False, check=check,
                shards=[shards[i] for i in keep] if shards is not None else None)
