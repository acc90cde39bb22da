"""Raw microscopy stacks as block sources: TIFF, BigTIFF, OME-TIFF, ImageJ hyperstacks and
folders of TIFF planes, with their axes, pixel sizes and metadata (for the provenance).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr

from . import io

__all__ = ["TiffError", "open_source", "DirectorySource", "source_sha256", "image_dtype_problem",
           "label_dtype_problem", "BLOCK_BYTES", "SUPPORTED_DTYPES"]

_LOG = logging.getLogger(__name__)
# Bytes of one block read from the input: one row of chunks (32 z x the whole page) unless
# that is larger, in which case the block is split along y (then x) on chunk boundaries.
BLOCK_BYTES = 128 << 20
# Pixel types an image may have (labels: any integer type).
SUPPORTED_DTYPES = (np.uint8, np.uint16, np.float32)


class TiffError(ValueError):
    """A raw stack that cannot be ingested; the message names the file and the problem."""


_TIFF_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x"}
_TIFF_SUFFIXES = (".tif", ".tiff")


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
    if len(axes) != ndim or set(axes) - set(io.AXIS_ORDER) or len(set(axes)) != ndim:
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
                 max_page_bytes: int = BLOCK_BYTES) -> None:
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
                self._inspect(axes, check_dtype or image_dtype_problem, errors)
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


class DirectorySource:
    """A folder of per-slice TIFFs, sorted by name (natural order), stacked along a new axis.

    The new axis is z unless the override names it (the override's first letter) or the files
    are stacks themselves (then t). Every file is validated before anything is written.
    """

    def __init__(self, path: Path, axes: str | None = None, *,
                 check_dtype: Callable[[np.dtype], str | None] | None = None,
                 max_page_bytes: int = BLOCK_BYTES) -> None:
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
        manifest = "".join(f"{io.sha256_file(f)}  {f.name}\n" for f in self.files)
        return hashlib.sha256(manifest.encode()).hexdigest()

    def close(self) -> None:
        pass

    def __enter__(self) -> DirectorySource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(path: Path, axes: str | None = None, **kwargs) -> _TiffSource | DirectorySource:
    _check_path(path)
    if path.is_dir():
        return DirectorySource(path, axes, **kwargs)
    return _TiffSource(path, axes, **kwargs)


def source_sha256(source) -> str:
    return source.sha256() if isinstance(source, DirectorySource) else io.sha256_file(source.path)


def image_dtype_problem(dtype: np.dtype) -> str | None:
    if dtype.type not in SUPPORTED_DTYPES:
        return f"unsupported pixel type {dtype}; supported: uint8, uint16, float32"
    return None


def label_dtype_problem(dtype: np.dtype) -> str | None:
    if not np.issubdtype(dtype, np.integer):
        return f"labels must be integers (instance ids), got {dtype}"
    return None


