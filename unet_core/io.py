"""Reading microscopy TIFF stacks and reading/writing OME-Zarr images, atomically.

Format: OME-NGFF 0.4 on zarr format 2, blosc-zstd compressed. NGFF 0.4 / zarr v2 is the
combination that every current reader opens (napari + napari-ome-zarr, ome-zarr-py, Fiji's
n5-zarr/MoBIE, neuroglancer, vizarr); NGFF 0.5 needs zarr v3, which several of them still
read only partially.

Axes use NGFF names and order: a subset of ``t, c, z, y, x`` in that order; every image has
``y`` and ``x``. Level 0 of an image is the array at path ``"0"``; :func:`ingest` adds the
pyramid levels ``"1"``, ``"2"``, ... and the ground truth as the NGFF label image
``labels/ground_truth``. See ``docs/ingest.md`` for the layout, the provenance fields and the
measured throughput and memory.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import logging
import math
import os
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numcodecs
import numpy as np
import tifffile
import zarr

from .atomic import atomic_directory

__all__ = [
    "NGFF_VERSION", "Image", "open_image", "read_labels", "canonical_axes", "default_chunks",
    "atomic_image", "create_image", "COMPRESSOR", "FAST_COMPRESSOR", "ingest", "intensity_statistics", "sha256_file", "TiffError",
    "parse_subset",
]

NGFF_VERSION = "0.4"
AXIS_ORDER = "tczyx"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_TIFF_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x"}
_SUPPORTED_DTYPES = (np.uint8, np.uint16, np.float32)
# The compressor of every array this package writes, unless it says otherwise.
COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
# For outputs written while a model computes (probabilities): zstd level 1 compresses float16
# probabilities (ISBI 2012, 10 MiB) in 53 ms against 150 ms at level 5, into 2 % more bytes
# (ratio 1.47 against 1.50; lz4 is faster still but 1.26). On a CPU node every millisecond
# spent compressing is taken from the forward passes (bench/predict.py (a)).
FAST_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.BITSHUFFLE)
# Layout of what ingest writes; bump when it changes so that older outputs are rewritten.
_INGEST_LAYOUT = 2
# Bytes of one block read from the input: one row of chunks (32 z x the whole page) unless
# that is larger, in which case the block is split along y (then x) on chunk boundaries.
_BLOCK_BYTES = 128 << 20
_PYRAMID_MIN_SIZE = 512
_TIFF_SUFFIXES = (".tif", ".tiff")
_LOG = logging.getLogger(__name__)


class TiffError(ValueError):
    """A raw stack that cannot be ingested; the message names the file and the problem."""


def canonical_axes(axes) -> str:
    """The NGFF order (t, c, z, y, x) of a collection of axis names."""
    return "".join(a for a in AXIS_ORDER if a in set(axes))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Image:
    """An OME-Zarr image opened for reading: level-0 array, NGFF axes and pixel sizes."""

    path: Path
    array: zarr.Array
    axes: str
    scale: dict[str, float]
    attrs: dict

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def scale_for(self, axes: str) -> list[float]:
        return [self.scale.get(a, 1.0) for a in axes]

    def read(self, where: Mapping[str, int], order: Sequence[str]) -> np.ndarray:
        """Read with the axes in ``where`` fixed, returned in axis ``order`` (missing c -> 1)."""
        index = tuple(where[a] if a in where else slice(None) for a in self.axes)
        block = np.asarray(self.array[index])
        remaining = [a for a in self.axes if a not in where]
        for axis in order:
            if axis not in remaining:
                block = block[None]
                remaining.insert(0, axis)
        return np.transpose(block, [remaining.index(a) for a in order])


def open_image(path: str | Path, name: str | None = None) -> Image:
    """Open an OME-Zarr image (or its ``labels/<name>`` image) for reading."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"OME-Zarr image not found: {path}")
    try:
        group = zarr.open_group(path / "labels" / name if name else path, mode="r")
        multiscales = group.attrs["multiscales"][0]
        axes = "".join(a["name"] for a in multiscales["axes"])
        dataset = multiscales["datasets"][0]
        array = group[dataset["path"]]
    except (KeyError, IndexError, TypeError, FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        raise ValueError(f"{path}: not an OME-Zarr image with multiscales metadata ({error!r})") from error
    scale = {}
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = dict(zip(axes, (float(s) for s in transform["scale"])))
    return Image(path=path, array=array, axes=axes, scale=scale, attrs=dict(group.attrs))


def read_labels(path: str | Path, name: str = "ground_truth") -> Image | None:
    """The ``labels/<name>`` image of an OME-Zarr image, or None when it has none."""
    if not (Path(path) / "labels" / name).exists():
        return None
    return open_image(path, name)


def _multiscales(axes: str, scale: Sequence[float], name: str, units: Mapping[str, str] | None = None,
                 datasets: list[dict] | None = None, method: dict | None = None) -> list[dict]:
    units = units or {}
    axis_meta = []
    for axis in axes:
        meta = {"name": axis, "type": _AXIS_TYPES[axis]}
        if axis in units:
            meta["unit"] = units[axis]
        axis_meta.append(meta)
    if datasets is None:
        datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(map(float, scale))}]}]
    multiscale = {"version": NGFF_VERSION, "name": name, "axes": axis_meta, "datasets": datasets}
    if method:
        multiscale.update(method)
    return [multiscale]


