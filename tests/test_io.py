"""Tests of unet_core.io: TIFF ingest (round trips, pyramid, labels, provenance, bad input,
atomicity under SIGKILL, re-ingest) and the OME-Zarr readers."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import zarr

from unet_core import atomic, ingest, io, normalize, pyramid, tiff


def _write(path, data, **kwargs):
    if not kwargs.get("imagej") and not kwargs.get("ome"):
        kwargs.setdefault("photometric", "minisblack")
    tifffile.imwrite(path, data, **kwargs)
    return path


def _levels(path, name=None):
    group = zarr.open_group(path / "labels" / name if name else path, mode="r")
    datasets = group.attrs["multiscales"][0]["datasets"]
    return [np.asarray(group[d["path"]][:]) for d in datasets], datasets


def _mean_pyramid_reference(data, factors):
    """Independent reference: edge-pad odd axes, mean of each block, round half up."""
    pad = [(0, n % f) for n, f in zip(data.shape, factors)]
    padded = np.pad(data.astype(np.float64), pad, mode="edge")
    shape = []
    for n, f in zip(padded.shape, factors):
        shape += [n // f, f]
    mean = padded.reshape(shape).mean(axis=tuple(range(1, 2 * data.ndim, 2)))
    return mean if data.dtype.kind == "f" else np.floor(mean + 0.5).astype(data.dtype)


def _nothing_left(tmp_path, name="out.ome.zarr"):
    assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob(f".{name}.*"))


rng = np.random.default_rng(0)
U16 = np.arange(5 * 20 * 30, dtype=np.uint16).reshape(5, 20, 30)
HYPER = rng.integers(0, 1000, (3, 4, 2, 16, 24)).astype(np.uint16)  # T Z C Y X


@pytest.mark.parametrize(
    "data,kwargs,axes,order",
    [
        (U16, {"imagej": True, "metadata": {"axes": "TYX"}}, "tyx", None),
        (U16.astype(np.uint8), {"imagej": True, "metadata": {"axes": "ZYX", "spacing": 2.5}}, "zyx", None),
        (rng.random((3, 2, 20, 30)).astype(np.float32), {"metadata": {"axes": "ZCYX"}, "ome": True}, "czyx",
         (1, 0, 2, 3)),
        (U16[0], {}, "yx", None),
        (U16, {"bigtiff": True}, "zyx", None),
        (HYPER, {"imagej": True, "metadata": {"axes": "TZCYX"}}, "tczyx", (0, 2, 1, 3, 4)),
        (HYPER, {"imagej": True, "metadata": {"axes": "TZCYX"}, "truncate": True}, "tczyx", (0, 2, 1, 3, 4)),
        (HYPER, {"ome": True, "metadata": {"axes": "TZCYX"}}, "tczyx", (0, 2, 1, 3, 4)),
        (rng.integers(0, 255, (20, 30, 3)).astype(np.uint8), {"photometric": "rgb"}, "cyx", (2, 0, 1)),
        (U16, {"tile": (16, 16), "compression": "zlib"}, "zyx", None),
        (U16.astype(">u2"), {"byteorder": ">"}, "zyx", None),
    ],
    ids=["imagej-tyx", "imagej-zyx-u8", "ome-zcyx-f32", "2d", "bigtiff", "imagej-hyperstack",
         "imagej-truncated-ifds", "ome-hyperstack", "rgb", "tiled-zlib", "big-endian"],
)
def test_round_trip(tmp_path, data, kwargs, axes, order):
    src = _write(tmp_path / "in.tif", data, **kwargs)
    out = ingest.ingest(src, tmp_path / "out.ome.zarr")
    image = io.open_image(out)
    assert image.axes == axes
    reference = tifffile.imread(src)
    if order is not None:
        reference = np.transpose(reference, order)
    np.testing.assert_array_equal(np.asarray(image.array[:]), reference)
    assert image.array.dtype == data.dtype.newbyteorder("=")
    provenance = image.attrs["unet_core"]["provenance"]
    assert provenance["sha256"] == io.sha256_file(src)
    assert provenance["size_bytes"] == src.stat().st_size


def test_pages_written_one_by_one_are_a_stack(tmp_path):
    src = tmp_path / "in.tif"
    with tifffile.TiffWriter(src) as tif:
        for page in U16:
            tif.write(page, photometric="minisblack")
    image = io.open_image(ingest.ingest(src, tmp_path / "out.ome.zarr"))
    assert image.axes == "zyx"
    np.testing.assert_array_equal(np.asarray(image.array[:]), U16)


@pytest.mark.parametrize("override,axes", [(None, "zyx"), ("tyx", "tyx")])
def test_folder_of_slices_in_natural_order(tmp_path, override, axes):
    folder = tmp_path / "slices"
    folder.mkdir()
    files = [folder / f"slice_{index}.tif" for index in range(12)]  # slice_2 comes before slice_10
    for index, file in enumerate(files):
        page = rng.integers(0, 1000, (6, 7)).astype(np.uint16)
        page[0, 0] = index
        _write(file, page)
    (folder / "notes.txt").write_text("ignored")
    image = io.open_image(ingest.ingest(folder, tmp_path / "out.ome.zarr", axes=override))
    assert image.axes == axes
    np.testing.assert_array_equal(np.asarray(image.array[:]), tifffile.imread(files))
    np.testing.assert_array_equal(np.asarray(image.array[:, 0, 0]), np.arange(12))
    provenance = image.attrs["unet_core"]["provenance"]
    assert provenance["kind"] == "directory" and provenance["tiff"]["files"] == 12
    manifest = "".join(f"{io.sha256_file(folder / f'slice_{i}.tif')}  slice_{i}.tif\n" for i in range(12))
    import hashlib

    assert provenance["sha256"] == hashlib.sha256(manifest.encode()).hexdigest()


def test_pixel_sizes_from_imagej(tmp_path):
    data = np.zeros((3, 4, 10, 10), np.uint16)
    src = _write(tmp_path / "in.tif", data, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                 metadata={"axes": "TZYX", "spacing": 1.5, "unit": "um", "finterval": 30.0})
    image = io.open_image(ingest.ingest(src, tmp_path / "out.ome.zarr"))
    assert image.scale["z"] == pytest.approx(1.5)
    assert image.scale["x"] == pytest.approx(0.2) and image.scale["y"] == pytest.approx(0.2)
    assert image.scale["t"] == pytest.approx(30.0)
    axes = {a["name"]: a for a in image.attrs["multiscales"][0]["axes"]}
    assert axes["x"]["unit"] == "micrometer" and axes["t"]["unit"] == "second"


def test_pixel_sizes_from_ome(tmp_path):
    src = _write(tmp_path / "in.ome.tif", np.zeros((2, 3, 8, 8), np.uint16), ome=True,
                 metadata={"axes": "TZYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1, "PhysicalSizeZ": 0.5,
                           "PhysicalSizeZUnit": "nm", "TimeIncrement": 2.0})
    image = io.open_image(ingest.ingest(src, tmp_path / "out.ome.zarr"))
    assert image.scale_for("tzyx") == pytest.approx([2.0, 0.5, 0.1, 0.1])
    axes = {a["name"]: a.get("unit") for a in image.attrs["multiscales"][0]["axes"]}
    assert axes == {"t": "second", "z": "nanometer", "y": "micrometer", "x": "micrometer"}
    assert image.attrs["unet_core"]["provenance"]["tiff"]["is_ome"]


def test_axes_override(tmp_path):
    src = _write(tmp_path / "in.tif", U16)
    image = io.open_image(ingest.ingest(src, tmp_path / "out.ome.zarr", axes="tyx"))
    assert image.axes == "tyx"
    with pytest.raises(ValueError, match=r"in\.tif.*axes override"):
        ingest.ingest(src, tmp_path / "bad.ome.zarr", axes="zyxc")
    _nothing_left(tmp_path, "bad.ome.zarr")


@pytest.mark.parametrize("spacing,z_factors", [(0.5, [2, 2]), (1.0, [1, 2]), (3.0, [1, 1])])
def test_pyramid_levels_are_block_means(tmp_path, monkeypatch, spacing, z_factors):
    data = rng.integers(0, 4000, (5, 1100, 700)).astype(np.uint16)  # odd sizes everywhere below
    src = _write(tmp_path / "in.tif", data, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                 metadata={"axes": "ZYX", "spacing": spacing})
    # odd z chunks and tiny blocks: many blocks, split along y and x, pairs across block edges,
    # and every block written in several pieces
    monkeypatch.setattr(pyramid, "_WRITE_BYTES", 20_000)
    out = ingest.ingest(src, tmp_path / "out.ome.zarr", chunks=(3, 100, 128), block_bytes=60_000)
    levels, datasets = _levels(out)
    assert [level.shape[1:] for level in levels] == [(1100, 700), (550, 350), (275, 175)]
    expected = data
    scale = [spacing, 0.5, 0.5]
    for level, dataset, fz in zip(levels[1:], datasets[1:], z_factors):
        expected = _mean_pyramid_reference(expected, (fz, 2, 2))
        np.testing.assert_array_equal(level, expected)
        scale = [scale[0] * fz, scale[1] * 2, scale[2] * 2]
        assert dataset["coordinateTransformations"][0]["scale"] == pytest.approx(scale)
    # the pyramid does not depend on how the stack was cut into blocks
    whole = ingest.ingest(src, tmp_path / "whole.ome.zarr", chunks=(3, 100, 128))
    for a, b in zip(levels, _levels(whole)[0]):
        np.testing.assert_array_equal(a, b)


def test_pyramid_of_float_and_2d_time_series(tmp_path):
    data = rng.random((2, 600, 530)).astype(np.float32)
    src = _write(tmp_path / "in.tif", data, imagej=True, metadata={"axes": "TYX"})
    levels, datasets = _levels(ingest.ingest(src, tmp_path / "out.ome.zarr", block_bytes=100_000))
    assert [level.shape for level in levels] == [(2, 600, 530), (2, 300, 265)]
    np.testing.assert_allclose(levels[1], _mean_pyramid_reference(data, (1, 2, 2)), rtol=1e-6)
    assert datasets[1]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 2.0]


def test_no_pyramid_on_request(tmp_path):
    src = _write(tmp_path / "in.tif", rng.integers(0, 9, (2, 600, 600)).astype(np.uint8))
    levels, _ = _levels(ingest.ingest(src, tmp_path / "out.ome.zarr", pyramid=False))
    assert len(levels) == 1


def test_labels_become_ngff_label_image(tmp_path):
    data = np.zeros((3, 10, 12), np.uint16)
    labels = np.zeros((3, 10, 12), np.uint16)
    labels[:, 2:5, 3:7] = 4
    src = _write(tmp_path / "in.tif", data, imagej=True, metadata={"axes": "TYX"})
    lab = _write(tmp_path / "lab.tif", labels)
    out = ingest.ingest(src, tmp_path / "out.ome.zarr", labels_path=lab)
    truth = io.read_labels(out)
    np.testing.assert_array_equal(np.asarray(truth.array[:]), labels)
    group = zarr.open_group(out / "labels", mode="r")
    assert group.attrs["labels"] == ["ground_truth"]
    assert "image-label" in zarr.open_group(out / "labels" / "ground_truth", mode="r").attrs
    provenance = io.open_image(out).attrs["unet_core"]["provenance"]
    assert provenance["labels"]["sha256"] == io.sha256_file(lab)


def test_label_pyramid_is_stride_subsampled(tmp_path):
    image = rng.integers(0, 255, (3, 2, 1030, 520)).astype(np.uint8)  # Z C Y X
    labels = rng.integers(0, 50_000, (3, 1030, 520)).astype(np.uint32)
    src = _write(tmp_path / "in.ome.tif", image, ome=True, metadata={"axes": "ZCYX"})
    lab = _write(tmp_path / "lab.tif", labels)
    out = ingest.ingest(src, tmp_path / "out.ome.zarr", labels_path=lab, block_bytes=200_000)
    levels, datasets = _levels(out, "ground_truth")
    np.testing.assert_array_equal(levels[0], labels)
    np.testing.assert_array_equal(levels[1], labels[::2, ::2, ::2])
    np.testing.assert_array_equal(levels[2], labels[::4, ::4, ::4])
    image_levels, image_datasets = _levels(out)
    assert [lv.shape for lv in image_levels] == [(2, *lv.shape) for lv in levels]
    for d, i in zip(datasets, image_datasets):
        scale = i["coordinateTransformations"][0]["scale"]
        assert d["coordinateTransformations"][0]["scale"] == scale[1:]  # image axes czyx


def test_ome_zarr_readers_accept_output(tmp_path):
    import ome_zarr.reader
    import ome_zarr_models.v04 as models
    from ome_zarr.io import parse_url

    data = rng.integers(0, 1000, (2, 700, 600)).astype(np.uint16)
    src = _write(tmp_path / "in.tif", data, imagej=True, metadata={"axes": "ZYX"})
    lab = _write(tmp_path / "lab.tif", (data > 500).astype(np.uint8))
    out = ingest.ingest(src, tmp_path / "out.ome.zarr", labels_path=lab)
    nodes = list(ome_zarr.reader.Reader(parse_url(str(out)))())
    assert [d.shape for d in nodes[0].data] == [(2, 700, 600), (1, 350, 300)]
    assert [d.shape for d in nodes[-1].data] == [(2, 700, 600), (1, 350, 300)]
    group = zarr.open_group(out, mode="r")
    models.Image.from_zarr(group)
    models.ImageLabel.from_zarr(group["labels/ground_truth"])
    models.Labels.from_zarr(group["labels"])


def test_provenance_records_source_and_request(tmp_path):
    src = _write(tmp_path / "in.tif", U16, imagej=True, metadata={"axes": "ZYX"})
    out = ingest.ingest(src, tmp_path / "out.ome.zarr", chunks=(2, 10, 10))
    provenance = io.open_image(out).attrs["unet_core"]["provenance"]
    json.dumps(provenance)
    assert provenance["source"] == str(src)
    assert provenance["tiff"]["is_imagej"] and provenance["tiff"]["shape"] == [5, 20, 30]
    assert provenance["ingest"]["request"]["chunks"] == [2, 10, 10]
    assert provenance["ingest"]["request"]["axes"] == "zyx"


def test_plain_tiff_description_is_kept_in_provenance(tmp_path):
    """A microscope's free-text ImageDescription (not OME, not ImageJ) is recorded as written."""
    text = "Zeiss LSM 980; laser 488 nm 2%; <b>operator</b> A. Person\n" + "x" * 5000
    src = tmp_path / "plain.tif"
    tifffile.imwrite(src, U16, description=text, metadata=None)
    provenance = io.open_image(ingest.ingest(src, tmp_path / "out.ome.zarr", axes="zyx")).attrs["unet_core"]["provenance"]
    assert provenance["tiff"]["description"] == text[:4000]
    imagej = _write(tmp_path / "ij.tif", U16, imagej=True, metadata={"axes": "ZYX"})
    provenance = io.open_image(ingest.ingest(imagej, tmp_path / "ij.ome.zarr")).attrs["unet_core"]["provenance"]
    assert "description" not in provenance["tiff"] and provenance["tiff"]["imagej"]


