"""OME-Zarr images: the layout this package reads and writes, and creating them atomically.

Formats (:data:`FORMATS`): ``ngff-0.4``, OME-NGFF 0.4 on zarr format 2, the default: the
combination that every current reader opens (napari + napari-ome-zarr, ome-zarr-py, Fiji's
n5-zarr/MoBIE, neuroglancer, vizarr); and ``ngff-0.5``, OME-NGFF 0.5 on zarr format 3, whose
shards hold many chunks in one file (a terabyte in thousands of files instead of millions),
read by ome-zarr-py >= 0.12, zarr-python >= 3, neuroglancer and vizarr, not yet by every
napari/Fiji plugin. Both are blosc-zstd compressed. Every reader here opens both; a stage
writes its output in its input's format. This module owns the layout: which attributes hold
the NGFF metadata (top level in 0.4, under ``ome`` in 0.5), our own ``unet_core`` attribute,
and how arrays are created.

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
from .defaults import choices, default

__all__ = ["FORMATS", "DEFAULT_FORMAT", "AXIS_ORDER", "COMPRESSOR", "FAST_COMPRESSOR", "Image", "open_image",
           "read_labels", "canonical_axes", "default_chunks", "multiscales", "create_image", "atomic_image",
           "sha256_file", "new_group", "group_format", "create_array", "ngff_attributes", "write_regions"]

FORMATS = choices("ingest", "format")
DEFAULT_FORMAT = default("ingest", "format")
_ZARR_FORMAT = {"ngff-0.4": 2, "ngff-0.5": 3}
_NGFF_VERSION = {"ngff-0.4": "0.4", "ngff-0.5": "0.5"}
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
    format: str = DEFAULT_FORMAT

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
        multiscales = _ngff(group)["multiscales"][0]
        axes = "".join(a["name"] for a in multiscales["axes"])
        dataset = multiscales["datasets"][0]
        array = group[dataset["path"]]
    except (KeyError, IndexError, TypeError, FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        raise ValueError(f"{path}: not an OME-Zarr image with multiscales metadata ({error!r})") from error
    scale = {}
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = dict(zip(axes, (float(s) for s in transform["scale"])))
    return Image(path=path, array=array, axes=axes, scale=scale, attrs=dict(group.attrs), format=group_format(group))


def _ngff(group: zarr.Group) -> dict:
    """The NGFF metadata of a group: its attributes (0.4) or their ``ome`` member (0.5)."""
    return group.attrs.get("ome", group.attrs) if group_format(group) == "ngff-0.5" else group.attrs


def group_format(group: zarr.Group) -> str:
    """``ngff-0.5`` for a zarr v3 group, else ``ngff-0.4``."""
    return "ngff-0.5" if group.metadata.zarr_format == 3 else "ngff-0.4"


def new_group(root: str | Path, format: str = DEFAULT_FORMAT) -> zarr.Group:
    """An empty zarr group at ``root`` in the zarr format of ``format``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    return zarr.open_group(root, mode="w", zarr_format=_ZARR_FORMAT[format])


def ngff_attributes(format: str, **ngff) -> dict:
    """Group attributes holding the NGFF metadata ``ngff`` (``multiscales``, ``image-label``,
    ``labels``; without versions) in the layout of ``format``."""
    ngff = {key.replace("_", "-"): value for key, value in ngff.items() if value is not None}
    if format == "ngff-0.5":
        return {"ome": {"version": _NGFF_VERSION[format], **ngff}}
    version = _NGFF_VERSION[format]
    if "multiscales" in ngff:
        ngff["multiscales"] = [{"version": version, **m} for m in ngff["multiscales"]]
    if "image-label" in ngff:
        ngff["image-label"] = {"version": version, **ngff["image-label"]}
    return ngff


