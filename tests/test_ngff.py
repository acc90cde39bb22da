"""NGFF 0.4 (zarr v2) and 0.5 (zarr v3, sharded): every stage reads both, writes its output in its
input's format, the two routes give identical arrays, and every OME-Zarr validates against the
specification's models (ome-zarr-models)."""

from pathlib import Path

import numpy as np
import ome_zarr_models.v04 as ngff04
import ome_zarr_models.v05 as ngff05
import pytest
import tifffile
import torch
import zarr

from unet_core import io
from unet_core.evaluate import evaluate_stack
from unet_core.ingest import ingest
from unet_core.model import UNet
from unet_core.predict import predict_image
from unet_core.prepare import prepare_targets
from unet_core.segment import segment_image
from unet_core.train import TrainSettings, train

MODELS = {"ngff-0.4": ngff04, "ngff-0.5": ngff05}


def validate_ome_zarr(path) -> str:
    """Validate an OME-Zarr image (and its labels) with ome-zarr-models; returns its format.
    A label image (``image-label`` metadata) is validated as one."""
    group = zarr.open_group(path, mode="r")
    fmt = io.group_format(group)
    models = MODELS[fmt]
    ngff = group.attrs.get("ome", {}) if fmt == "ngff-0.5" else group.attrs
    (models.ImageLabel if "image-label" in ngff else models.Image).from_zarr(group)
    if "labels" in group:
        models.Labels.from_zarr(group["labels"])
        for name in (group["labels"].attrs.get("ome", {}) if fmt == "ngff-0.5" else group["labels"].attrs)["labels"]:
            models.ImageLabel.from_zarr(group["labels"][name])
    return fmt


def _files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    """One small stack with ground truth through ingest, weight maps, training, prediction,
    segmentation and evaluation, once per format."""
    root = tmp_path_factory.mktemp("ngff")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:600, :540]  # over 512 px: a pyramid level too
    cells = np.zeros((3, 600, 540), np.uint16)
    for k, (y, x) in enumerate(rng.uniform(20, 520, (40, 2)), start=1):
        cells[:, (yy - y) ** 2 + (xx - x) ** 2 < 120] = k
    raw = ((cells > 0) * 800 + rng.normal(300, 40, cells.shape)).clip(0, 65535).astype(np.uint16)
    tifffile.imwrite(root / "raw.tif", raw, metadata={"axes": "ZYX"}, photometric="minisblack")
    tifffile.imwrite(root / "labels.tif", cells, metadata={"axes": "ZYX"}, photometric="minisblack")
    out = {}
    for fmt in io.FORMATS:
        base = root / fmt
        image = ingest(root / "raw.tif", base / "raw.ome.zarr", labels_path=root / "labels.tif", format=fmt,
                       chunks=(1, 128, 128), shards=(3, 256, 256) if fmt == "ngff-0.5" else None)
        weights = prepare_targets(image, base / "weights.zarr")
        torch.manual_seed(0)
        train(train_images=[image], train_weights=[weights], val_images=[], val_weights=[], out_dir=base / "model",
              settings=TrainSettings(base_channels=4, depth=2, steps=3, batch_size=1, tile=44, validate_every=3,
                                     checkpoint_every=3, log_every=1), device="cpu")
        probabilities = base / "p.ome.zarr"
        predict_image(base / "model" / "model.pt", image, probabilities, device="cpu", planewise=True,
                      block_shape=(128, 128))
        labels = segment_image(probabilities, base / "s.ome.zarr", min_size=5)
        metrics = evaluate_stack(image_path=image, probabilities_path=probabilities, segmentation_path=labels,
                                 output_path=base / "metrics.json", stack="s", role="val")
        out[fmt] = {"image": image, "probabilities": probabilities, "labels": labels, "metrics": metrics,
                    "weights": weights, "model": base / "model" / "model.pt"}
    return out


@pytest.mark.parametrize("fmt", io.FORMATS)
def test_every_ome_zarr_of_each_route_validates_in_its_format(routes, fmt):
    for key in ("image", "probabilities", "labels"):
        assert validate_ome_zarr(routes[fmt][key]) == fmt, key
    assert io.open_image(routes[fmt]["labels"]).format == fmt


