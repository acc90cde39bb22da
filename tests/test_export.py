"""bioimage.io export and import: the package passes bioimageio.core's own model test offline,
reproduces our overlap-tile prediction within 1e-4, and predicts as the original when imported."""

import json
import socket

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage

from unet_core import io
from unet_core.checkpoint import CheckpointError, load_model
from unet_core.cli import main
from unet_core.export import PACKAGE_FILE, TEST_TOLERANCE, export_bioimageio
from unet_core.model import SameSizeUNet, UNet
from unet_core.normalize import Normalization, NormalizationTable, image_statistics
from unet_core.overlap_tile import predict_tiled
from unet_core.predict import predict_image


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach another machine fails the test."""
    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access to {address} during an offline test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: (_ for _ in ()).throw(
        AssertionError(f"DNS lookup of {host} during an offline test")))


def _model(folder, normalization=None, **kwargs):
    torch.manual_seed(0)
    model = UNet(dropout=0.0, **{"base_channels": 4, "depth": 2, **kwargs})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "architecture": model.config(),
                "normalization": (normalization or Normalization()).as_dict()}, folder / "model.pt")
    return model.eval(), folder / "model.pt"


def _image(path, shape, axes, chunks):
    rng = np.random.default_rng(3)
    data = ndimage.gaussian_filter(rng.random(shape), 2) * 4000 + rng.normal(0, 20, shape) + 300
    _, array = io.create_image(path, axes, shape, "uint16", [1.0] * len(axes), chunks, path.name)
    array[...] = np.clip(data, 0, 65535).astype(np.uint16)
    return path


def _bioimageio_test(package):
    import bioimageio.core

    summary = bioimageio.core.test_model(package, devices=["cpu"])
    return summary.status == "passed", summary


@pytest.mark.parametrize("normalization", [Normalization(), Normalization(method="percentile", scope="image")],
                         ids=["zscore", "percentile"])
def test_exported_package_passes_the_bioimageio_model_test_offline(tmp_path, offline, normalization):
    model, path = _model(tmp_path / "demo", normalization)
    sample = _image(tmp_path / "s.ome.zarr", (2, 150, 170), "zyx", (1, 64, 64))
    package = export_bioimageio(path, tmp_path / "pkg", sample=sample)
    assert package.name == PACKAGE_FILE
    passed, summary = _bioimageio_test(package)
    assert passed, summary.format()
    description = yaml.safe_load(package.read_text())
    # bioimage.io holds the package to our tolerance, not its default 1e-3
    assert description["config"]["bioimageio"]["reproducibility_tolerance"][0]["absolute_tolerance"] == TEST_TOLERANCE
    assert set(description["weights"]) == {"pytorch_state_dict", "torchscript"}
    assert description["license"] == "MIT" and description["cite"][0]["doi"] == "10.1007/978-3-319-24574-4_28"
    net = SameSizeUNet(**model.config())
    y_axis = next(a for a in description["outputs"][0]["axes"] if a.get("id") == "y")
    assert y_axis["halo"] == net.halo == model.margin()
    assert next(a for a in description["inputs"][0]["axes"] if a.get("id") == "x")["size"] == {
        "min": net.min_size, "step": net.step}
    # the test output is our overlap-tile prediction of the test input (a crop of the middle plane)
    raw = np.load(package.parent / "test_input.npy")[0]
    offset, divisor = image_statistics(raw.reshape(1, -1), normalization)
    ours = predict_tiled(model, NormalizationTable(normalization, (), (), (offset,), (divisor,)).apply(raw, {}),
                         device="cpu")
    assert np.array_equal(np.load(package.parent / "test_output.npy")[0], ours)
    assert 0.05 < ours[1].mean() < 0.95 and ours.std() > 0.05  # a test the package could fail
    assert raw.shape == (1, 150 - (150 - net.min_size) % net.step, 170 - (170 - net.min_size) % net.step)


def test_bioimageio_reproduction_is_checked_against_the_test_output(tmp_path, offline):
    """The model test fails when the package's output is not the stored one (the check is real)."""
    _, path = _model(tmp_path / "demo")
    package = export_bioimageio(path, tmp_path / "pkg", sample=_image(tmp_path / "s.ome.zarr", (120, 120), "yx",
                                                                      (64, 64)))
    output = package.parent / "test_output.npy"
    values = np.load(output)
    values[0, 1, 40:50, 40:50] += 5 * TEST_TOLERANCE
    np.save(output, values)
    description = yaml.safe_load(package.read_text())
    description["outputs"][0]["test_tensor"].pop("sha256")
    package.write_text(yaml.safe_dump(description))
    passed, _ = _bioimageio_test(package)
    assert not passed


