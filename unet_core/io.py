"""Reading microscopy TIFF stacks and reading/writing OME-Zarr images, atomically.

Format: OME-NGFF 0.4 on zarr format 2, blosc-zstd compressed. NGFF 0.4 / zarr v2 is the
combination that every current reader opens (napari + napari-ome-zarr, ome-zarr-py, Fiji's
n5-zarr/MoBIE, neuroglancer, vizarr); NGFF 0.5 needs zarr v3, which several of them still
read only partially.

Axes use NGFF names and order: a subset of ``t, c, z, y, x`` in that order.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numcodecs
import numpy as np
import tifffile
import zarr

__all__ = [
    "NGFF_VERSION", "Image", "open_image", "canonical_axes", "atomic_image", "ingest",
    "intensity_statistics", "read_labels", "sha256_file", "TiffError",
]

NGFF_VERSION = "0.4"
AXIS_ORDER = "tczyx"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_TIFF_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x"}
_SUPPORTED_DTYPES = (np.uint8, np.uint16, np.float32)
_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


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


def _multiscales(axes: str, scale: Sequence[float], name: str, units: Mapping[str, str] | None = None) -> list[dict]:
    units = units or {}
    axis_meta = []
    for axis in axes:
        meta = {"name": axis, "type": _AXIS_TYPES[axis]}
        if axis in units:
            meta["unit"] = units[axis]
        axis_meta.append(meta)
    return [{
        "version": NGFF_VERSION,
        "name": name,
        "axes": axis_meta,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(map(float, scale))}]}],
    }]


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


def _temporary_path(target: Path) -> Path:
    return target.parent / f".{target.name}.partial-{os.getpid()}"


def _publish(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it to ``target`` on success.

    On any error the temporary directory is removed and an existing ``target`` is left
    untouched, so an interrupted job never leaves a result that looks complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _create_image(root: Path | zarr.Group, axes: str, shape, dtype, scale, chunks, name, attributes=None,
                  units=None) -> tuple[zarr.Group, zarr.Array]:
    group = root if isinstance(root, zarr.Group) else zarr.open_group(root, mode="w", zarr_format=2)
    chunks = tuple(chunks) if chunks is not None else default_chunks(axes, shape)
    array = group.create_array("0", shape=tuple(shape), dtype=dtype, chunks=chunks,
                               compressors=_COMPRESSOR, fill_value=0,
                               chunk_key_encoding={"name": "v2", "separator": "/"})
    group.attrs.update({"multiscales": _multiscales(axes, scale, name, units), **(attributes or {})})
    return group, array


@contextlib.contextmanager
def atomic_image(target: str | Path, axes: str, shape: Sequence[int], *, dtype, scale: Sequence[float],
                 chunks: Sequence[int] | None = None, attributes: dict | None = None) -> Iterator[_Writer]:
    """Create an OME-Zarr image at a temporary path; publish it at ``target`` on success."""
    target = Path(target)
    with atomic_directory(target) as tmp:
        _, array = _create_image(tmp, axes, shape, dtype, scale, chunks, target.name, attributes)
        yield _Writer(array, axes)


def intensity_statistics(image: Image) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over the whole image, streamed by chunks."""
    data = da.from_zarr(image.array).astype(np.float64)
    reduce_axes = tuple(i for i, a in enumerate(image.axes) if a != "c")
    mean = data.mean(axis=reduce_axes)
    std = data.std(axis=reduce_axes)
    mean, std = da.compute(mean, std)
    mean, std = np.atleast_1d(mean), np.atleast_1d(std)
    std = np.where(std > 0, std, 1.0)
    return [float(m) for m in mean], [float(s) for s in std]


# --- TIFF ingest --------------------------------------------------------------------------

def _tiff_axes(series_axes: str, path: Path, override: str | None, ndim: int) -> str:
    if override:
        axes = override.lower()
        if len(axes) != ndim or set(axes) - set(AXIS_ORDER) or len(set(axes)) != ndim:
            raise TiffError(f"{path}: axes override {override!r} does not fit an array with {ndim} axes "
                            f"(use {ndim} distinct letters from 'tczyx')")
        return axes
    axes = ""
    for letter in series_axes:
        if letter in _TIFF_AXES:
            axes += _TIFF_AXES[letter]
        elif letter in "QI" and "z" not in axes and "Z" not in series_axes:
            axes += "z"  # a plain multi-page TIFF: pages are a stack
        elif letter in "QI" and "t" not in axes and "T" not in series_axes:
            axes += "t"
        else:
            raise TiffError(f"{path}: cannot map TIFF axes {series_axes!r} to t/c/z/y/x; set 'axes' for this stack")
    if len(set(axes)) != len(axes):
        raise TiffError(f"{path}: TIFF axes {series_axes!r} repeat an axis; set 'axes' for this stack")
    return axes