def test_reingest_unchanged_is_a_no_op(tmp_path):
    src = _write(tmp_path / "in.tif", U16)
    lab = _write(tmp_path / "lab.tif", (U16 % 3).astype(np.uint8))
    out = ingest.ingest(src, tmp_path / "out.ome.zarr", labels_path=lab)
    marker = out / "marker"
    marker.write_text("same output")
    ingest.ingest(src, out, labels_path=lab)
    assert marker.exists()  # not rewritten
    ingest.ingest(src, out, labels_path=lab, chunks=(1, 20, 30))
    assert not marker.exists()  # other chunks: rewritten
    marker.write_text("same output")
    ingest.ingest(src, out)
    assert not marker.exists()  # labels dropped: rewritten
    assert io.read_labels(out) is None
    marker.write_text("same output")
    _write(src, U16 + 1)
    ingest.ingest(src, out)
    assert not marker.exists()  # input changed: rewritten
    np.testing.assert_array_equal(np.asarray(io.open_image(out).array[:]), U16 + 1)


def test_failed_reingest_keeps_previous_output(tmp_path):
    src = _write(tmp_path / "in.tif", U16)
    out = ingest.ingest(src, tmp_path / "out.ome.zarr")
    src.write_text("not a tiff any more")
    with pytest.raises(ValueError, match=r"in\.tif"):
        ingest.ingest(src, out)
    np.testing.assert_array_equal(np.asarray(io.open_image(out).array[:]), U16)
    assert not list(tmp_path.glob(".out.ome.zarr.*"))