def test_a_3d_model_exports_and_passes(tmp_path, offline):
    _, path = _model(tmp_path / "demo3d", ndim=3, depth=1)
    sample = _image(tmp_path / "v.ome.zarr", (40, 40, 44), "zyx", (16, 32, 32))
    package = export_bioimageio(path, tmp_path / "pkg", sample=sample)
    passed, summary = _bioimageio_test(package)
    assert passed, summary.format()
    assert np.load(package.parent / "test_input.npy").ndim == 5


def test_round_trip_predicts_what_the_original_predicts(tmp_path, offline):
    _, path = _model(tmp_path / "demo", Normalization(method="percentile"))
    image = _image(tmp_path / "in.ome.zarr", (3, 140, 150), "zyx", (1, 64, 64))
    package = export_bioimageio(path, tmp_path / "pkg", sample=image)
    original = predict_image(path, image, tmp_path / "a.ome.zarr", device="cpu", dtype="float32", planewise=True)
    imported = predict_image(package, image, tmp_path / "b.ome.zarr", device="cpu", dtype="float32", planewise=True)
    assert original["blocks"] == imported["blocks"]
    a, b = io.open_image(tmp_path / "a.ome.zarr"), io.open_image(tmp_path / "b.ome.zarr")
    assert np.array_equal(np.asarray(a.array), np.asarray(b.array))
    assert a.attrs["unet_core"]["normalization"] == b.attrs["unet_core"]["normalization"]
    model, checkpoint = load_model(package)
    assert checkpoint["source_model"]["file"] == "model.pt"


def test_the_command_line_exports_and_predicts_with_the_package(tmp_path, offline, capsys):
    _, path = _model(tmp_path / "demo")
    image = _image(tmp_path / "in.ome.zarr", (100, 110), "yx", (64, 64))
    assert main(["export", "--model", str(path), "--format", "bioimageio", "--out", str(tmp_path / "pkg"),
                 "--sample", str(image), "--author", "Facility <B&W>"]) == 0
    package = capsys.readouterr().out.strip()
    assert package == str(tmp_path / "pkg" / PACKAGE_FILE)
    assert yaml.safe_load(open(package))["authors"] == [{"name": "Facility <B&W>"}]
    assert main(["predict", "--model", package, "--input", str(image), "--output", str(tmp_path / "p.ome.zarr"),
                 "--device", "cpu"]) == 0
    assert io.open_image(tmp_path / "p.ome.zarr").shape == (2, 100, 110)


def test_packages_unet_core_did_not_write_are_refused_with_the_reason(tmp_path, offline):
    _, path = _model(tmp_path / "demo")
    package = export_bioimageio(path, tmp_path / "pkg")  # no sample: smoothed noise
    description = yaml.safe_load(package.read_text())
    del description["config"]["unet_core"]
    package.write_text(yaml.safe_dump(description))
    with pytest.raises(CheckpointError, match="did not export"):
        load_model(package)
    (tmp_path / "broken.yaml").write_text("name: x\n")
    with pytest.raises(CheckpointError, match="not a valid bioimage.io model package"):
        load_model(tmp_path / "broken.yaml")
    with pytest.raises(FileNotFoundError, match="give a model.pt, or the bioimageio.yaml"):
        load_model(tmp_path / "pkg")


def test_samples_that_do_not_fit_the_model_are_named(tmp_path):
    _, path = _model(tmp_path / "demo")
    with pytest.raises(ValueError, match="smallest input is 44 px"):
        export_bioimageio(path, tmp_path / "pkg", sample=_image(tmp_path / "small.ome.zarr", (30, 60), "yx", (30, 60)))
    with pytest.raises(ValueError, match="2 channel"):
        export_bioimageio(path, tmp_path / "pkg", sample=_image(tmp_path / "rgb.ome.zarr", (2, 60, 60), "cyx",
                                                                (2, 60, 60)))
    assert not (tmp_path / "pkg").exists()  # nothing half-written


def test_the_documentation_holds_the_model_card(tmp_path):
    _, path = _model(tmp_path / "demo")
    (path.parent / "model_card.json").write_text(json.dumps({
        "training_data": [{"stack": "nuclei_01"}], "final_metrics": {"val_iou": 0.9}, "training_seconds": 12}))
    package = export_bioimageio(path, tmp_path / "pkg")
    text = (package.parent / "README.md").read_text()
    assert "`nuclei_01`" in text and '"val_iou": 0.9' in text and "10.1007/978-3-319-24574-4_28" in text
