"""Mixed precision (bf16/fp16 autocast) for prediction: CPU-testable paths, the stated bound of
bf16 against fp32, fp32 unchanged, and the upload path's fallback off CUDA."""

import numpy as np
import pytest
import torch

from unet_core import io
from unet_core.model import UNet, valid_sizes
from unet_core.overlap_tile import memory_format, padded_region, predict_padded, predict_tiled
from unet_core.precision import autocast, resolve_precision
from unet_core.predict import predict_image
from unet_core.tiling import read_reflected

# bf16 keeps 8 bits of mantissa: a probability moves by at most this much (measured on the
# ISBI 2012 model (max 0.066, mean 0.0004), the demo model and random models: docs/predict.md)
BF16_MAX = 0.1
BF16_MEAN = 0.005


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return UNet(base_channels=8, depth=2, dropout=0.0, **kwargs).eval()


def test_auto_is_fp32_on_a_cpu_and_names_are_checked():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", "cpu")


def test_fp32_on_cuda_is_ieee_not_tf32(monkeypatch):
    """torch allows TF32 in cuDNN convolutions by default; the fp32 path turns it off (the flag is
    settable without a GPU), a CPU fp32 pass leaves it alone."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    with autocast("fp32", "cpu"):
        pass
    assert torch.backends.cudnn.allow_tf32
    autocast("fp32", "cuda")
    assert not torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("ndim", [2, 3])
def test_bf16_differs_from_fp32_within_the_stated_bound(ndim):
    model = _model(ndim=ndim)
    shape = (1, 120, 130) if ndim == 2 else (1, 40, 44, 48)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    exact = predict_tiled(model, image, device="cpu")
    half = predict_tiled(model, image, device="cpu", precision="bf16")
    difference = np.abs(half - exact)
    assert 0 < difference.max() <= BF16_MAX and difference.mean() <= BF16_MEAN
    assert np.allclose(half.sum(axis=0), 1.0, atol=1e-5)  # still probabilities (softmax in fp32)


def test_fp16_autocast_runs_on_a_cpu():
    model = _model()
    image = np.random.default_rng(1).normal(size=(1, 60, 64)).astype(np.float32)
    assert np.abs(predict_tiled(model, image, device="cpu", precision="fp16")
                  - predict_tiled(model, image, device="cpu")).max() <= BF16_MAX


def test_prefetching_batches_changes_nothing_in_fp32():
    """The next batch is prepared while the current one computes: the result is the same."""
    model = _model().to(memory_format=memory_format(2))  # as predict_tiled runs it
    image = np.random.default_rng(2).normal(size=(1, 150, 160)).astype(np.float32)
    size, tile = image.shape[1:], (valid_sizes(model.depth, kind="output", near=36)[0],) * 2
    padded = read_reflected(image, *padded_region(model, (0, 0), size, tile))
    one = predict_padded(model, padded, size, tile, batch_size=1)
    three = predict_padded(model, padded, size, tile, batch_size=3)  # 25 tiles: batches 3, 3, ..., 1
    assert np.abs(one - three).max() < 1e-5  # a batch of 3 sums in another order: float rounding only
    assert np.array_equal(one, predict_tiled(model, image, tile_shape=tile, device="cpu"))


def test_predict_records_the_precision_and_never_resumes_another(tmp_path, monkeypatch):
    from unet_core import predict

    model = _model()
    torch.save({"model": model.state_dict(), "architecture": model.config()}, tmp_path / "m.pt")
    _, array = io.create_image(tmp_path / "in.ome.zarr", "yx", (100, 110), "uint8", [1.0, 1.0], (64, 64), "in")
    array[...] = np.random.default_rng(3).integers(0, 255, (100, 110))
    image, out = tmp_path / "in.ome.zarr", tmp_path / "p.ome.zarr"
    exact = predict_image(tmp_path / "m.pt", image, tmp_path / "a.ome.zarr", device="cpu", dtype="float32")
    assert io.open_image(tmp_path / "a.ome.zarr").attrs["unet_core"]["precision"] == "fp32"
    # a bf16 run whose publish fails leaves its finished blocks behind ...
    monkeypatch.setattr(predict, "_publish", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        predict_image(tmp_path / "m.pt", image, out, device="cpu", dtype="float32", precision="bf16")
    monkeypatch.undo()
    # ... which an fp32 run does not take: it starts over, and a bf16 run resumes only its own
    again = predict_image(tmp_path / "m.pt", image, out, device="cpu", dtype="float32")
    assert not again["resumed"] and again["computed"] == again["blocks"] == exact["blocks"]
    assert np.array_equal(np.asarray(io.open_image(out).array), np.asarray(io.open_image(tmp_path / "a.ome.zarr").array))
    monkeypatch.setattr(predict, "_publish", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        predict_image(tmp_path / "m.pt", image, tmp_path / "b.ome.zarr", device="cpu", dtype="float32",
                      precision="bf16")
    monkeypatch.undo()
    resumed = predict_image(tmp_path / "m.pt", image, tmp_path / "b.ome.zarr", device="cpu", dtype="float32",
                            precision="bf16")
    assert resumed["resumed"] and resumed["computed"] == 0
    half = io.open_image(tmp_path / "b.ome.zarr")
    assert half.attrs["unet_core"]["precision"] == "bf16"
    assert 0 < np.abs(np.asarray(half.array) - np.asarray(io.open_image(out).array)).max() <= BF16_MAX


def test_full_batches_pad_the_last_batch_and_change_nothing():
    """full_batches (used with a compiled model): the model sees one batch shape, and the result
    is that of the ragged batches (within float rounding: on a CPU a batch of one runs other kernels)."""
    model = _model(ndim=2).to(memory_format=memory_format(2))
    tile = (valid_sizes(2, kind="output", near=12)[0],) * 2
    size = (3 * tile[0], 2 * tile[1] + 4)  # 9 tiles: batches of 4, 4 and 1
    start, stop = padded_region(model, (0, 0), size, tile)
    padded = read_reflected(np.random.default_rng(3).normal(size=(1, *size)).astype(np.float32), start, stop)
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    full = predict_padded(model, padded, size, tile, batch_size=4, full_batches=True)
    hook.remove()
    ragged = predict_padded(model, padded, size, tile, batch_size=4)
    assert {s[0] for s in shapes} == {4} and len(shapes) == 3
    np.testing.assert_allclose(full, ragged, rtol=0, atol=1e-5)


def test_out_of_memory_halves_the_batch_and_names_the_tile(caplog):
    """A pass that runs out of (GPU) memory is retried with half the tiles per pass, logged, and
    the result is that of the batch that fits; out of memory with one tile per pass names the tile."""
    model = _model(ndim=2).to(memory_format=memory_format(2))
    tile = (valid_sizes(2, kind="output", near=12)[0],) * 2
    size = (3 * tile[0], 2 * tile[1])  # 6 tiles
    start, stop = padded_region(model, (0, 0), size, tile)
    padded = read_reflected(np.random.default_rng(4).normal(size=(1, *size)).astype(np.float32), start, stop)
    reference = predict_padded(model, padded, size, tile, batch_size=1)

    def fits(tiles):
        def check(module, args):
            if args[0].shape[0] > tiles:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return model.register_forward_pre_hook(check)

    hook = fits(2)
    with caplog.at_level("WARNING", logger="unet_core.overlap_tile"):
        halved = predict_padded(model, padded, size, tile, batch_size=6)  # 6 -> 3 -> 1
    hook.remove()
    np.testing.assert_array_equal(halved, reference)
    assert ["with 6 tiles" in m and "again with 3" in m for m in caplog.messages] == [True, False]
    assert "with 3 tiles" in caplog.messages[1] and "again with 1" in caplog.messages[1]
    hook = fits(0)
    with pytest.raises(torch.OutOfMemoryError, match=r"one output tile \(\d+, \d+\) per pass"):
        predict_padded(model, padded, size, tile, batch_size=1)
    hook.remove()
