"""unet-core plan: a terabyte volume planned from metadata in seconds; the estimate of a small
real volume within 30 % of the measured wall time."""

import time

import numpy as np
import pytest
import tifffile
import torch

from unet_core import UNet, ingest, io
from unet_core.cli import main
from unet_core.plan import plan_prediction
from unet_core.predict import predict_image


def _model(path, **kwargs):
    torch.manual_seed(0)
    model = UNet(dropout=0.0, **kwargs)
    torch.save({"model": model.state_dict(), "architecture": model.config()}, path)
    return path


def test_plan_of_a_terabyte_volume_reads_metadata_only_and_answers_in_seconds(tmp_path, capsys):
    model = _model(tmp_path / "m.pt", base_channels=4, depth=2)
    volume = tmp_path / "tera.ome.zarr"
    volume.mkdir()
    io.create_image(volume, "zyx", (10_000, 10_000, 10_000), "uint8", (1.0, 1.0, 1.0), (64, 256, 256), volume.name)
    began = time.perf_counter()
    assert main(["plan", "--input", str(volume), "--model", str(model), "--workers", "16", "--device", "cpu",
                 "--planewise"]) == 0
    elapsed = time.perf_counter() - began
    out = capsys.readouterr().out
    assert elapsed < 60, out
    assert "1,000,000,000,000 voxels" in out and "16 worker(s)" in out
    assert not [p for p in (volume / "0").rglob("*") if p.is_file() and not p.name.startswith(".z")]  # no chunk
    plan = plan_prediction(model, volume, workers=16, device="cpu", calibration_blocks=1, planewise=True)
    blocks_per_axis = [-(-10_000 // b) for b in plan.block_shape]
    assert plan.blocks == 10_000 * blocks_per_axis[0] * blocks_per_axis[1]
    assert plan.input_bytes == 10**12 and plan.output_bytes == 2 * 2 * 10**12  # 2 classes, float16
    assert plan.wall_seconds == pytest.approx(plan.statistics_seconds + plan.startup_seconds + plan.block_seconds / 16)


def test_estimate_of_a_small_volume_is_within_30_percent_of_the_run(tmp_path):
    model = _model(tmp_path / "m.pt", base_channels=8, depth=3)
    data = np.random.default_rng(0).integers(0, 255, (12, 1000, 1100)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", data, metadata={"axes": "ZYX"}, photometric="minisblack")
    image = ingest.ingest(tmp_path / "in.tif", tmp_path / "in.ome.zarr", axes="zyx")
    plan = plan_prediction(model, image, device="cpu", planewise=True)
    began = time.perf_counter()
    summary = predict_image(model, image, tmp_path / "out.ome.zarr", planewise=True, device="cpu")
    measured = time.perf_counter() - began
    assert summary["blocks"] == plan.blocks
    assert plan.wall_seconds == pytest.approx(measured, rel=0.3), plan.text()


def test_plan_refuses_what_predict_refuses(tmp_path):
    model = _model(tmp_path / "m.pt", base_channels=4, depth=2)
    volume = tmp_path / "v.ome.zarr"
    volume.mkdir()
    io.create_image(volume, "zyx", (4, 64, 64), "uint8", (1.0, 1.0, 1.0), (4, 64, 64), volume.name)
    with pytest.raises(ValueError, match="2D model cannot predict the 3D volume"):
        plan_prediction(model, volume, planewise=False)
    with pytest.raises(ValueError, match="block_shape"):
        plan_prediction(model, volume, block_shape=(30, 30), planewise=True)
    with pytest.raises(ValueError, match="workers"):
        plan_prediction(model, volume, workers=0)
