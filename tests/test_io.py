import json

import numpy as np
import pytest
import tifffile
import zarr

from unet_core import io


def _write(path, data, **kwargs):
    if not kwargs.get("imagej") and not kwargs.get("ome"):
        kwargs.setdefault("photometric", "minisblack")
    tifffile.imwrite(path, data, **kwargs)
    return path


@pytest.mark.parametrize(
    "data,kwargs,axes",
    [
        (np.arange(5 * 20 * 30, dtype=np.uint16).reshape(5, 20, 30), {"imagej": True, "metadata": {"axes": "TYX"}}, "tyx"),
        (np.arange(4 * 20 * 30, dtype=np.uint8).reshape(4, 20, 30), {"imagej": True, "metadata": {"axes": "ZYX", "spacing": 2.5}}, "zyx"),
        (np.random.default_rng(0).random((3, 2, 20, 30)).astype(np.float32), {"metadata": {"axes": "ZCYX"}, "ome": True}, "czyx"),
        (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30), {}, "yx"),
        (np.arange(6 * 20 * 30, dtype=np.uint16).reshape(6, 20, 30), {"bigtiff": True}, "zyx"),
    ],
)
def test_round_trip(tmp_path, data, kwargs, axes):
    src = _write(tmp_path / "in.tif", data, **kwargs)
    out = io.ingest(src, tmp_path / "out.ome.zarr")
    image = io.open_image(out)
    assert image.axes == axes
    reference = tifffile.imread(src)
    if axes == "czyx":
        reference = np.moveaxis(reference, 1, 0)
    np.testing.assert_array_equal(np.asarray(image.array[:]), reference)
    assert image.array.dtype == data.dtype
    provenance = image.attrs["unet_core"]["provenance"]
    assert provenance["sha256"] == io.sha256_file(src)


def test_pixel_sizes_from_imagej(tmp_path):
    data = np.zeros((4, 10, 10), np.uint16)
    src = _write(tmp_path / "in.tif", data, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                 metadata={"axes": "ZYX", "spacing": 1.5, "unit": "um"})
    image = io.open_image(io.ingest(src, tmp_path / "out.ome.zarr"))
    assert image.scale["z"] == pytest.approx(1.5)
    assert image.scale["x"] == pytest.approx(0.2)


def test_labels_become_ngff_label_image(tmp_path):
    data = np.zeros((3, 10, 12), np.uint16)
    labels = np.zeros((3, 10, 12), np.uint16)
    labels[:, 2:5, 3:7] = 4
    src = _write(tmp_path / "in.tif", data, imagej=True, metadata={"axes": "TYX"})
    lab = _write(tmp_path / "lab.tif", labels)
    out = io.ingest(src, tmp_path / "out.ome.zarr", labels_path=lab)
    truth = io.read_labels(out)
    np.testing.assert_array_equal(np.asarray(truth.array[:]), labels)
    group = zarr.open_group(out / "labels", mode="r")
    assert group.attrs["labels"] == ["ground_truth"]
    assert "image-label" in zarr.open_group(out / "labels" / "ground_truth", mode="r").attrs


def test_ome_zarr_reader_accepts_output(tmp_path):
    ome_zarr = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    src = _write(tmp_path / "in.tif", np.zeros((2, 16, 16), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    out = io.ingest(src, tmp_path / "out.ome.zarr")
    nodes = list(ome_zarr.Reader(parse_url(str(out)))())
    assert nodes and nodes[0].data[0].shape == (2, 16, 16)


@pytest.mark.parametrize("case", ["not_tiff", "truncated", "uneven_pages", "bad_dtype", "missing", "labels_shape"])
def test_bad_input_is_named_and_leaves_nothing(tmp_path, case):
    src = tmp_path / "in.tif"
    labels = None
    if case == "not_tiff":
        src.write_text("hello")
    elif case == "truncated":
        _write(src, np.zeros((4, 64, 64), np.uint16))
        src.write_bytes(src.read_bytes()[:3000])
    elif case == "uneven_pages":
        with tifffile.TiffWriter(src) as tif:
            tif.write(np.zeros((10, 10), np.uint8))
            tif.write(np.zeros((12, 10), np.uint8))
    elif case == "bad_dtype":
        _write(src, np.zeros((3, 8, 8), np.int64))
    elif case == "labels_shape":
        _write(src, np.zeros((3, 8, 8), np.uint8))
        labels = _write(tmp_path / "lab.tif", np.zeros((3, 8, 9), np.uint8))
    target = tmp_path / "out.ome.zarr"
    with pytest.raises(ValueError, match=r"(in|lab)\.tif"):
        io.ingest(src, target, labels_path=labels)
    assert not target.exists()
    assert not list(tmp_path.glob(".out.ome.zarr.partial*"))


def test_open_image_rejects_non_ome_zarr(tmp_path):
    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=2)
    with pytest.raises(ValueError, match="not an OME-Zarr image"):
        io.open_image(tmp_path / "plain.zarr")


def test_atomic_directory_keeps_previous_output_on_error(tmp_path):
    target = tmp_path / "result"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError):
        with io.atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash")
    assert (target / "old.txt").read_text() == "previous"
    assert not list(tmp_path.glob(".result.partial*"))


def test_intensity_statistics(tmp_path):
    data = np.random.default_rng(0).integers(0, 1000, (3, 20, 20)).astype(np.uint16)
    image = io.open_image(io.ingest(_write(tmp_path / "in.tif", data), tmp_path / "o.ome.zarr"))
    mean, std = io.intensity_statistics(image)
    assert mean[0] == pytest.approx(data.mean())
    assert std[0] == pytest.approx(data.std())
    json.dumps(image.attrs)