def test_the_two_routes_hold_the_same_arrays(routes):
    a, b = routes["ngff-0.4"], routes["ngff-0.5"]
    for key in ("image", "probabilities", "labels"):
        x, y = io.open_image(a[key]), io.open_image(b[key])
        assert x.axes == y.axes and x.scale == y.scale
        assert np.array_equal(np.asarray(x.array), np.asarray(y.array)), key
    for level in ("1", "labels/ground_truth/0", "labels/ground_truth/1"):  # pyramid and ground truth too
        x, y = (zarr.open_group(r["image"], mode="r")[level] for r in (a, b))
        assert np.array_equal(np.asarray(x), np.asarray(y)), level
    assert torch.equal(*[torch.load(r["model"], weights_only=True)["model"]["head.weight"] for r in (a, b)])
    assert a["metrics"]["metrics"] == b["metrics"]["metrics"]


def test_ngff_05_shards_hold_many_chunks_in_one_file(routes):
    image = zarr.open_group(routes["ngff-0.5"]["image"], mode="r")["0"]
    assert image.metadata.zarr_format == 3 and image.shards == (3, 256, 256) and image.chunks == (1, 128, 128)
    assert list(image.metadata.dimension_names) == ["z", "y", "x"]
    assert _files(Path(routes["ngff-0.5"]["image"])) < _files(Path(routes["ngff-0.4"]["image"])) / 4


def test_ome_zarr_py_reads_ngff_05(routes):
    import ome_zarr.reader
    from ome_zarr.io import parse_url

    nodes = list(ome_zarr.reader.Reader(parse_url(str(routes["ngff-0.5"]["image"])))())
    assert [d.shape for d in nodes[0].data] == [(3, 600, 540), (2, 300, 270)]


def test_default_shards_are_the_written_blocks_and_shards_need_ngff_05(tmp_path):
    data = np.random.default_rng(1).integers(0, 255, (3, 300, 260)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", data, metadata={"axes": "ZYX"}, photometric="minisblack")
    out = ingest(tmp_path / "in.tif", tmp_path / "a.ome.zarr", format="ngff-0.5", chunks=(1, 64, 64),
                 block_bytes=64 * 300 * 2)
    array = zarr.open_group(out, mode="r")["0"]
    assert array.shards[0] == 1 and array.shards[1] % 64 == 0 and array.shards[2] == 320  # whole rows of chunks
    assert np.array_equal(np.asarray(array), data)
    validate_ome_zarr(out)
    with pytest.raises(ValueError, match="shards need format ngff-0.5"):
        ingest(tmp_path / "in.tif", tmp_path / "b.ome.zarr", shards=(1, 128, 128))
    with pytest.raises(ValueError, match="format must be one of"):
        ingest(tmp_path / "in.tif", tmp_path / "b.ome.zarr", format="ngff-0.6")
    assert not (tmp_path / "b.ome.zarr").exists()


def test_a_format_change_rewrites_the_ingested_image(tmp_path):
    data = np.random.default_rng(2).integers(0, 255, (2, 64, 64)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", data, metadata={"axes": "ZYX"}, photometric="minisblack")
    out = ingest(tmp_path / "in.tif", tmp_path / "x.ome.zarr")
    assert io.open_image(out).format == "ngff-0.4"
    assert "format" not in io.open_image(out).attrs["unet_core"]["provenance"]["ingest"]["request"]
    ingest(tmp_path / "in.tif", out, format="ngff-0.5")
    assert io.open_image(out).format == "ngff-0.5" and validate_ome_zarr(out) == "ngff-0.5"


@pytest.mark.slow
def test_every_ome_zarr_the_demo_writes_validates(demo_run):
    results = demo_run[0] / "results"
    written = sorted(results.glob("zarr/*.ome.zarr")) + sorted(results.glob("predictions/*.ome.zarr")) + sorted(
        results.glob("segmentation/*.ome.zarr"))
    assert len(written) >= 12
    for path in written:
        validate_ome_zarr(path)


def test_models_predict_with_ngff_05_input_written_by_hand(tmp_path):
    """An NGFF 0.5 image made elsewhere (unsharded, created here with io) predicts into 0.5."""
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2, dropout=0.0)
    torch.save({"model": model.state_dict(), "architecture": model.config()}, tmp_path / "m.pt")
    _, array = io.create_image(tmp_path / "in.ome.zarr", "yx", (90, 100), "uint8", [1.0, 1.0], (32, 32), "in",
                               format="ngff-0.5")
    array[...] = np.random.default_rng(0).integers(0, 255, (90, 100))
    predict_image(tmp_path / "m.pt", tmp_path / "in.ome.zarr", tmp_path / "p.ome.zarr", device="cpu")
    assert validate_ome_zarr(tmp_path / "p.ome.zarr") == "ngff-0.5"