def _truncate_last_page(src):
    with tifffile.TiffWriter(src) as tif:  # page by page: each IFD comes before its pixels
        for page in rng.integers(0, 1000, (4, 64, 64)).astype(np.uint16):
            tif.write(page, photometric="minisblack", metadata=None)
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[-1]
        end = page.dataoffsets[0] + page.databytecounts[0]
    assert end == src.stat().st_size  # the last page's pixels end the file: cutting them keeps every IFD
    src.write_bytes(src.read_bytes()[:end - 100])


def _corrupt_compressed_page(src):
    _write(src, rng.integers(0, 1000, (4, 64, 64)).astype(np.uint16), compression="zlib")
    with tifffile.TiffFile(src) as tif:
        offset = tif.pages[2].dataoffsets[0]
    data = bytearray(src.read_bytes())
    data[offset + 10:offset + 60] = b"\xff" * 50
    src.write_bytes(bytes(data))


@pytest.mark.parametrize("case", [
    "not_tiff", "truncated", "truncated_ifd_chain", "truncated_pixels", "corrupt_pixels", "zero_pages",
    "uneven_pages", "bad_dtype", "missing", "broken_link", "fifo", "empty_folder", "uneven_slices",
    "labels_shape", "labels_dtype", "labels_negative", "bad_chunks",
])
def test_bad_input_is_named_and_leaves_nothing(tmp_path, case):
    src = tmp_path / "in.tif"
    labels = None
    chunks = None
    if case == "not_tiff":
        src.write_text("hello")
    elif case == "truncated":
        _write(src, np.zeros((4, 64, 64), np.uint16))
        src.write_bytes(src.read_bytes()[:3000])
    elif case == "truncated_ifd_chain":  # tifffile only logs this and returns fewer pages
        _write(src, np.zeros((4, 64, 64), np.uint16), metadata=None)
        src.write_bytes(src.read_bytes()[:-3000])
    elif case == "truncated_pixels":
        _truncate_last_page(src)
    elif case == "corrupt_pixels":  # found only when the pixels are decoded
        _corrupt_compressed_page(src)
    elif case == "zero_pages":
        src.write_bytes(b"II*\x00\x00\x00\x00\x00")  # a valid header whose first IFD offset is 0
    elif case == "uneven_pages":
        with tifffile.TiffWriter(src) as tif:
            tif.write(np.zeros((10, 10), np.uint8))
            tif.write(np.zeros((12, 10), np.uint8))
    elif case == "bad_dtype":
        _write(src, np.zeros((3, 8, 8), np.int64))
    elif case == "broken_link":
        src.symlink_to(tmp_path / "nowhere.tif")
    elif case == "fifo":
        os.mkfifo(src)  # opening it for reading would block: must be refused before
    elif case == "empty_folder":
        src.mkdir()
        (src / "readme.txt").write_text("no tiffs here")
    elif case == "uneven_slices":
        src.mkdir()
        _write(src / "a1.tif", np.zeros((8, 8), np.uint8))
        _write(src / "a2.tif", np.zeros((8, 9), np.uint8))
    elif case.startswith("labels"):
        _write(src, np.zeros((3, 8, 8), np.uint8))
        shape, dtype = ((3, 8, 9), np.uint8) if case == "labels_shape" else ((3, 8, 8), np.float32)
        values = np.zeros(shape, dtype)
        if case == "labels_negative":
            values = np.zeros(shape, np.int16)
            values[2, 3, 3] = -4
        labels = _write(tmp_path / "lab.tif", values)
    elif case == "bad_chunks":
        _write(src, np.zeros((3, 8, 8), np.uint8))
        chunks = (1, 2, 3, 4)
    target = tmp_path / "out.ome.zarr"
    with pytest.raises(ValueError, match=r"(in|lab)\.tif") as error:
        ingest.ingest(src, target, labels_path=labels, chunks=chunks)
    assert "\n" not in str(error.value)
    _nothing_left(tmp_path)