def _pixel_sizes(tif: tifffile.TiffFile) -> tuple[dict[str, float], dict[str, str]]:
    sizes: dict[str, float] = {}
    units: dict[str, str] = {}
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            for axis in "zyx":
                value = pixels.get(f"PhysicalSize{axis.upper()}")
                if value:
                    sizes[axis] = float(value)
                    units[axis] = {"µm": "micrometer", "nm": "nanometer"}.get(
                        pixels.get(f"PhysicalSize{axis.upper()}Unit", "µm"), "micrometer")
        except (ET.ParseError, StopIteration, ValueError):
            pass
    elif tif.is_imagej and tif.imagej_metadata:
        meta = tif.imagej_metadata
        page = tif.pages.first
        for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
            value = page.tags.get(tag)
            if value is not None and value.value[0]:
                sizes[axis] = value.value[1] / value.value[0]
        if "spacing" in meta:
            sizes["z"] = float(meta["spacing"])
        unit = meta.get("unit")
        if unit in ("micron", "um", "µm", "\\u00B5m"):
            units.update({a: "micrometer" for a in sizes})
    return sizes, units


def _open_tiff_series(path: Path):
    if not path.exists():
        raise TiffError(f"{path}: file does not exist")
    if not os.access(path, os.R_OK):
        raise TiffError(f"{path}: file is not readable (permissions)")
    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError, IndexError) as error:
        raise TiffError(f"{path}: not a readable TIFF file ({error})") from error
    if not tif.series or not len(tif.pages):
        tif.close()
        raise TiffError(f"{path}: TIFF has no image pages")
    return tif, tif.series[0]


def _check_pages(path: Path, tif: tifffile.TiffFile, series) -> None:
    shapes = {page.shape for page in tif.pages}
    if len(shapes) > 1:
        raise TiffError(f"{path}: pages have different shapes {sorted(shapes)}; a stack needs equal pages")
    dtype = np.dtype(series.dtype)
    if dtype.type not in _SUPPORTED_DTYPES:
        raise TiffError(f"{path}: unsupported pixel type {dtype}; supported: uint8, uint16, float32")


def _tiff_array(path: Path, tif, series) -> da.Array:
    store = series.aszarr()
    array = zarr.open(store, mode="r")
    return da.from_zarr(array if isinstance(array, zarr.Array) else array["0"])


def ingest(input_path: str | Path, output_path: str | Path, *, labels_path: str | Path | None = None,
           axes: str | None = None, chunks: Sequence[int] | None = None) -> Path:
    """Convert a TIFF stack (and optional instance ground truth) into an OME-Zarr image.

    Reads chunk by chunk through tifffile's zarr interface (memory is set by the chunks, not
    the stack), writes NGFF 0.4 / zarr v2 at a temporary path and publishes it by rename.
    Ground truth goes to ``labels/ground_truth`` as an NGFF label image.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    tif, series = _open_tiff_series(input_path)
    with tif:
        _check_pages(input_path, tif, series)
        src_axes = _tiff_axes(series.axes, input_path, axes, len(series.shape))
        sizes, units = _pixel_sizes(tif)
        data = _tiff_array(input_path, tif, series)
        out_axes = canonical_axes(src_axes)
        data = data.transpose([src_axes.index(a) for a in out_axes])
        provenance = {
            "source": str(input_path), "size_bytes": input_path.stat().st_size,
            "sha256": sha256_file(input_path),
            "tiff": {"axes": series.axes, "shape": list(series.shape), "dtype": str(series.dtype),
                     "is_ome": bool(tif.is_ome), "is_imagej": bool(tif.is_imagej), "is_bigtiff": bool(tif.is_bigtiff),
                     "pages": len(tif.pages)},
        }
        label_data = None
        if labels_path is not None:
            label_data = _read_labels_tiff(Path(labels_path), input_path, out_axes, data.shape)
            provenance["labels"] = {"source": str(labels_path), "sha256": sha256_file(labels_path)}
        scale = [sizes.get(a, 1.0) for a in out_axes]
        with atomic_directory(output_path) as tmp:
            group, array = _create_image(tmp, out_axes, data.shape, data.dtype, scale, chunks,
                                         output_path.name, {"unet_core": {"provenance": provenance}}, units)
            try:
                da.store(data.rechunk(array.chunks), array, lock=False)
            except (ValueError, OSError, RuntimeError, tifffile.TiffFileError) as error:
                raise TiffError(f"{input_path}: failed reading pixel data ({error})") from error
            if label_data is not None:
                _write_labels(group, label_data, out_axes, scale, units)
    return output_path


def _read_labels_tiff(path: Path, image_path: Path, image_axes: str, image_shape) -> da.Array:
    tif, series = _open_tiff_series(path)
    with tif:
        data = _tiff_array(path, tif, series).compute()
    expected = tuple(s for a, s in zip(image_axes, image_shape) if a != "c")
    if data.shape != expected:
        raise TiffError(f"{path}: labels shape {data.shape} differs from the image {image_path} "
                        f"(expected {expected}, the image without channels)")
    if not np.issubdtype(data.dtype, np.integer):
        raise TiffError(f"{path}: labels must be integers (instance ids), got {data.dtype}")
    return da.from_array(data)


def _write_labels(group: zarr.Group, data: da.Array, image_axes: str, scale, units) -> None:
    axes = image_axes.replace("c", "")
    label_scale = [s for a, s in zip(image_axes, scale) if a != "c"]
    labels = group.require_group("labels")
    labels.attrs["labels"] = ["ground_truth"]
    sub = labels.require_group("ground_truth")
    _, array = _create_image(sub, axes, data.shape, data.dtype, label_scale, None, "ground_truth",
                             {"image-label": {"version": NGFF_VERSION, "source": {"image": "../../"}}}, units)
    da.store(data.rechunk(array.chunks), array, lock=False)
