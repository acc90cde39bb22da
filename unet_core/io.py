"""OME-Zarr images: the layout this package reads and writes, and creating them atomically.

Format: OME-NGFF 0.4 on zarr format 2, blosc-zstd compressed. NGFF 0.4 / zarr v2 is the
combination that every current reader opens (napari + napari-ome-zarr, ome-zarr-py, Fiji's
n5-zarr/MoBIE, neuroglancer, vizarr); NGFF 0.5 needs zarr v3, which several of them still
read only partially.

Axes use NGFF names and order: a subset of ``t, c, z, y, x`` in that order; every image has
``y`` and ``x``. Level 0 of an image is the array at path ``"0"``; ingest
(:mod:`unet_core.ingest`) adds the pyramid levels ``"1"``, ``"2"``, ... and the ground truth as
the NGFF label image ``labels/ground_truth``. See ``docs/ingest.md`` for the layout and the
provenance fields.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from .atomic import atomic_directory

__all__ = ["NGFF_VERSION", "AXIS_ORDER", "COMPRESSOR", "FAST_COMPRESSOR", "Image", "open_image", "read_labels",
           "canonical_axes", "default_chunks", "multiscales", "create_image", "atomic_image", "sha256_file"]

NGFF_VERSION = "0.4"
AXIS_ORDER = "tczyx"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
# The compressor of every array this package writes, unless it says otherwise.
COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
# For outputs written while a model computes (probabilities): zstd level 1 compresses float16
# probabilities (ISBI 2012, 10 MiB) in 53 ms against 150 ms at level 5, into 2 % more bytes
# (ratio 1.47 against 1.50; lz4 is faster still but 1.26). On a CPU node every millisecond
# spent compressing is taken from the forward passes (bench/predict.py (a)).
FAST_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.BITSHUFFLE)
_LOG = logging.getLogger(__name__)


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


def multiscales(axes: str, scale: Sequence[float], name: str, units: Mapping[str, str] | None = None,
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
    group.attrs.update({"multiscales": multiscales(axes, scale, name, units), **(attributes or {})})
    return group, array


@contextlib.contextmanager
def atomic_image(target: str | Path, axes: str, shape: Sequence[int], *, dtype, scale: Sequence[float],
                 chunks: Sequence[int] | None = None, attributes: dict | None = None) -> Iterator[_Writer]:
    """Create an OME-Zarr image at a temporary path; publish it at ``target`` on success."""
    target = Path(target)
    with atomic_directory(target) as tmp:
        _, array = create_image(tmp, axes, shape, dtype, scale, chunks, target.name, attributes)
        yield _Writer(array, axes)