def test_truncation_is_caught_while_reading_too(tmp_path, monkeypatch):
    """Without the up-front check of data extents, the pixel reads still find the damage."""
    monkeypatch.setattr(tiff._TiffSource, "_check_extents", lambda self: None)
    src = tmp_path / "in.tif"
    _truncate_last_page(src)
    with pytest.raises(ValueError, match=r"in\.tif: (truncated|failed reading pixel data)"):
        ingest.ingest(src, tmp_path / "out.ome.zarr")
    _nothing_left(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    src = _write(tmp_path / "in.tif", U16)
    src.chmod(0)
    with pytest.raises(ValueError, match=r"in\.tif.*not readable"):
        ingest.ingest(src, tmp_path / "out.ome.zarr")
    _nothing_left(tmp_path)


def test_huge_pages_are_read_by_strips(tmp_path):
    """Pages larger than a block are read through tifffile's zarr view, one band at a time."""
    data = rng.integers(0, 1000, (700, 900)).astype(np.uint16)
    src = _write(tmp_path / "in.tif", data, tile=(64, 64), compression="zlib")
    out = ingest.ingest(src, tmp_path / "out.ome.zarr", chunks=(128, 128), block_bytes=50_000)
    levels, _ = _levels(out)
    np.testing.assert_array_equal(levels[0], data)
    np.testing.assert_array_equal(levels[1], _mean_pyramid_reference(data, (2, 2)))


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_partials_of_killed_runs_are_removed(tmp_path):
    src = _write(tmp_path / "in.tif", U16)
    legacy = tmp_path / f".out.ome.zarr.partial-{_dead_pid()}"
    current = tmp_path / f".out.ome.zarr.partial-{atomic.host_name()}-{_dead_pid()}"
    foreign = tmp_path / ".out.ome.zarr.partial-otherhost-12345"
    for stale in (legacy, current, foreign):
        (stale / "0").mkdir(parents=True)
        (stale / ".zattrs").write_text("{half")
    ingest.ingest(src, tmp_path / "out.ome.zarr")
    assert not legacy.exists() and not current.exists()
    assert foreign.exists()  # another host's run may still be writing


KILL_SCRIPT = """
import sys, time
from unet_core import ingest, pyramid
write = pyramid._write_pieces
def slow_write(*args):
    time.sleep(0.3)
    write(*args)
pyramid._write_pieces = slow_write
ingest.ingest(sys.argv[1], sys.argv[2], chunks=(4, 128, 128), block_bytes=1 << 19)
"""


def test_sigkill_mid_ingest_leaves_no_output_and_rerun_succeeds(tmp_path):
    data = rng.integers(0, 4000, (40, 512, 512)).astype(np.uint16)  # 20 MB, ~40 throttled writes
    src = _write(tmp_path / "in.tif", data)
    target = tmp_path / "out.ome.zarr"
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(src), str(target)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            partials = list(tmp_path.glob(".out.ome.zarr.partial-*"))
            if partials and len([p for p in (partials[0] / "0").rglob("*") if p.is_file()]) > 2:
                break
            time.sleep(0.02)
        assert process.poll() is None, "ingest ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert not target.exists()
    assert list(tmp_path.glob(".out.ome.zarr.partial-*"))  # the killed run's leftovers
    ingest.ingest(src, target, chunks=(4, 128, 128))
    np.testing.assert_array_equal(np.asarray(io.open_image(target).array[:]), data)
    assert not list(tmp_path.glob(".out.ome.zarr.partial-*"))


def test_open_image_rejects_non_ome_zarr(tmp_path):
    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=2)
    with pytest.raises(ValueError, match="not an OME-Zarr image"):
        io.open_image(tmp_path / "plain.zarr")