def create_array(group: zarr.Group, path: str, *, axes: str, shape, dtype, chunks, shards=None,
                 compressor: numcodecs.abc.Codec | None = None, write_empty_chunks: bool = False) -> zarr.Array:
    """An array of ``group`` in the group's zarr format, zero-filled, blosc-compressed: zarr v2
    with ``/`` chunk keys (NGFF 0.4), or zarr v3 with dimension names and optional ``shards``
    (NGFF 0.5; the shard shape a multiple of ``chunks``)."""
    compressor = compressor or COMPRESSOR
    config = {"write_empty_chunks": write_empty_chunks}
    if group.metadata.zarr_format == 2:
        if shards is not None:
            raise ValueError("shards need NGFF 0.5 (zarr v3); set ingest.format: ngff-0.5")
        return group.create_array(path, shape=tuple(shape), dtype=dtype, chunks=tuple(chunks), compressors=compressor,
                                  fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"}, config=config)
    codec = zarr.codecs.BloscCodec(cname=compressor.cname, clevel=compressor.clevel,
                                   shuffle=_SHUFFLE[compressor.shuffle])
    return group.create_array(path, shape=tuple(shape), dtype=dtype, chunks=tuple(chunks),
                              shards=tuple(shards) if shards is not None else None, compressors=codec, fill_value=0,
                              dimension_names=list(axes), config=config)


_SHUFFLE = {numcodecs.Blosc.NOSHUFFLE: "noshuffle", numcodecs.Blosc.SHUFFLE: "shuffle",
            numcodecs.Blosc.BITSHUFFLE: "bitshuffle"}


def write_regions(array: zarr.Array) -> tuple[int, ...]:
    """The shape of the pieces that concurrent writers may write independently: a shard (two
    writers of one shard would each rewrite it) or, unsharded, a chunk."""
    return tuple(array.shards or array.chunks)


def read_labels(path: str | Path, name: str = "ground_truth") -> Image | None:
    """The ``labels/<name>`` image of an OME-Zarr image, or None when it has none."""
    if not (Path(path) / "labels" / name).exists():
        return None
    return open_image(path, name)


def multiscales(axes: str, scale: Sequence[float], name: str, units: Mapping[str, str] | None = None,
                 datasets: list[dict] | None = None, method: dict | None = None) -> list[dict]:
    """NGFF ``multiscales`` (without the version, which :func:`ngff_attributes` adds for 0.4)."""
    units = units or {}
    axis_meta = []
    for axis in axes:
        meta = {"name": axis, "type": _AXIS_TYPES[axis]}
        if axis in units:
            meta["unit"] = units[axis]
        axis_meta.append(meta)
    if datasets is None:
        datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(map(float, scale))}]}]
    multiscale = {"name": name, "axes": axis_meta, "datasets": datasets}
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
                  compressor: numcodecs.abc.Codec = COMPRESSOR, format: str = DEFAULT_FORMAT, shards=None,
                  image_label: dict | None = None) -> tuple[zarr.Group, zarr.Array]:
    """An empty OME-Zarr image in ``format``: array ``path`` of a group at ``root`` (whose format
    wins when it is a group), with the multiscales metadata of one level, ``image_label`` (an
    NGFF label image's ``image-label`` without version) and our ``attributes``. Chunks default
    to :func:`default_chunks`."""
    group = root if isinstance(root, zarr.Group) else new_group(root, format)
    chunks = tuple(chunks) if chunks is not None else default_chunks(axes, shape)
    array = create_array(group, path, axes=axes, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                         compressor=compressor, write_empty_chunks=write_empty_chunks)
    group.attrs.update({**ngff_attributes(group_format(group), multiscales=multiscales(axes, scale, name, units),
                                          image_label=image_label), **(attributes or {})})
    return group, array


@contextlib.contextmanager
def atomic_image(target: str | Path, axes: str, shape: Sequence[int], *, dtype, scale: Sequence[float],
                 chunks: Sequence[int] | None = None, attributes: dict | None = None, format: str = DEFAULT_FORMAT,
                 shards: Sequence[int] | None = None, image_label: dict | None = None) -> Iterator[_Writer]:
    """Create an OME-Zarr image at a temporary path; publish it at ``target`` on success."""
    target = Path(target)
    with atomic_directory(target) as tmp:
        _, array = create_image(tmp, axes, shape, dtype, scale, chunks, target.name, attributes, format=format,
                                shards=shards, image_label=image_label)
        yield _Writer(array, axes)
