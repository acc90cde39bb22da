"""Blockwise zarr -> zarr prediction: exact, resumable, same result on a dask cluster."""

import os
import signal
import subprocess
import sys
import threading
import time

import distributed
import numpy as np
import pytest
import tifffile
import torch
from conftest import whole_image_reference

from unet_core import UNet, ingest, io, normalize
from unet_core.blocklog import finished_blocks
from unet_core.predict import CPU_MEMORY_BUDGET, default_tile_shape, predict_image


def _model_file(path, **kwargs):
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2, dropout=0.0, **kwargs)
    torch.save({"model": model.state_dict(), "architecture": model.config()}, path)
    return model.eval(), path


def _image(tmp_path, data, axes):
    tifffile.imwrite(tmp_path / "in.tif", data, metadata={"axes": axes}, photometric="minisblack")
    return ingest.ingest(tmp_path / "in.tif", tmp_path / "in.ome.zarr", axes=axes.lower())


def _normalised(image_path):
    image = io.open_image(image_path)
    mean, std = normalize.intensity_statistics(image)
    return image, np.asarray(mean, np.float32), np.asarray(std, np.float32)


@pytest.mark.parametrize("block", [(16, 24), (32, 32), (64, 80)])
def test_2d_blockwise_equals_whole_image(tmp_path, block):
    model, path = _model_file(tmp_path / "m.pt", in_channels=2)
    data = np.random.default_rng(0).integers(0, 4000, (2, 2, 53, 71)).astype(np.uint16)  # t, c, y, x
    image_path = _image(tmp_path, data, "TCYX")
    summary = predict_image(path, image_path, tmp_path / "out.ome.zarr", block_shape=block, tile_shape=(12, 20),
                            dtype="float32", batch_size=2)
    assert summary["computed"] == 2 * -(-53 // block[0]) * -(-71 // block[1])
    out = io.open_image(tmp_path / "out.ome.zarr")
    assert out.axes == "tcyx" and tuple(out.array.chunks[2:]) == block
    image, mean, std = _normalised(image_path)
    for t in range(2):
        plane = (np.asarray(image.array[t], np.float32) - mean[:, None, None]) / std[:, None, None]
        np.testing.assert_allclose(out.array[t], whole_image_reference(model, plane), atol=1e-5)


def test_default_block_is_two_tile_steps(tmp_path):
    """Without block_shape the blocks (= output chunks) are 2 tile steps per axis, capped by the
    image, and the result is still exact."""
    model, path = _model_file(tmp_path / "m.pt")
    data = np.random.default_rng(5).integers(0, 4000, (61, 93)).astype(np.uint16)
    image_path = _image(tmp_path, data, "YX")
    summary = predict_image(path, image_path, tmp_path / "out.ome.zarr", tile_shape=(12, 28), dtype="float32")
    out = io.open_image(tmp_path / "out.ome.zarr")
    assert tuple(out.array.chunks[1:]) == (24, 56)  # steps 12 and 28 on the pooling grid of 4
    assert summary["blocks"] == 3 * 2
    image, mean, std = _normalised(image_path)
    plane = (np.asarray(image.array[:], np.float32)[None] - mean[0]) / std[0]
    np.testing.assert_allclose(out.array[:], whole_image_reference(model, plane), atol=1e-5)
    assert out.attrs["unet_core"]["tile"] == [12, 28]  # the tile used is recorded


def test_default_tile_used_is_recorded(tmp_path):
    model, path = _model_file(tmp_path / "m.pt")
    image_path = _image(tmp_path, np.zeros((3, 200, 150), np.uint8), "TYX")
    predict_image(path, image_path, tmp_path / "out.ome.zarr", block_shape=(64, 64), device="cpu")
    attrs = io.open_image(tmp_path / "out.ome.zarr").attrs["unet_core"]
    assert attrs["tile"] == list(default_tile_shape(model, (64, 64), "cpu"))
    assert attrs["tile_source"].startswith("default for cpu and a full block")


@pytest.mark.parametrize("block,tile", [((8, 16, 16), None), ((16, 32, 16), (4, 12, 12))])
def test_3d_blockwise_equals_whole_image(tmp_path, block, tile):
    model, path = _model_file(tmp_path / "m.pt", ndim=3)
    data = np.random.default_rng(1).random((13, 37, 29)).astype(np.float32)
    image_path = _image(tmp_path, data, "ZYX")
    predict_image(path, image_path, tmp_path / "out.ome.zarr", block_shape=block, tile_shape=tile, dtype="float32")
    image, mean, std = _normalised(image_path)
    volume = (np.asarray(image.array[:], np.float32)[None] - mean[0]) / std[0]
    np.testing.assert_allclose(io.open_image(tmp_path / "out.ome.zarr").array[:], whole_image_reference(model, volume),
                               atol=1e-5)


def test_tta_is_average_of_transformed_predictions(tmp_path):
    model, path = _model_file(tmp_path / "m.pt")
    data = np.random.default_rng(2).random((1, 40, 40)).astype(np.float32)
    image_path = _image(tmp_path, data, "TYX")
    predict_image(path, image_path, tmp_path / "tta.ome.zarr", dtype="float32", tta=True, tile_shape=(44, 44))
    image, mean, std = _normalised(image_path)
    plane = (np.asarray(image.array[0], np.float32) - mean[0]) / std[0]
    expected = np.zeros((2, 40, 40))
    for k in range(4):
        for flip in (False, True):
            x = np.rot90(plane[:, ::-1] if flip else plane, k)
            p = np.rot90(whole_image_reference(model, x[None].copy()), -k, axes=(1, 2))
            expected += p[:, :, ::-1] if flip else p
    np.testing.assert_allclose(io.open_image(tmp_path / "tta.ome.zarr").array[0], expected / 8, atol=1e-5)


def test_kill_and_resume_computes_only_missing_blocks(tmp_path):
    _, path = _model_file(tmp_path / "m.pt")
    data = np.random.default_rng(3).integers(0, 255, (24, 128, 128)).astype(np.uint8)
    image_path = _image(tmp_path, data, "TYX")
    reference = tmp_path / "reference.ome.zarr"
    total = predict_image(path, image_path, reference, block_shape=(32, 32), scheduler="synchronous")["blocks"]
    target = tmp_path / "out.ome.zarr"
    script = (f"from unet_core.predict import predict_image\n"
              f"predict_image({str(path)!r}, {str(image_path)!r}, {str(target)!r}, block_shape=(32, 32), "
              f"scheduler='synchronous')\n")
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    logs = tmp_path / ".out.ome.zarr.partial" / ".blocks"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if logs.exists() and len(finished_blocks(logs)) >= total // 2:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "prediction finished before the kill: make the volume larger"
    assert not target.exists()
    finished = len(finished_blocks(logs))
    assert 0 < finished < total
    summary = predict_image(path, image_path, target, block_shape=(32, 32), scheduler="synchronous")
    assert summary["resumed"] and summary["computed"] == total - finished
    np.testing.assert_array_equal(io.open_image(target).array[:], io.open_image(reference).array[:])


def test_distributed_cluster_gives_same_output(tmp_path):
    _, path = _model_file(tmp_path / "m.pt")
    data = np.random.default_rng(4).integers(0, 255, (3, 64, 96)).astype(np.uint8)
    image_path = _image(tmp_path, data, "TYX")
    predict_image(path, image_path, tmp_path / "local.ome.zarr", block_shape=(32, 32))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            predict_image(path, image_path, tmp_path / "cluster.ome.zarr", block_shape=(32, 32),
                          scheduler="distributed")
    np.testing.assert_array_equal(io.open_image(tmp_path / "cluster.ome.zarr").array[:],
                                  io.open_image(tmp_path / "local.ome.zarr").array[:])


def _executing(dask_worker):
    return len(dask_worker.state.executing)


def test_lost_worker_blocks_are_redone_and_logged(tmp_path, caplog):
    """SIGKILL one busy worker process past half-way: its task runs again elsewhere, skips the
    blocks its log holds, redoes the rest (logged), and the output equals the local scheduler's.
    Four tasks on two workers: at 5/8 of the blocks each worker is inside its second task."""
    _, path = _model_file(tmp_path / "m.pt")
    data = np.random.default_rng(6).integers(0, 255, (24, 128, 128)).astype(np.uint8)
    image_path = _image(tmp_path, data, "TYX")
    total = predict_image(path, image_path, tmp_path / "local.ome.zarr", block_shape=(32, 32))["blocks"]
    logs = tmp_path / ".cluster.ome.zarr.partial" / ".blocks"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            outcome = {}

            def run():
                try:
                    outcome["summary"] = predict_image(path, image_path, tmp_path / "cluster.ome.zarr",
                                                       block_shape=(32, 32), scheduler="distributed", partitions=4)
                except BaseException as error:  # noqa: BLE001 - reported by the assertion below
                    outcome["error"] = error

            runner = threading.Thread(target=run)
            runner.start()
            killed, deadline = None, time.time() + 120
            while killed is None and runner.is_alive() and time.time() < deadline:
                if logs.exists() and len(finished_blocks(logs)) >= total * 5 // 8:
                    busy = [address for address, n in client.run(_executing).items() if n]
                    if busy:
                        killed = client.run(os.getpid, workers=busy[:1])[busy[0]]
                        os.kill(killed, signal.SIGKILL)
                time.sleep(0.01)
            runner.join(300)
    assert killed is not None, "prediction finished before a worker could be killed: make the volume larger"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["blocks"] == total
    redone = [r.getMessage() for r in caplog.records if "ran again (its worker was lost): redid" in r.getMessage()]
    assert redone, [r.getMessage() for r in caplog.records]
    np.testing.assert_array_equal(io.open_image(tmp_path / "cluster.ome.zarr").array[:],
                                  io.open_image(tmp_path / "local.ome.zarr").array[:])


def test_bad_inputs_raise_and_publish_nothing(tmp_path, monkeypatch):
    _, path2d = _model_file(tmp_path / "m2.pt")
    _, path_rgb = _model_file(tmp_path / "m3.pt", in_channels=3)
    volume = _image(tmp_path, np.zeros((4, 32, 32), np.uint8), "ZYX")
    target = tmp_path / "out.ome.zarr"
    with pytest.raises(ValueError, match="2D model cannot predict the 3D volume"):
        predict_image(path2d, volume, target)
    with pytest.raises(ValueError, match="1 channel.*expects 3"):
        predict_image(path_rgb, volume, target, planewise=True)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        predict_image(tmp_path / "missing.pt", volume, target)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not an OME-Zarr image"):
        predict_image(path2d, tmp_path / "plain", target)
    with pytest.raises(ValueError, match="block_shape"):
        predict_image(path2d, volume, target, planewise=True, block_shape=(30, 30))
    _, path3d = _model_file(tmp_path / "m3d.pt", ndim=3)
    monkeypatch.setitem(CPU_MEMORY_BUDGET, 3, 2**20)
    for block in (None, (4, 16, 16)):
        with pytest.raises(ValueError, match=r"no output tile fits the memory budget of 1 MiB"):
            predict_image(path3d, volume, target, block_shape=block, device="cpu")
    assert not target.exists() and not list(tmp_path.glob(".out.ome.zarr*"))


PREDICT_KILLED_AT = """
import os, signal, sys
from unet_core import atomic
from unet_core.predict import predict_image
def hook(name):
    if name == sys.argv[4]:
        os.kill(os.getpid(), signal.SIGKILL)
atomic._STEP_HOOK = hook
predict_image(sys.argv[1], sys.argv[2], sys.argv[3], block_shape=(32, 32), dtype="float32")
"""


@pytest.mark.parametrize("step, after", [("exchange", "old"), ("cleanup", "new")])
def test_kill_while_publishing_never_leaves_the_output_missing_or_half_written(tmp_path, step, after):
    """A rerun with another model over an existing output, SIGKILLed at each step of publishing."""
    data = np.random.default_rng(8).integers(0, 255, (2, 64, 64)).astype(np.uint8)
    image_path = _image(tmp_path, data, "TYX")
    _, first = _model_file(tmp_path / "first.pt")
    torch.manual_seed(1)
    other = UNet(base_channels=4, depth=2, dropout=0.0)
    second = tmp_path / "second.pt"
    torch.save({"model": other.state_dict(), "architecture": other.config()}, second)
    references = {}
    for name, model in (("old", first), ("new", second)):
        predict_image(model, image_path, tmp_path / f"{name}.ome.zarr", block_shape=(32, 32), dtype="float32")
        references[name] = np.asarray(io.open_image(tmp_path / f"{name}.ome.zarr").array[:])
    assert not np.array_equal(references["old"], references["new"])
    target = tmp_path / "out.ome.zarr"
    predict_image(first, image_path, target, block_shape=(32, 32), dtype="float32")
    run = subprocess.run([sys.executable, "-c", PREDICT_KILLED_AT, str(second), str(image_path), str(target), step])
    assert run.returncode == -signal.SIGKILL
    np.testing.assert_array_equal(np.asarray(io.open_image(target).array[:]), references[after])
    # the rerun finishes the job: the new output, nothing left beside it
    predict_image(second, image_path, target, block_shape=(32, 32), dtype="float32")
    np.testing.assert_array_equal(np.asarray(io.open_image(target).array[:]), references["new"])
    assert not list(tmp_path.glob(".out.ome.zarr*"))


def test_compiled_model_gives_the_eager_result(tmp_path):
    """predict.compile: the blocks run through torch.compile and give the eager result (float
    rounding at most), recorded in the provenance. Blocks of one shape: one compilation."""
    _, path = _model_file(tmp_path / "m.pt")
    image_path = _image(tmp_path, np.random.default_rng(7).integers(0, 4000, (96, 128)).astype(np.uint16), "YX")
    run = dict(block_shape=(32, 64), tile_shape=(32, 32), dtype="float32", device="cpu")
    predict_image(path, image_path, tmp_path / "eager.ome.zarr", **run)
    predict_image(path, image_path, tmp_path / "compiled.ome.zarr", compile=True, **run)
    eager, compiled = (io.open_image(tmp_path / f"{name}.ome.zarr") for name in ("eager", "compiled"))
    np.testing.assert_allclose(np.asarray(compiled.array), np.asarray(eager.array), rtol=0, atol=1e-6)
    assert compiled.attrs["unet_core"]["compiled"] is True
    assert eager.attrs["unet_core"]["compiled"] is False


def test_a_cluster_worker_decides_device_tile_and_precision(tmp_path, monkeypatch):
    """On a cluster the head (often a CPU node) asks a worker for its device, memory budget and
    precision, and places the blocks and tiles with them: here a worker that answers a budget
    of 1 MiB and bf16, which the head, asked itself, would not (160 MiB, fp32)."""
    from unet_core import predict

    model, path = _model_file(tmp_path / "m.pt")
    image_path = _image(tmp_path, np.random.default_rng(7).integers(0, 255, (96, 128)).astype(np.uint8), "YX")

    def on_a_worker(device, precision, ndim):
        distributed.get_worker()  # raises outside a worker: the head must not answer for it
        return "cpu", 2**20, "bf16" if precision == "auto" else precision

    monkeypatch.setattr(predict, "resolve_device", on_a_worker)
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        with distributed.Client(cluster):
            predict_image(path, image_path, tmp_path / "out.ome.zarr", scheduler="distributed", precision="auto")
    provenance = io.open_image(tmp_path / "out.ome.zarr").attrs["unet_core"]
    small = default_tile_shape(model, (96, 128), "cpu", memory_budget=2**20)
    assert provenance["precision"] == "bf16"
    assert tuple(provenance["tile"]) == small != default_tile_shape(model, (96, 128), "cpu")


def test_a_gpu_less_head_places_blocks_for_a_gpu_worker(tmp_path):
    """The head places blocks for CUDA workers from the budget a worker reported, without CUDA."""
    from unet_core.predict import block_layout

    model, path = _model_file(tmp_path / "m.pt", ndim=3)
    image_path = _image(tmp_path, np.zeros((40, 200, 300), np.uint8), "ZYX")
    layout = block_layout(model, path, image_path, None, None, "cuda", None, False, memory_budget=2**30)
    assert layout.tile == default_tile_shape(model, (40, 200, 300), "cuda", memory_budget=2**30)


def test_resolve_device_names_the_host_when_cuda_is_missing():
    from unet_core.predict import resolve_device

    assert resolve_device("cpu", "auto", 3) == ("cpu", None, "fp32")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        resolve_device("cuda", "auto", 2)


def test_bad_input_fails_before_slurm_worker_jobs_are_queued(tmp_path, monkeypatch):
    """A block off the pooling grid is refused with the rule, and with scheduler slurm before any
    worker job is asked for (the head asks a worker for its device only after the checks)."""
    from unet_core import cluster

    def no_jobs(settings):
        raise AssertionError("worker jobs were queued for a job with bad input")

    monkeypatch.setattr(cluster, "slurm_client", no_jobs)
    _, path = _model_file(tmp_path / "m.pt")
    image_path = _image(tmp_path, np.zeros((64, 64), np.uint8), "YX")
    for scheduler in ("synchronous", "slurm"):
        with pytest.raises(ValueError, match=r"block_shape \(30, 32\) must have 2 positive multiples of 4"):
            predict_image(path, image_path, tmp_path / "out.ome.zarr", block_shape=(30, 32), scheduler=scheduler)
    assert not (tmp_path / "out.ome.zarr").exists() and not (tmp_path / ".out.ome.zarr.partial").exists()