def test_intensity_statistics(tmp_path):
    data = np.random.default_rng(0).integers(0, 1000, (3, 20, 20)).astype(np.uint16)
    image = io.open_image(ingest.ingest(_write(tmp_path / "in.tif", data), tmp_path / "o.ome.zarr"))
    mean, std = normalize.intensity_statistics(image)
    assert mean[0] == pytest.approx(data.mean())
    assert std[0] == pytest.approx(data.std())
    json.dumps(image.attrs)


def test_intensity_statistics_of_a_large_volume_come_from_evenly_spread_chunks(tmp_path):
    """Above max_chunks, the statistics are exactly those of the sampled chunks (here every other
    chunk of a volume whose halves differ), per channel."""
    rng = np.random.default_rng(1)
    data = np.stack([rng.normal(100, 10, (8, 16, 16)), rng.normal(5, 2, (8, 16, 16))], axis=1)  # z, c, y, x
    data[4:] += 50
    data = data.astype(np.float32)
    tifffile.imwrite(tmp_path / "in.tif", data, metadata={"axes": "ZCYX"}, photometric="minisblack")
    image = io.open_image(ingest.ingest(tmp_path / "in.tif", tmp_path / "o.ome.zarr", axes="zcyx", chunks=(1, 1, 16, 16)))
    assert image.axes == "czyx" and image.array.nchunks == 16  # 8 z chunks x 2 channels
    mean, std = normalize.intensity_statistics(image, max_chunks=4)
    sample = data[[0, 2, 5, 7]].astype(np.float64)  # np.linspace(0, 7, 4).round() = 0, 2, 5, 7
    np.testing.assert_allclose(mean, sample.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(std, sample.std(axis=(0, 2, 3)), rtol=1e-9)
    whole_mean, whole_std = normalize.intensity_statistics(image)
    np.testing.assert_allclose(whole_mean, data.mean(axis=(0, 2, 3)), rtol=1e-6)


def test_subset_ingests_a_range_of_slices_with_its_labels(tmp_path):
    data = np.arange(6 * 8 * 10, dtype=np.uint16).reshape(6, 8, 10)
    labels = (np.arange(6 * 8 * 10).reshape(6, 8, 10) % 7).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", data, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "lab.tif", labels, imagej=True, metadata={"axes": "ZYX"})
    out = ingest.ingest(tmp_path / "in.tif", tmp_path / "held.ome.zarr", labels_path=tmp_path / "lab.tif", subset="z=4:6")
    np.testing.assert_array_equal(io.open_image(out).array[:], data[4:6])
    np.testing.assert_array_equal(io.read_labels(out).array[:], labels[4:6])
    assert io.open_image(out).attrs["unet_core"]["provenance"]["ingest"]["request"]["subset"] == {"z": [4, 6]}
    with pytest.raises(ValueError, match="subset"):
        ingest.parse_subset("q=1:2")
    with pytest.raises(tiff.TiffError, match="in.tif: subset z=6:6 is empty"):
        ingest.ingest(tmp_path / "in.tif", tmp_path / "bad.ome.zarr", subset={"z": slice(6, 9)})