def default_chunks(axes: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Chunks for blockwise inference: one t, all channels, 32 z, 512x512 in y/x."""
    limits = {"t": 1, "c": None, "z": 32, "y": 512, "x": 512}
    return tuple(size if limits[a] is None else min(size, limits[a]) for a, size in zip(axes, shape))


class _Writer:
    def __init__(self, array: zarr.Array, axes: str) -> None:
        self.array = array
        self.axes = axes

    def write(self, where: Mapping[str, int], data: np.ndarray, order: Sequence[str]) -> None:
        """Write ``data`` (axes in ``order``) at the position fixed by ``where``."""
        remaining = [a for a in self.axes if a not in where]
        data = np.transpose(data, [list(order).index(a) for a in remaining])
        index = tuple(where[a] if a in where else slice(None) for a in self.axes)
        self.array[index] = data.astype(self.array.dtype, copy=False)


def create_image(root: Path | zarr.Group, axes: str, shape, dtype, scale, chunks, name, attributes=None,
                  units=None, *, path: str = "0", write_empty_chunks: bool = False,
                  compressor: numcodecs.abc.Codec = COMPRESSOR) -> tuple[zarr.Group, zarr.Array]:
    """An empty OME-Zarr image (NGFF 0.4, zarr v2): array ``path`` of a group at ``root``, with
    the multiscales metadata of one level and ``attributes``. Chunks default to
    :func:`default_chunks`; chunk keys use ``/``."""
    group = root if isinstance(root, zarr.Group) else zarr.open_group(root, mode="w", zarr_format=2)
    chunks = tuple(chunks) if chunks is not None else default_chunks(axes, shape)
    array = group.create_array(path, shape=tuple(shape), dtype=dtype, chunks=chunks,
                               compressors=compressor, fill_value=0,
                               chunk_key_encoding={"name": "v2", "separator": "/"},
                               config={"write_empty_chunks": write_empty_chunks})
    group.attrs.update({"multiscales": _multiscales(axes, scale, name, units), **(attributes or {})})
    return group, array


@contextlib.contextmanager
def atomic_image(target: str | Path, axes: str, shape: Sequence[int], *, dtype, scale: Sequence[float],
                 chunks: Sequence[int] | None = None, attributes: dict | None = None) -> Iterator[_Writer]:
    """Create an OME-Zarr image at a temporary path; publish it at ``target`` on success."""
    target = Path(target)
    with atomic_directory(target) as tmp:
        _, array = create_image(tmp, axes, shape, dtype, scale, chunks, target.name, attributes)
        yield _Writer(array, axes)


# Above this many chunks, intensity statistics come from this many chunks spread evenly over the
# volume: a terabyte volume has 10^5-10^7 chunks, and neither one client reading all of them nor a
# dask graph of one task per chunk scales (bench/scale.py). 1024 chunks of a varied volume give
# the mean and standard deviation to well under 1 %.
STATISTICS_MAX_CHUNKS = 1024


def intensity_statistics(image: Image, max_chunks: int | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over the whole image, streamed by chunks.

    An image of more than ``max_chunks`` chunks (default :data:`STATISTICS_MAX_CHUNKS`) is
    sampled: that many chunks at evenly spaced positions of its chunk grid (in storage order,
    so every part of the volume contributes), merged exactly as if they were the image.
    """
    max_chunks = STATISTICS_MAX_CHUNKS if max_chunks is None else max_chunks
    array = image.array
    # chunk grid; a sample reads every channel at its position
    grid = tuple(1 if a == "c" else -(-s // c) for a, s, c in zip(image.axes, array.shape, array.chunks))
    count = math.prod(grid)
    reduce_axes = tuple(i for i, a in enumerate(image.axes) if a != "c")
    if count <= max_chunks:
        data = da.from_zarr(array).astype(np.float64)
        mean, std = da.compute(data.mean(axis=reduce_axes), data.std(axis=reduce_axes))
    else:
        mean, std = _sampled_statistics(image, grid, reduce_axes, np.linspace(0, count - 1, max_chunks).round())
    mean, std = np.atleast_1d(mean), np.atleast_1d(std)
    std = np.where(std > 0, std, 1.0)
    return [float(m) for m in mean], [float(s) for s in std]


def _sampled_statistics(image: Image, grid, reduce_axes, picks) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over the chunks at flat grid positions ``picks`` (merged by Chan et al.'s
    pairwise update, which stays exact where sums of squares would cancel)."""
    array = image.array

    def moments(flat):
        position = np.unravel_index(int(flat), grid)
        region = tuple(slice(None) if a == "c" else slice(p * c, min((p + 1) * c, s))
                       for a, p, c, s in zip(image.axes, position, array.chunks, array.shape))
        chunk = np.asarray(array[region], np.float64)
        n = math.prod(chunk.shape[a] for a in reduce_axes)
        mean = chunk.mean(axis=reduce_axes)
        return n, mean, ((chunk - np.expand_dims(mean, reduce_axes)) ** 2).sum(axis=reduce_axes)

    total, mean, m2 = 0, 0.0, 0.0
    with ThreadPoolExecutor(8) as pool:
        for n, chunk_mean, chunk_m2 in pool.map(moments, np.unique(picks)):
            delta = chunk_mean - mean
            merged = total + n
            mean = mean + delta * n / merged
            m2 = m2 + chunk_m2 + delta**2 * total * n / merged
            total = merged
    return mean, np.sqrt(m2 / total)


# --- TIFF sources -----------------------------------------------------------------------------
#
# A source is a raw stack opened for block reads: ``axes`` (NGFF letters in the order of the
# stored data), ``shape``, ``dtype`` and ``read(region) -> ndarray`` for a box of slices in
# that order. A TIFF series is seen as ``(*lead, *page)``: the page grid (one index per IFD,
# in file order) followed by the page shape, so that a block is a set of whole pages.
#
# Why not dask over tifffile's zarr view (the first version): measured on this machine
# (bench/ingest.py, 2048x2048 uint16 pages), ``da.store(da.from_zarr(series.aszarr())
# .rechunk((32, 512, 512)))`` peaked at 814 MB RSS for a 0.5 GB file and 1102 MB for 4 GB:
# the rechunk from page chunks to 32-page chunks keeps several 32-page slabs (and their
# copies) alive and grows with the stack. Reading through the zarr view also costs: ~0.36
# GB/s against ~5 GB/s for tifffile's page reads (or one readinto per page of contiguous
# data). The loop below reads one block of whole pages (or of whole rows of pages), so
# memory is set by the block, and it is faster than both the dask and the naive route.

_FATAL_TIFF_LOGS = ("invalid page offset", "corrupted tag list", "invalid offset to page",
                    "circular reference", "missing data offset", "missing data bytecounts")


class _LogCapture(logging.Handler):
    """Collects tifffile's error log records: tifffile logs (not raises) a broken IFD chain."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    handler = _LogCapture()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _check_path(path: Path, what: str = "file") -> None:
    """Raise a TiffError unless ``path`` is a readable regular file (or directory for stacks)."""
    if not os.path.lexists(path):
        raise TiffError(f"{path}: {what} does not exist")
    if not path.exists():
        raise TiffError(f"{path}: {what} is a broken symbolic link")
    if not (path.is_file() or path.is_dir()):
        raise TiffError(f"{path}: not a regular file or directory (a device, pipe or socket cannot be ingested)")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise TiffError(f"{path}: {what} is not readable (permission denied)")


def _map_axes(tiff_axes: str, path: Path) -> str:
    """NGFF letters for tifffile's axis codes; unnamed page axes (Q, I) become z, then t.

    Unnamed axes are assigned from the innermost outwards (the one next to the page is z),
    the usual order of a time series of stacks.
    """
    letters = [_TIFF_AXES.get(letter) for letter in tiff_axes]
    unnamed = [i for i, letter in enumerate(tiff_axes) if letter in "QI"]
    free = [a for a in "zt" if a not in letters]
    for i in reversed(unnamed):
        if not free:
            break
        letters[i] = free.pop(0)
    if None in letters:
        raise TiffError(f"{path}: cannot map TIFF axes {tiff_axes!r} to t/c/z/y/x; set 'axes' for this stack")
    axes = "".join(letters)
    if len(set(axes)) != len(axes):
        raise TiffError(f"{path}: TIFF axes {tiff_axes!r} name one axis twice ({axes!r}); set 'axes' for this stack")
    return axes


def _override_axes(override: str, path: Path, ndim: int) -> str:
    axes = override.lower()
    if len(axes) != ndim or set(axes) - set(AXIS_ORDER) or len(set(axes)) != ndim:
        raise TiffError(f"{path}: axes override {override!r} does not fit an array with {ndim} axes "
                        f"(use {ndim} distinct letters from 'tczyx')")
    return axes


def _tiff_axes(series_axes: str, path: Path, override: str | None, ndim: int) -> str:
    """The NGFF axes of a TIFF series: the override when given, else from the TIFF axis codes."""
    if override:
        return _override_axes(override, path, ndim)
    return _map_axes(series_axes, path)


_UNITS = {"µm": "micrometer", "um": "micrometer", "micron": "micrometer", "microns": "micrometer",
          "\\u00B5m": "micrometer", "μm": "micrometer", "nm": "nanometer", "mm": "millimeter",
          "cm": "centimeter", "m": "meter", "Å": "angstrom", "pm": "picometer",
          "s": "second", "sec": "second", "ms": "millisecond", "min": "minute", "h": "hour"}


def _ome_pixels(tif: tifffile.TiffFile) -> ET.Element | None:
    try:
        root = ET.fromstring(tif.ome_metadata)
    except (ET.ParseError, TypeError, ValueError):
        return None
    return next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)


def _pixel_sizes(tif: tifffile.TiffFile) -> tuple[dict[str, float], dict[str, str]]:
    """Physical pixel sizes (and their units) from OME or ImageJ metadata; plain TIFFs have none."""
    sizes: dict[str, float] = {}
    units: dict[str, str] = {}
    if tif.is_ome and tif.ome_metadata:
        pixels = _ome_pixels(tif)
        if pixels is not None:
            for axis in "zyx":
                value = pixels.get(f"PhysicalSize{axis.upper()}")
                with contextlib.suppress(ValueError, TypeError):
                    if value and float(value) > 0:
                        sizes[axis] = float(value)
                        unit = _UNITS.get(pixels.get(f"PhysicalSize{axis.upper()}Unit", "µm"))
                        if unit:
                            units[axis] = unit
            value = pixels.get("TimeIncrement")
            with contextlib.suppress(ValueError, TypeError):
                if value and float(value) > 0:
                    sizes["t"] = float(value)
                    unit = _UNITS.get(pixels.get("TimeIncrementUnit", "s"))
                    if unit:
                        units["t"] = unit
    elif tif.is_imagej and tif.imagej_metadata:
        meta = tif.imagej_metadata
        page = tif.pages.first
        for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
            value = page.tags.get(tag)
            if value is not None and value.value[0] and value.value[1]:
                sizes[axis] = value.value[1] / value.value[0]
        with contextlib.suppress(ValueError, TypeError):
            if float(meta.get("spacing", 0)) > 0:
                sizes["z"] = float(meta["spacing"])
        unit = _UNITS.get(str(meta.get("unit", "")))
        if unit:
            units.update({a: unit for a in sizes})
        with contextlib.suppress(ValueError, TypeError):
            if float(meta.get("finterval", 0)) > 0:
                sizes["t"] = float(meta["finterval"])
                units["t"] = _UNITS.get(str(meta.get("tunit", "sec")), "second")
    return sizes, units


def _jsonable(value, depth: int = 0):
    """A JSON-safe, size-limited copy of tifffile metadata values (no large arrays)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value[:200] if isinstance(value, str) else value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)) and len(value) <= 16 and depth < 3:
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, dict) and depth < 3:
        return {str(k): _jsonable(v, depth + 1) for k, v in list(value.items())[:32]
                if not isinstance(v, (bytes, np.ndarray))}
    return None


# A plain TIFF's ImageDescription is free text of any length: this much of it is recorded.
_DESCRIPTION_CHARS = 4000


def _metadata_summary(tif: tifffile.TiffFile, series) -> dict:
    """What the TIFF says about itself, for the provenance record."""
    page = series.keyframe
    summary = {
        "kind": series.kind, "axes": series.axes, "shape": list(series.shape), "dtype": str(series.dtype),
        "byteorder": tif.byteorder, "pages": len(tif.pages), "series": len(tif.series),
        "is_bigtiff": bool(tif.is_bigtiff), "is_ome": bool(tif.is_ome), "is_imagej": bool(tif.is_imagej),
        "compression": getattr(page.compression, "name", str(page.compression)),
        "photometric": getattr(page.photometric, "name", str(page.photometric)),
        "tiled": bool(page.is_tiled), "contiguous": series.dataoffset is not None,
    }
    software = page.tags.get("Software")
    if software is not None:
        summary["software"] = _jsonable(str(software.value))
    description = page.tags.get("ImageDescription")
    if description is not None and not (tif.is_ome or tif.is_imagej):
        # OME-XML and ImageJ descriptions are parsed below; a plain TIFF's is kept as written
        summary["description"] = str(description.value)[:_DESCRIPTION_CHARS]
    if tif.is_imagej and tif.imagej_metadata:
        summary["imagej"] = {k: v for k, v in _jsonable(tif.imagej_metadata).items()
                             if v is not None and k not in ("Info", "Labels", "Ranges", "LUTs", "Properties")}
    if tif.is_ome and tif.ome_metadata:
        pixels = _ome_pixels(tif)
        ome: dict = {}
        try:
            root = ET.fromstring(tif.ome_metadata)
            image = next((el for el in root.iter() if el.tag.endswith("}Image")), None)
            if image is not None:
                ome["image_name"] = image.get("Name")
                date = next((el.text for el in image if el.tag.endswith("}AcquisitionDate")), None)
                if date:
                    ome["acquisition_date"] = date
            objective = next((el for el in root.iter() if el.tag.endswith("}Objective")), None)
            if objective is not None:
                ome["objective"] = {k: objective.get(k) for k in ("Model", "NominalMagnification", "LensNA")
                                    if objective.get(k)}
        except ET.ParseError:
            ome["error"] = "OME-XML does not parse"
        if pixels is not None:
            ome["pixels"] = {k: v for k, v in pixels.attrib.items() if k != "ID"}
            ome["channels"] = [c.get("Name") or c.get("ID") for c in pixels if c.tag.endswith("}Channel")][:16]
        summary["ome"] = ome
    return summary


@dataclass
class _Series:
    """One tifffile series: its pages, or the offset of its data when stored contiguously."""

    index: int
    series: object
    pages: int
    dataoffset: int | None


class _TiffSource:
    """A TIFF file (multi-page, BigTIFF, OME, ImageJ hyperstack) opened for block reads.

    Validation happens here, before anything is written: a readable TIFF with at least one
    page, equal page shapes, a supported dtype, an intact IFD chain and pixel data that lies
    inside the file.
    """

    def __init__(self, path: Path, axes: str | None = None, *,
                 check_dtype: Callable[[np.dtype], str | None] | None = None,
                 max_page_bytes: int = _BLOCK_BYTES) -> None:
        self.path = path
        self.max_page_bytes = max_page_bytes
        _check_path(path)
        if not path.is_file():
            raise TiffError(f"{path}: not a file")
        self.size = path.stat().st_size
        self.warnings: list[str] = []
        self._store = None
        with _tifffile_errors() as errors:
            try:
                self.tif = tifffile.TiffFile(path)
            except PermissionError as error:
                raise TiffError(f"{path}: file is not readable ({_one_line(error)})") from error
            except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError, struct.error) as error:
                raise TiffError(f"{path}: not a readable TIFF file ({_one_line(error)})") from error
            try:
                self._inspect(axes, check_dtype or _image_dtype_problem, errors)
                self._file = open(path, "rb", buffering=0)
            except BaseException:
                self.tif.close()
                raise
            self.warnings = list(errors)

    def _inspect(self, axes, check_dtype, errors: list[str]) -> None:
        path, tif = self.path, self.tif
        try:
            n_pages = len(tif.pages)
            all_series = tif.series
        except Exception as error:  # noqa: BLE001 - tifffile raises many types on broken files
            raise TiffError(f"{path}: broken TIFF structure ({_one_line(error)})") from error
        fatal = [m for m in errors if any(key in m.lower() for key in _FATAL_TIFF_LOGS)]
        if fatal:
            raise TiffError(f"{path}: truncated or corrupted TIFF (the chain of pages breaks: {fatal[0]})")
        if not n_pages or not all_series:
            raise TiffError(f"{path}: TIFF has no image pages")
        series = all_series[0]
        parts = [series]
        if series.kind in ("shaped", "generic", "uniform") and len(all_series) > 1:
            # Pages written one by one (tifffile makes a series per write) or of different shapes.
            shapes = {(s.shape, str(s.dtype)) for s in all_series}
            if len(shapes) > 1:
                listed = ", ".join(f"{s.shape} {s.dtype}" for s in all_series[:6])
                raise TiffError(f"{path}: pages have different shapes or types ({listed}"
                                f"{', ...' if len(all_series) > 6 else ''}); a stack needs equal pages")
            parts = list(all_series)
        elif len(all_series) > 1:
            _LOG.warning("%s: only the first of %d image series is ingested", path, len(all_series))
        self.dtype = np.dtype(series.dtype)
        if problem := check_dtype(self.dtype):
            raise TiffError(f"{path}: {problem}")
        self.dtype = self.dtype.newbyteorder("=")
        self.page_shape = tuple(series.keyframe.shape)
        shape = tuple(series.shape)
        if len(parts) > 1:
            shape = (len(parts), *shape)
        series_axes = ("I" if len(parts) > 1 else "") + series.axes
        self.tiff_axes = series_axes
        self.shape = shape
        self.axes = _tiff_axes(series_axes, path, axes, len(shape))
        if "y" not in self.axes or "x" not in self.axes:
            raise TiffError(f"{path}: axes {self.axes!r} lack y and x; set 'axes' for this stack")
        self.page_bytes = int(np.prod(self.page_shape)) * self.dtype.itemsize
        self.series = []
        n_lead = len(shape) - len(self.page_shape)
        pages_per_series = int(np.prod(series.shape[:len(series.shape) - len(self.page_shape)], dtype=np.int64))
        self.paged = n_lead >= 0 and shape[n_lead:] == self.page_shape
        for index, part in enumerate(parts):
            offset = part.dataoffset
            self.series.append(_Series(index if len(parts) > 1 else 0, part, pages_per_series, offset))
            if not self.paged:
                continue
            if offset is None and len(part.pages) != pages_per_series:
                self.paged = False
        self.lead_shape = shape[:n_lead] if self.paged else ()
        if not self.paged and len(parts) > 1:
            raise TiffError(f"{path}: {len(parts)} image series of shape {series.shape} cannot be read as one stack")
        self._check_extents()
        self.summary = _metadata_summary(tif, series)
        self.sizes, self.units = _pixel_sizes(tif)

    def _check_extents(self) -> None:
        """All pixel data must lie inside the file: finds truncation before anything is written."""
        for part in self.series:
            if part.dataoffset is not None:
                end = part.dataoffset + part.pages * self.page_bytes
                if end > self.size:
                    raise TiffError(f"{self.path}: truncated TIFF (pixel data ends at byte {end}, the file has "
                                    f"{self.size} bytes)")
                continue
            for index, page in enumerate(part.series.pages):
                if page is None:
                    raise TiffError(f"{self.path}: page {index} of the image is missing")
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
                if ends and max(ends) > self.size:
                    raise TiffError(f"{self.path}: truncated TIFF (page {index} data ends at byte {max(ends)}, "
                                    f"the file has {self.size} bytes)")

    # -- reading ----------------------------------------------------------------------------

    def _read_contiguous(self, offset: int, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        self._file.seek(offset)
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                raise TiffError(f"{self.path}: truncated TIFF (pixel data ends early at byte {offset + done})")
            done += n
        if self.tif.byteorder != ("<" if np.little_endian else ">") and self.dtype.itemsize > 1:
            out.byteswap(inplace=True)

    def _read_pages(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Read whole pages (flat indices over the page grid) into ``out`` (n, *page_shape)."""
        per = self.series[0].pages
        position = 0
        while position < len(indices):
            first = int(indices[position])
            part, local = divmod(first, per)
            run = 1
            while (position + run < len(indices) and indices[position + run] == first + run
                   and (first + run) // per == part):
                run += 1
            target = out[position:position + run]
            series = self.series[part]
            if series.dataoffset is not None:
                self._read_contiguous(series.dataoffset + local * self.page_bytes, target)
            else:
                data = self.tif.asarray(key=list(range(local, local + run)), series=series.index, maxworkers=2)
                target[...] = data.reshape(target.shape)
            position += run

    def _zarr_store(self):
        if self._store is None:
            store = self.series[0].series.aszarr()
            array = zarr.open(store, mode="r")
            self._store = array if isinstance(array, zarr.Array) else array["0"]
        return self._store

    def read(self, region: Sequence[slice]) -> np.ndarray:
        """The box ``region`` (slices in source order) as a new array."""
        with _tifffile_errors() as errors:
            try:
                data = self._read(region)
            except TiffError:
                raise
            except MemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - decoders raise many types on damaged data
                raise TiffError(f"{self.path}: failed reading pixel data ({_one_line(error)})") from error
        if errors:
            raise TiffError(f"{self.path}: failed reading pixel data ({errors[0]})")
        return data

    def _read(self, region: Sequence[slice]) -> np.ndarray:
        shape = tuple(s.stop - s.start for s in region)
        n_lead = len(self.lead_shape)
        in_page = tuple(region[n_lead:])
        whole_pages = self.paged and all(s.start == 0 and s.stop == n for s, n in zip(in_page, self.page_shape))
        if not self.paged or (not whole_pages and self.page_bytes > self.max_page_bytes and len(self.series) == 1):
            # A series without a page grid, or parts of huge pages (mosaics): tifffile's zarr
            # view reads only the strips or tiles inside the box.
            return np.asarray(self._zarr_store()[tuple(region)]).astype(self.dtype, copy=False)
        ranges = [np.arange(s.start, s.stop) for s in region[:n_lead]]
        indices = (np.ravel_multi_index(np.ix_(*ranges), self.lead_shape).ravel() if n_lead
                   else np.zeros(1, np.int64))
        out = np.empty(shape, self.dtype)
        flat = out.reshape(len(indices), *(s.stop - s.start for s in in_page))
        rows_only = all(s.start == 0 and s.stop == n for s, n in zip(in_page[1:], self.page_shape[1:]))
        if whole_pages:
            self._read_pages(indices, flat)
        elif rows_only and all(part.dataoffset is not None for part in self.series):
            # contiguous pages: a band of whole rows is one read per page
            row_bytes = self.page_bytes // self.page_shape[0]
            per = self.series[0].pages
            for k, index in enumerate(indices):
                part, local = divmod(int(index), per)
                self._read_contiguous(self.series[part].dataoffset + local * self.page_bytes
                                      + in_page[0].start * row_bytes, flat[k])
        else:
            page = np.empty((1, *self.page_shape), self.dtype)
            for k, index in enumerate(indices):
                self._read_pages(np.array([index]), page)
                flat[k] = page[(0, *in_page)]
        return out

    def close(self) -> None:
        self._file.close()
        self.tif.close()

    def __enter__(self) -> _TiffSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class _DirectorySource:
    """A folder of per-slice TIFFs, sorted by name (natural order), stacked along a new axis.

    The new axis is z unless the override names it (the override's first letter) or the files
    are stacks themselves (then t). Every file is validated before anything is written.
    """

    def __init__(self, path: Path, axes: str | None = None, *,
                 check_dtype: Callable[[np.dtype], str | None] | None = None,
                 max_page_bytes: int = _BLOCK_BYTES) -> None:
        _check_path(path, "folder")
        self.path = path
        files = [p for p in path.iterdir() if p.suffix.lower() in _TIFF_SUFFIXES and not p.name.startswith(".")]
        if not files:
            raise TiffError(f"{path}: folder holds no TIFF files (*.tif, *.tiff)")
        self.files = sorted(files, key=lambda p: _natural_key(p.name))
        first = None
        self.size = 0
        for file in self.files:
            with _TiffSource(file, check_dtype=check_dtype, max_page_bytes=max_page_bytes) as source:
                if first is None:
                    first = source
                    self.page_shape, self.dtype = source.shape, source.dtype
                    self.summary = {"first_file": source.summary}
                    self.sizes, self.units = source.sizes, source.units
                    self.warnings = list(source.warnings)
                elif (source.shape, source.dtype) != (self.page_shape, self.dtype):
                    raise TiffError(f"{path}: slice {file.name} is {source.shape} {source.dtype} but "
                                    f"{self.files[0].name} is {self.page_shape} {self.dtype}; all slices must match")
                self.size += source.size
        self.shape = (len(self.files), *self.page_shape)
        if axes:
            self.axes = _override_axes(axes, path, len(self.shape))
        else:
            stack_axis = "z" if "z" not in first.axes else "t"
            if stack_axis in first.axes:
                raise TiffError(f"{path}: slices already have axes {first.axes!r}; set 'axes' for this stack")
            self.axes = stack_axis + first.axes
        self.tiff_axes = "I" + first.tiff_axes
        self._options = {"check_dtype": check_dtype, "max_page_bytes": max_page_bytes}
        self.summary.update({"kind": "directory", "files": len(self.files), "first": self.files[0].name,
                             "last": self.files[-1].name})

    def read(self, region: Sequence[slice]) -> np.ndarray:
        out = np.empty(tuple(s.stop - s.start for s in region), self.dtype)
        for k, index in enumerate(range(region[0].start, region[0].stop)):
            with _TiffSource(self.files[index], **self._options) as source:
                out[k] = source.read(region[1:])
        return out

    def sha256(self) -> str:
        """SHA-256 of the ``sha256sum``-style manifest ("<sha256>  <name>" lines, stacking order)."""
        manifest = "".join(f"{sha256_file(f)}  {f.name}\n" for f in self.files)
        return hashlib.sha256(manifest.encode()).hexdigest()

    def close(self) -> None:
        pass

    def __enter__(self) -> _DirectorySource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_source(path: Path, axes: str | None = None, **kwargs) -> _TiffSource | _DirectorySource:
    _check_path(path)
    if path.is_dir():
        return _DirectorySource(path, axes, **kwargs)
    return _TiffSource(path, axes, **kwargs)


def _source_sha256(source) -> str:
    return source.sha256() if isinstance(source, _DirectorySource) else sha256_file(source.path)


# --- pyramid planning and blockwise writing --------------------------------------------------

@dataclass
class _Level:
    """One resolution level: shape, chunks and block extents (in its own pixels), and the
    downsampling factors relative to the previous level (1 or 2 per axis)."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    factors: tuple[int, ...]
    block: tuple[int, ...]
    array: zarr.Array | None = None


def _pyramid_factors(axes: str, shape: Sequence[int], scale: Sequence[float],
                     min_size: int = _PYRAMID_MIN_SIZE, max_levels: int = 16) -> list[tuple[int, ...]]:
    """Per-level factors: 2x in y/x until both are <= ``min_size``; z too when that keeps voxels
    closest to isotropic (z spacing <= sqrt(2) x the y/x spacing)."""
    factors = []
    shape, scale = list(shape), list(scale)
    iy, ix = axes.index("y"), axes.index("x")
    while max(shape[iy], shape[ix]) > min_size and len(factors) < max_levels:
        level = [1] * len(axes)
        level[iy] = level[ix] = 2
        if "z" in axes:
            iz = axes.index("z")
            if shape[iz] > 1 and scale[iz] <= math.sqrt(2) * min(scale[iy], scale[ix]):
                level[iz] = 2
        factors.append(tuple(level))
        shape = [-(-n // f) for n, f in zip(shape, level)]
        scale = [s * f for s, f in zip(scale, level)]
    return factors


def _plan_levels(axes: str, shape: Sequence[int], chunks: Sequence[int], itemsize: int,
                 factors: list[tuple[int, ...]], block_bytes: int) -> list[_Level]:
    """Levels with block extents that nest: a block of level L covers whole blocks of L-1.

    Level 0 blocks are one chunk in t/c/z and, in y/x, the whole plane when the block fits
    ``block_bytes``, else the chunk times a power of two (y first, then x); blocks of small
    planes then take 2, 4, ... chunks along t and z, up to ``block_bytes``. Coarser levels
    halve the extent along downsampled axes, never below one chunk, so that every block
    edge of level L falls on a block edge of level L-1.
    """
    shape, chunks = tuple(shape), tuple(min(c, n) for c, n in zip(chunks, shape))
    iy, ix = axes.index("y"), axes.index("x")
    block = list(chunks)
    base = itemsize * int(np.prod([c for i, c in enumerate(chunks) if i not in (iy, ix)]))

    def fits(by: int, bx: int) -> bool:
        return base * by * bx <= block_bytes

    if fits(shape[iy], shape[ix]):
        block[iy], block[ix] = shape[iy], shape[ix]
    elif fits(chunks[iy], shape[ix]):
        block[ix] = shape[ix]
        while block[iy] * 2 < shape[iy] and fits(block[iy] * 2, shape[ix]):
            block[iy] *= 2
    else:
        while block[ix] * 2 < shape[ix] and fits(chunks[iy], block[ix] * 2):
            block[ix] *= 2
    # small planes: more chunks along t, then z (doubling keeps the levels' blocks nested)
    for name in "tz":
        if name in axes:
            i = axes.index(name)
            while block[i] < shape[i] and itemsize * int(np.prod(block)) * 2 <= block_bytes:
                block[i] *= 2
    levels = [_Level("0", shape, chunks, (1,) * len(axes), tuple(block))]
    for number, level_factors in enumerate(factors, start=1):
        previous = levels[-1]
        new_shape = tuple(-(-n // f) for n, f in zip(previous.shape, level_factors))
        new_chunks = tuple(min(c, n) for c, n in zip(chunks, new_shape))
        new_block = []
        for e, n_prev, n, c, f in zip(previous.block, previous.shape, new_shape, new_chunks, level_factors):
            if e >= n_prev or c >= n:
                new_block.append(n)
            else:
                new_block.append(min(n, max(c, e // f)))
        levels.append(_Level(str(number), new_shape, new_chunks, level_factors, tuple(new_block)))
    return levels


def _blocks(level: _Level, bounds: Sequence[tuple[int, int]]) -> Iterator[tuple[tuple[int, int], ...]]:
    """The blocks of ``level`` inside ``bounds`` (which are aligned on its block grid)."""
    ranges = []
    for (lo, hi), e, n in zip(bounds, level.block, level.shape):
        hi = min(hi, n)
        ranges.append([(s, min(s + e, hi)) for s in range(lo, hi, e)])
    return itertools.product(*ranges)


def _pair_sum(plane: np.ndarray, axis: int, start: int, stop: int, size: int) -> tuple[np.ndarray, int]:
    """Sums of neighbour pairs along ``axis`` of rows ``start:stop`` of an axis of ``size``.

    A pair split between two blocks gets a zero for its missing half (the other block adds
    it); the last row of an odd-sized axis pairs with itself. Returns the sums and the index
    of the first pair.
    """
    front = start % 2
    back = (stop - start + front) % 2
    if front or back:
        parts = []
        if front:
            parts.append(np.zeros_like(plane.take([0], axis=axis)))
        parts.append(plane)
        if back:
            last = plane.take([plane.shape[axis] - 1], axis=axis)
            parts.append(last if stop == size else np.zeros_like(last))
        plane = np.concatenate(parts, axis=axis)
    even = [slice(None)] * plane.ndim
    odd = [slice(None)] * plane.ndim
    even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
    return plane[tuple(even)] + plane[tuple(odd)], (start - front) // 2


def _accumulate_mean(acc: np.ndarray, origin: Sequence[int], data: np.ndarray,
                     region: Sequence[tuple[int, int]], factors: Sequence[int], shape: Sequence[int]) -> None:
    """Add the 2x(2x2) block sums of ``data`` (a block of the finer level at ``region``) into
    ``acc`` (sums for the coarser level, starting at ``origin``), one output plane at a time."""
    lead = data.ndim - 2
    parent_ranges = [range(s // f, (e - 1) // f + 1) for (s, e), f in zip(region[:lead], factors[:lead])]
    offsets = list(itertools.product(*[range(f) for f in factors[:lead]]))
    for parent in itertools.product(*parent_ranges):
        plane = None
        for offset in offsets:
            index = []
            for a in range(lead):
                child = min(parent[a] * factors[a] + offset[a], shape[a] - 1)
                if not region[a][0] <= child < region[a][1]:
                    break
                index.append(child - region[a][0])
            else:
                source = data[tuple(index)]
                if plane is None:
                    plane = source.astype(acc.dtype)
                else:
                    plane += source
        if plane is None:
            continue
        starts = []
        for axis, a in enumerate((lead, lead + 1)):
            (s, e), f = region[a], factors[a]
            if f == 2:
                plane, first = _pair_sum(plane, axis, s, e, shape[a])
            else:
                first = s
            starts.append(first - origin[a])
        target = acc[tuple(p - o for p, o in zip(parent, origin[:lead]))]
        target[starts[0]:starts[0] + plane.shape[0], starts[1]:starts[1] + plane.shape[1]] += plane


def _take_nearest(out: np.ndarray, origin: Sequence[int], data: np.ndarray,
                  region: Sequence[tuple[int, int]], factors: Sequence[int]) -> None:
    """Copy every f-th element of ``data`` into ``out``: stride subsampling, never mixing ids."""
    source, target = [], []
    for (s, e), f, o in zip(region, factors, origin):
        first = -(-s // f)
        last = -(-e // f)
        source.append(slice(first * f - s, e - s, f))
        target.append(slice(first - o, last - o))
    out[tuple(target)] = data[tuple(source)]


class _PyramidWriter:
    """Writes level 0 from ``read`` block by block and builds every coarser level from the
    blocks while they are in memory, so that the stack is read once and never held whole.

    Blocks are visited depth first: a block of level L is produced from the blocks of level
    L-1 it covers, each written as soon as it is complete; at most one block per level is in
    memory (plus one write in flight). Building the pyramid from the finished level 0 instead
    would decompress all of it again: blosc-zstd through zarr reads ~0.4 GB/s here, ~10 s
    more for a 4 GB stack whose whole ingest with pyramid takes ~15 s.
    """

    def __init__(self, levels: list[_Level], read: Callable[[Sequence[slice]], np.ndarray], dtype: np.dtype,
                 method: str, check: Callable[[np.ndarray], None] | None = None) -> None:
        self.levels, self.read, self.dtype, self.method, self.check = levels, read, np.dtype(dtype), method, check
        if self.dtype.kind == "f":
            self.acc_dtype = np.float32
        else:
            self.acc_dtype = np.uint16 if self.dtype.itemsize == 1 else np.uint32
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ingest-write")
        self._pending: Future | None = None

    def run(self) -> None:
        top = len(self.levels) - 1
        try:
            for region in _blocks(self.levels[top], [(0, n) for n in self.levels[top].shape]):
                self._produce(top, region)
            self._wait()
        finally:
            self._pool.shutdown(wait=True)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, level: _Level, region, data: np.ndarray) -> None:
        self._wait()  # one write in flight: the next block is read while this one compresses
        self._pending = self._pool.submit(_write_pieces, level.array, region, data)

    def _produce(self, number: int, region: tuple[tuple[int, int], ...]) -> np.ndarray:
        level = self.levels[number]
        if number == 0:
            data = self.read([slice(s, e) for s, e in region])
            if self.check is not None:
                self.check(data)
        else:
            finer = self.levels[number - 1]
            shape = tuple(e - s for s, e in region)
            origin = tuple(s for s, _ in region)
            bounds = [(s * f, e * f) for (s, e), f in zip(region, level.factors)]
            if self.method == "mean":
                acc = np.zeros(shape, self.acc_dtype)
            else:
                acc = np.empty(shape, self.dtype)
            for child in _blocks(finer, bounds):
                child_data = self._produce(number - 1, child)
                if self.method == "mean":
                    _accumulate_mean(acc, origin, child_data, child, level.factors, finer.shape)
                else:
                    _take_nearest(acc, origin, child_data, child, level.factors)
                del child_data
            data = self._finish(acc, int(np.prod(level.factors))) if self.method == "mean" else acc
        self._write(level, region, data)
        return data

    def _finish(self, acc: np.ndarray, count: int) -> np.ndarray:
        if self.dtype.kind == "f":
            acc *= np.float32(1.0 / count)
            return acc
        acc += count // 2  # round half up
        acc >>= count.bit_length() - 1
        return acc.astype(self.dtype)


_WRITE_BYTES = 64 << 20


def _write_pieces(array: zarr.Array, region: Sequence[tuple[int, int]], data: np.ndarray) -> None:
    """Write ``data`` at ``region`` (chunk-aligned) in pieces of whole chunks of <= 64 MiB.

    zarr copies every chunk it encodes (and numcodecs allocates a full-size output buffer),
    so one write of a whole block would briefly need twice the block again; a piece of a few
    chunks still keeps both cores compressing.
    """
    if data.nbytes <= _WRITE_BYTES:
        array[tuple(slice(s, e) for s, e in region)] = data
        return
    split = [a for a, ((s, e), c) in enumerate(zip(region, array.chunks)) if e - s > c]
    if not split:
        array[tuple(slice(s, e) for s, e in region)] = data
        return
    axis = split[0]  # the outermost axis with more than one chunk
    (start, stop), chunk = region[axis], array.chunks[axis]
    slab = data.nbytes * chunk // (stop - start)  # bytes of one chunk's thickness along axis
    step = chunk * max(1, _WRITE_BYTES // max(slab, 1))
    for first in range(start, stop, step):
        last = min(first + step, stop)
        piece = list(region)
        piece[axis] = (first, last)
        local = [slice(None)] * data.ndim
        local[axis] = slice(first - start, last - start)
        _write_pieces(array, piece, data[tuple(local)])


def _datasets(levels: list[_Level], axes: str, scale: Sequence[float], method: str) -> list[dict]:
    datasets = []
    cumulative = [1] * len(axes)
    for level in levels:
        cumulative = [c * f for c, f in zip(cumulative, level.factors)]
        transforms = [{"type": "scale", "scale": [float(s * c) for s, c in zip(scale, cumulative)]}]
        if method == "mean" and any(c > 1 for c in cumulative):
            # the mean of f pixels sits at the centre of the f pixels it averages
            transforms.append({"type": "translation",
                               "translation": [float(s * (c - 1) / 2) for s, c in zip(scale, cumulative)]})
        datasets.append({"path": level.path, "coordinateTransformations": transforms})
    return datasets


_METHODS = {
    "mean": {"type": "local_mean", "metadata": {
        "description": "mean of each 2x2 (y, x) or 2x2x2 (z, y, x) block, integers rounded half up; "
                       "the last row of an odd-sized axis counts twice", "method": "unet_core.io.ingest"}},
    "nearest": {"type": "nearest", "metadata": {
        "description": "every second pixel (stride subsampling): label ids are never mixed",
        "method": "unet_core.io.ingest"}},
}


def _write_image(group: zarr.Group, source, axes: str, levels: list[_Level], scale, units, name: str, *,
                 method: str, attributes: dict, write_empty_chunks: bool,
                 check: Callable[[np.ndarray], None] | None = None) -> None:
    """Create the arrays of ``levels`` in ``group`` and stream ``source`` into them."""
    for level in levels:
        level.array = group.create_array(level.path, shape=level.shape, dtype=source.dtype, chunks=level.chunks,
                                         compressors=COMPRESSOR, fill_value=0,
                                         chunk_key_encoding={"name": "v2", "separator": "/"},
                                         config={"write_empty_chunks": write_empty_chunks})
    order = [source.axes.index(a) for a in axes]
    inverse = [axes.index(a) for a in source.axes]

    def read(region: Sequence[slice]) -> np.ndarray:
        data = source.read([region[i] for i in inverse])
        return data.transpose(order)

    _PyramidWriter(levels, read, source.dtype, method, check).run()
    group.attrs.update({
        "multiscales": _multiscales(axes, scale, name, units, _datasets(levels, axes, scale, method),
                                    _METHODS[method] if len(levels) > 1 else None),
        **attributes,
    })


# --- ingest -----------------------------------------------------------------------------------

def _resolve_chunks(chunks: Sequence[int] | None, axes: str, shape: Sequence[int], path: Path) -> tuple[int, ...]:
    if chunks is None:
        return default_chunks(axes, shape)
    chunks = [int(c) for c in chunks]
    if len(chunks) > len(axes) or any(c < 1 for c in chunks):
        raise ValueError(f"{path}: chunks {tuple(chunks)} do not fit axes {axes!r} of shape {tuple(shape)} "
                         f"(give at most {len(axes)} positive sizes, in NGFF order)")
    # fewer sizes than axes apply to the last axes (e.g. y, x); the others keep their defaults
    resolved = list(default_chunks(axes, shape))
    resolved[len(axes) - len(chunks):] = chunks
    return tuple(min(c, n) for c, n in zip(resolved, shape))


def _image_dtype_problem(dtype: np.dtype) -> str | None:
    if dtype.type not in _SUPPORTED_DTYPES:
        return f"unsupported pixel type {dtype}; supported: uint8, uint16, float32"
    return None


def _label_dtype_problem(dtype: np.dtype) -> str | None:
    if not np.issubdtype(dtype, np.integer):
        return f"labels must be integers (instance ids), got {dtype}"
    return None


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
            raise TiffError(f"{path}: subset names axes {sorted(unknown)} that the stack {source.axes!r} does not have")
        self.source = source
        self.starts, shape = [], []
        for axis, size in zip(source.axes, source.shape):
            start, stop, step = subset.get(axis, slice(None)).indices(size)
            if step != 1 or stop <= start:
                raise TiffError(f"{path}: subset {axis}={start}:{stop} is empty or strided for an axis of {size}")
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


def parse_subset(text: str | None) -> dict[str, slice]:
    """``"z=0:20,t=5:"`` -> ``{"z": slice(0, 20), "t": slice(5, None)}`` (NGFF letters)."""
    subset: dict[str, slice] = {}
    for part in filter(None, (text or "").replace(" ", "").split(",")):
        axis, _, bounds = part.partition("=")
        start, colon, stop = bounds.partition(":")
        if axis not in AXIS_ORDER or not colon or not (start or "0").isdigit() or not (stop or "0").isdigit():
            raise ValueError(f"subset {text!r}: expected entries like 'z=0:20' (NGFF axis letter, slice bounds)")
        subset[axis] = slice(int(start) if start else None, int(stop) if stop else None)
    return subset


def ingest(input_path: str | Path, output_path: str | Path, *, labels_path: str | Path | None = None,
           axes: str | None = None, chunks: Sequence[int] | None = None, pyramid: bool = True,
           block_bytes: int = _BLOCK_BYTES, subset: Mapping[str, slice] | str | None = None) -> Path:
    """Convert a raw stack (and optional instance ground truth) into an OME-Zarr image.

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

    Returns
    -------
    Path
        ``output_path``.

    Raises
    ------
    TiffError
        The input cannot be ingested (not a TIFF, truncated or damaged, no pages, pages of
        different shapes, unsupported pixel type, unreadable, labels of another shape); the
        message names the file and the problem, and no output is left behind.

    Examples
    --------
    >>> import numpy as np, tifffile, tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(folder / "in.tif", np.zeros((3, 16, 16), np.uint8), imagej=True,
    ...                  metadata={"axes": "ZYX", "spacing": 2.0})
    >>> image = open_image(ingest(folder / "in.tif", folder / "out.ome.zarr"))
    >>> image.axes, image.shape, image.scale["z"]
    ('zyx', (3, 16, 16), 2.0)
    """
    input_path, output_path = Path(input_path), Path(output_path)
    subset = parse_subset(subset) if isinstance(subset, str) else dict(subset or {})
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(_open_source(input_path, axes, max_page_bytes=block_bytes))
        if subset:
            source = _Subset(source, subset, input_path)
        out_axes = canonical_axes(source.axes)
        out_shape = tuple(source.shape[source.axes.index(a)] for a in out_axes)
        chunk_shape = _resolve_chunks(chunks, out_axes, out_shape, input_path)
        label_source = None
        if labels_path is not None:
            labels_path = Path(labels_path)
            label_source = stack.enter_context(_open_source(
                labels_path, None, check_dtype=_label_dtype_problem, max_page_bytes=block_bytes))
            expected = tuple(n for a, n in zip(out_axes, out_shape) if a != "c")
            if subset and len(label_source.shape) == len(expected):
                # labels are taken in the image's NGFF order, whatever their own metadata says
                label_source.axes = out_axes.replace("c", "")
                label_source = _Subset(label_source, {a: r for a, r in subset.items() if a != "c"}, labels_path)
            if tuple(label_source.shape) != expected:
                raise TiffError(f"{labels_path}: labels shape {tuple(label_source.shape)} differs from the image "
                                f"{input_path} (expected {expected}, the image {out_axes!r} {out_shape} "
                                f"without channels)")
            # labels are taken in the image's NGFF order, whatever their own metadata says
            label_source.axes = out_axes.replace("c", "")
        request = {"layout": _INGEST_LAYOUT, "axes": out_axes, "shape": list(out_shape),
                   "chunks": list(chunk_shape), "pyramid": bool(pyramid),
                   "subset": {a: [r.start, r.stop] for a, r in subset.items()}}

        with ThreadPoolExecutor(2, thread_name_prefix="ingest-hash") as hasher:
            # hashing runs beside the pixel copy (hashlib releases the GIL)
            digest = hasher.submit(_source_sha256, source)
            label_digest = hasher.submit(_source_sha256, label_source) if label_source is not None else None
            if os.path.lexists(output_path):
                current = {"sha256": digest.result(), "labels_sha256": label_digest and label_digest.result(),
                           "ingest": request}
                if _is_current(_existing_provenance(output_path), current):
                    _LOG.info("%s is up to date with %s; nothing to do", output_path, input_path)
                    return output_path
            scale = [source.sizes.get(a, 1.0) for a in out_axes]
            units = {a: u for a, u in source.units.items() if a in out_axes}
            factors = _pyramid_factors(out_axes, out_shape, scale) if pyramid else []
            levels = _plan_levels(out_axes, out_shape, chunk_shape, source.dtype.itemsize, factors, block_bytes)
            started = datetime.datetime.now(datetime.timezone.utc)
            with atomic_directory(output_path) as tmp:
                group = zarr.open_group(tmp, mode="w", zarr_format=2)
                _write_image(group, source, out_axes, levels, scale, units, output_path.name, method="mean",
                             attributes={}, write_empty_chunks=True)
                provenance = {
                    "source": str(input_path), "kind": "directory" if isinstance(source, _DirectorySource) else "tiff",
                    "size_bytes": source.size, "sha256": digest.result(), "tiff": source.summary,
                    "ingest": {"request": request, "axes_override": axes, "levels": len(levels),
                               "block_bytes": block_bytes, "started": started.isoformat(timespec="seconds"),
                               "tifffile": tifffile.__version__, "zarr": zarr.__version__},
                }
                if isinstance(source, _DirectorySource):
                    provenance["sha256_of"] = "sha256sum-style manifest of the files in stacking order"
                if source.warnings:
                    provenance["warnings"] = source.warnings[:20]
                if label_source is not None:
                    _write_labels(group, label_source, labels_path, out_axes, levels, scale, units, block_bytes)
                    provenance["labels"] = {"source": str(labels_path), "size_bytes": label_source.size,
                                            "sha256": label_digest.result(), "tiff": label_source.summary}
                group.attrs["unet_core"] = {"provenance": provenance}
    return output_path


def _write_labels(group: zarr.Group, source, path: Path, image_axes: str, image_levels: list[_Level],
                  scale: Sequence[float], units: Mapping[str, str], block_bytes: int) -> None:
    """The NGFF label image ``labels/ground_truth``, with the image's levels (stride subsampled)."""
    keep = [i for i, a in enumerate(image_axes) if a != "c"]
    axes = "".join(image_axes[i] for i in keep)
    chunks = tuple(image_levels[0].chunks[i] for i in keep)
    factors = [tuple(level.factors[i] for i in keep) for level in image_levels[1:]]
    levels = _plan_levels(axes, tuple(image_levels[0].shape[i] for i in keep), chunks, source.dtype.itemsize,
                          factors, block_bytes)
    labels = group.require_group("labels")
    labels.attrs["labels"] = ["ground_truth"]
    sub = labels.require_group("ground_truth")
    signed = source.dtype.kind == "i"

    def check(block: np.ndarray) -> None:
        if signed and block.size and block.min() < 0:
            raise TiffError(f"{path}: labels hold negative ids ({int(block.min())}); instance ids must be >= 0")

    _write_image(sub, source, axes, levels, [scale[i] for i in keep], units, "ground_truth", method="nearest",
                 attributes={"image-label": {"version": NGFF_VERSION, "source": {"image": "../../"}}},
                 write_empty_chunks=False, check=check)
