"""Training: exact resume after SIGTERM, weight maps computed when missing, exports."""

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch

from unet_core import ingest
from unet_core.model import UNet
from unet_core.prepare import prepare_targets
from unet_core.train import TileDataset, TrainSettings, load_training_stack, train, weights_digest

SETTINGS = dict(base_channels=4, depth=2, tile=36, batch_size=2, dropout=0.3, validate_every=1000, log_every=5,
                deterministic=True, num_workers=0)


@pytest.fixture(scope="module")
def stacks(demo_tiffs, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    image = ingest.ingest(demo_tiffs / "timelapse_a.tif", root / "a.ome.zarr", labels_path=demo_tiffs / "timelapse_a_labels.tif")
    volume = ingest.ingest(demo_tiffs / "volume_3d.tif", root / "v.ome.zarr", labels_path=demo_tiffs / "volume_3d_labels.tif")
    weights = prepare_targets(image, root / "a.weights.zarr")
    return {"root": root, "image": image, "weights": weights, "volume": volume}


def _train_script(image, weights, out, settings):
    return (
        "from unet_core.train import train, TrainSettings\n"
        "from unet_core.cli import main\n"
        f"train(train_images=[{str(image)!r}], train_weights=[{str(weights)!r}], out_dir={str(out)!r}, "
        f"settings=TrainSettings(**{settings!r}))\n"
    )


def test_resume_after_sigterm_is_exact(stacks, tmp_path):
    """N steps straight vs SIGTERM part-way and the same command again: identical weights.

    All three runs are separate processes, as a restarted SLURM job would be.
    """
    settings = {**SETTINGS, "steps": 80, "checkpoint_every": 10}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    command = [sys.executable, "-c", _train_script(stacks["image"], stacks["weights"], straight, settings)]
    subprocess.run(command, check=True, capture_output=True)
    command = [sys.executable, "-c", _train_script(stacks["image"], stacks["weights"], resumed, settings)]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (resumed / "checkpoint.pt").exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.005)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode != 0, "training finished before the signal: make the run longer"
    assert "rerun the same command to resume" in stderr
    interrupted_at = torch.load(resumed / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= interrupted_at < 80
    assert not (resumed / "model.pt").exists()
    rerun = subprocess.run(command, check=True, capture_output=True, text=True)
    assert f"train: resuming from {resumed / 'checkpoint.pt'} at step {interrupted_at} of 80" in rerun.stderr
    a = torch.load(straight / "model.pt", weights_only=True)["model"]
    b = torch.load(resumed / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The model card records the digest of the weights: a rerun can be checked against it.
    cards = [json.loads((d / "model_card.json").read_text()) for d in (straight, resumed)]
    digests = [c["reproducibility"]["weights_sha256"] for c in cards]
    assert digests[0] == digests[1] == weights_digest(a)
    a[next(iter(a))].view(-1)[0] += 1e-6
    assert weights_digest(a) != digests[0]
    assert cards[0]["reproducibility"]["seed"] == SETTINGS.get("seed", 0)
    assert cards[0]["training_data"][0]["targets"]["w0"] is not None
    log = (resumed / "training_log.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in log[1:]] == list(range(5, 81, 5))


def test_changed_settings_start_afresh(stacks, tmp_path):
    kwargs = dict(train_images=[str(stacks["image"])], train_weights=[str(stacks["weights"])], out_dir=tmp_path)
    train(**kwargs, settings=TrainSettings(**{**SETTINGS, "steps": 4}))
    with pytest.warns(UserWarning, match="other settings, data or augmentation code"):
        train(**kwargs, settings=TrainSettings(**{**SETTINGS, "steps": 6}))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 6
    assert (tmp_path / "checkpoint.previous.pt").exists()


def test_truncated_checkpoint_is_set_aside_and_training_completes(stacks, tmp_path):
    """A checkpoint cut short (full disk, killed copy) must not fail every later night."""
    kwargs = dict(train_images=[str(stacks["image"])], train_weights=[str(stacks["weights"])], out_dir=tmp_path,
                  settings=TrainSettings(**{**SETTINGS, "steps": 4}))
    train(**kwargs)
    checkpoint = tmp_path / "checkpoint.pt"
    truncated = checkpoint.read_bytes()[: checkpoint.stat().st_size // 2]
    checkpoint.write_bytes(truncated)
    (tmp_path / "model.pt").unlink()
    with pytest.warns(UserWarning) as caught:
        train(**kwargs)
    aside = list(tmp_path.glob("checkpoint.corrupt-*.pt"))
    assert len(aside) == 1 and aside[0].read_bytes() == truncated
    message = " ".join(str(w.message) for w in caught)
    assert str(checkpoint) in message and "truncated" in message and aside[0].name in message
    assert torch.load(checkpoint, weights_only=True)["step"] == 4
    assert (tmp_path / "model.pt").exists()


def test_other_augmentation_code_starts_afresh(stacks, tmp_path, monkeypatch):
    """A checkpoint from augmentation code that draws other tiles from the same random numbers
    cannot resume exactly: it is set aside."""
    import unet_core.train

    kwargs = dict(train_images=[str(stacks["image"])], train_weights=[str(stacks["weights"])], out_dir=tmp_path,
                  settings=TrainSettings(**{**SETTINGS, "steps": 4}))
    train(**kwargs)
    monkeypatch.setattr(unet_core.train, "AUGMENTATION_VERSION", unet_core.train.AUGMENTATION_VERSION + 1)
    with pytest.warns(UserWarning, match="augmentation code"):
        train(**kwargs)
    assert (tmp_path / "checkpoint.previous.pt").exists()


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_gradient_norm_is_clipped(stacks, tmp_path, clip):
    """With plain SGD (rate 1, no momentum) one step moves the weights by the clipped gradient."""
    settings = TrainSettings(**{**SETTINGS, "steps": 1, "optimizer": "sgd", "momentum": 0.0, "learning_rate": 1.0,
                                "schedule": "constant", "grad_clip": clip, "dropout": 0.0})
    torch.manual_seed(settings.seed)
    initial = UNet(base_channels=4, depth=2, dropout=0.0).state_dict()
    train(train_images=[str(stacks["image"])], train_weights=[str(stacks["weights"])], out_dir=tmp_path,
          settings=settings)
    trained = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    moved = torch.sqrt(sum(((trained[k] - initial[k].float()) ** 2).sum() for k in initial)).item()
    if clip:
        assert moved == pytest.approx(clip, rel=1e-3)
    else:
        assert moved > 100 * 1e-3


def test_missing_weight_map_is_computed(stacks, tmp_path):
    given = load_training_stack(stacks["image"], stacks["weights"], 2)
    computed = load_training_stack(stacks["image"], tmp_path / "missing.zarr", 2)
    for a, b in zip(given.weights, computed.weights):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(computed.weights[0], 1.0)


def test_corrupt_training_stack_is_named(stacks, tmp_path):
    bad = tmp_path / "broken.ome.zarr"
    bad.mkdir()
    with pytest.raises(ValueError, match="broken.ome.zarr"):
        train(train_images=[str(bad)], out_dir=tmp_path / "out", settings=TrainSettings(steps=1))


def test_outputs_load_without_pickled_code_and_torchscript_matches(stacks, tmp_path):
    out = train(train_images=[str(stacks["image"])], out_dir=tmp_path, settings=TrainSettings(**{**SETTINGS, "steps": 3}))
    state = torch.load(out / "model.pt", weights_only=True)
    torch.load(out / "checkpoint.pt", weights_only=True)
    model = UNet(**state["architecture"])
    model.load_state_dict(state["model"])
    model.eval()
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    x = torch.randn(1, 1, *model.input_shape_for((20, 28)))
    torch.testing.assert_close(scripted(x), model(x))
    card = json.loads((out / "model_card.json").read_text())
    assert card["settings"]["steps"] == 3 and card["training_data"][0]["sha256"]
    assert card["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("ndim,source", [(2, "image"), (3, "volume")])
def test_tile_dataset_is_a_pure_function_of_seed_and_step(stacks, ndim, source):
    settings = TrainSettings(**{**SETTINGS, "ndim": ndim, "tile": 12 if ndim == 3 else 36, "steps": 10})
    stack = load_training_stack(stacks[source], None, ndim)
    model = UNet(base_channels=2, depth=2, ndim=ndim)
    dataset = TileDataset([stack], model, settings)
    first, again, other = dataset[7], dataset[7], dataset[8]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the batch does not depend on torch's thread count
        serial = TileDataset([stack], model, settings)[7]
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, serial):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(first[0], other[0])
    image, target, weight = first
    assert tuple(image.shape) == (2, 1, *model.input_shape_for((settings.tile,) * ndim))
    assert tuple(target.shape) == (2, *(settings.tile,) * ndim) == tuple(weight.shape)
    assert set(np.unique(target.numpy())) <= {0, 1}


def test_settings_from_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown training settings.*'stepz'"):
        TrainSettings.from_config({}, {"stepz": 3})
    assert asdict(TrainSettings.from_config({"depth": 2}, {"steps": 5}))["steps"] == 5


# A mixed-precision training follows the fp32 one over the first 30 steps: the logged mean loss
# of each interval of 5 steps within this fraction of fp32's (measured on this model: bf16 at
# most 0.12 %). fp16's loss scaling skips the first steps, whose scaled gradients overflow while
# GradScaler calibrates its scale (8 % higher loss at step 10), so fp16 is compared on the last
# interval (measured 0.47 %).
AMP_LOSS_RELATIVE = {"bf16": 0.005, "fp16": 0.01}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_follows_fp32(stacks, tmp_path, monkeypatch, precision):
    """The AMP path (autocast, and loss scaling for fp16), run on a CPU in place of a GPU: the
    weights stay float32, they differ from fp32's (the low precision really ran) and the loss
    follows fp32's within the stated bound."""
    from unet_core import train as training

    settings = TrainSettings(**{**SETTINGS, "steps": 30, "dropout": 0.0})
    run = dict(train_images=[str(stacks["image"])], train_weights=[str(stacks["weights"])], settings=settings)
    train(out_dir=tmp_path / "fp32", **run)
    monkeypatch.setattr(training, "training_precision", lambda amp, device: precision)
    train(out_dir=tmp_path / precision, **run)

    def losses(folder):
        rows = (tmp_path / folder / "training_log.tsv").read_text().splitlines()[1:]
        return np.array([float(row.split("\t")[1]) for row in rows])

    exact, mixed = losses("fp32"), losses(precision)
    assert len(exact) == len(mixed) == 6
    compared = slice(None) if precision == "bf16" else slice(-1, None)
    assert np.abs(mixed[compared] / exact[compared] - 1).max() <= AMP_LOSS_RELATIVE[precision], (exact, mixed)
    weights = torch.load(tmp_path / precision / "model.pt", weights_only=True)["model"]
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    assert weights_digest(weights) != weights_digest(torch.load(tmp_path / "fp32" / "model.pt", weights_only=True)["model"])
    assert json.loads((tmp_path / precision / "model_card.json").read_text())["precision"] == precision
    assert json.loads((tmp_path / "fp32" / "model_card.json").read_text())["precision"] == "fp32"


def test_fp16_resume_keeps_the_loss_scale(stacks, tmp_path, monkeypatch):
    """fp16 with loss scaling: a training stopped at step 20 and resumed ends with the weights and
    the loss scale of an uninterrupted one (the checkpoint holds GradScaler's calibrated scale;
    restarting at 2**16 can skip steps again). Run on a CPU in place of a GPU."""
    from unet_core import train as training
    from unet_core.train import TrainingInterrupted

    monkeypatch.setattr(training, "training_precision", lambda amp, device: "fp16")
    settings = TrainSettings(**{**SETTINGS, "steps": 30, "dropout": 0.0, "checkpoint_every": 10})
    run = dict(train_images=[str(stacks["image"])], train_weights=[str(stacks["weights"])], settings=settings)
    train(out_dir=tmp_path / "straight", **run)

    class StopAtStep20:  # _StopRequest as if SIGTERM came during step 20
        reads = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        @property
        def signal(self):
            StopAtStep20.reads += 1
            return signal.SIGTERM if StopAtStep20.reads == 20 else None

    with monkeypatch.context() as patch:
        patch.setattr(training, "_StopRequest", StopAtStep20)
        with pytest.raises(TrainingInterrupted):
            train(out_dir=tmp_path / "resumed", **run)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 20 and state["scaler"]["scale"] < 2.0**16  # calibrated down from the start
    train(out_dir=tmp_path / "resumed", **run)
    straight, resumed = (torch.load(tmp_path / d / "model.pt", weights_only=True)["model"] for d in ("straight", "resumed"))
    assert weights_digest(straight) == weights_digest(resumed)
    scales = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["scaler"] for d in ("straight", "resumed")]
    assert scales[0] == scales[1]


def test_training_precision_is_fp32_on_a_cpu_and_without_amp():
    from unet_core.precision import needs_loss_scaling, training_precision

    assert training_precision(True, "cpu") == training_precision(False, "cuda") == "fp32"
    assert training_precision(True, "cuda") in ("bf16", "fp16")  # which one: the GPU's bf16 support
    assert needs_loss_scaling("fp16") and not needs_loss_scaling("bf16") and not needs_loss_scaling("fp32")
