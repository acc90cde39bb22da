"""`predict --scheduler slurm` on the local one-node SLURM cluster (scripts/local_slurm.sh).

Dask workers run as SLURM jobs (dask-jobqueue), two of them on this machine's two CPUs:
the output must equal the local scheduler's, the worker jobs must show in `squeue` while the
run goes on and none may remain afterwards: after success, after a failure, after SIGTERM.
A worker job cancelled half-way must not change the output, and the log names the redone blocks.
"""

import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import tifffile
import torch
import yaml
from conftest import slurm

from unet_core import UNet, ingest, io
from unet_core.blocklog import finished_blocks
from unet_core.predict import predict_image

pytestmark = pytest.mark.slurm

BLOCK = "32,32"
ACTIVE = "PENDING,RUNNING,COMPLETING,CONFIGURING"


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A small 2D model, a (48, 128, 128) stack and the local scheduler's probabilities of it."""
    root = tmp_path_factory.mktemp("slurm_predict")
    torch.manual_seed(0)
    model = UNet(base_channels=8, depth=2, dropout=0.0)
    torch.save({"model": model.state_dict(), "architecture": model.config()}, root / "m.pt")
    data = np.random.default_rng(0).integers(0, 255, (48, 128, 128)).astype(np.uint8)
    tifffile.imwrite(root / "in.tif", data, metadata={"axes": "TYX"}, photometric="minisblack")
    image = ingest.ingest(root / "in.tif", root / "in.ome.zarr", axes="tyx")
    reference = predict_image(root / "m.pt", image, root / "local.ome.zarr", block_shape=(32, 32))
    return root, image, reference["blocks"]


def _settings(root, name, **extra):
    """Worker jobs for this machine: two 1-CPU workers in the cpu partition, no GPU."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "minimum_workers": 2, "maximum_workers": 2, "cores": 1, "memory": "2GB", "gpus": 0, "partition": "cpu",
        "walltime": "00:20:00", "job_name": name, "log_directory": str(root / "worker-logs" / name),
        "start_timeout": 300, **extra}))
    return path


def _start(root, image, name, env, output=None):
    output = output or root / f"{name}.ome.zarr"
    command = [sys.executable, "-m", "unet_core.cli", "predict", "--model", str(root / "m.pt"), "--input", str(image),
               "--output", str(output), "--block", BLOCK, "--scheduler", "slurm", "--slurm", str(_settings(root, name))]
    return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _jobs(env, name, states=ACTIVE):
    """(job id, state) of the worker jobs named ``name`` in the given states."""
    out = slurm(env, "squeue", "--noheader", "--name", name, f"--states={states}", "--format=%i %T")
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def _wait_until_finished(root, name, share, child, timeout=300):
    """Wait until ``share`` of the blocks are written by run ``name`` (or the child exits)."""
    logs = root / f".{name}.ome.zarr.partial" / ".blocks"
    deadline = time.time() + timeout
    while time.time() < deadline and child.poll() is None:
        if logs.exists() and len(finished_blocks(logs)) >= share:
            return len(finished_blocks(logs))
        time.sleep(0.05)
    return None


def _no_job_left(env, name, timeout=60):
    deadline = time.time() + timeout
    while _jobs(env, name) and time.time() < deadline:
        time.sleep(1)
    return _jobs(env, name)


def _same_output(root, name):
    np.testing.assert_array_equal(io.open_image(root / f"{name}.ome.zarr").array[:],
                                  io.open_image(root / "local.ome.zarr").array[:])


def test_slurm_workers_give_the_local_output_and_leave_no_job(slurm_env, volume):
    root, image, total = volume
    name = f"unet-test-{uuid.uuid4().hex[:6]}"
    child = _start(root, image, name, slurm_env)
    seen = set()
    while child.poll() is None:
        seen |= {job for job, state in _jobs(slurm_env, name, "RUNNING")}
        time.sleep(0.5)
    out, err = child.communicate()
    assert child.returncode == 0, err
    assert len(seen) >= 2, f"squeue showed {len(seen)} running worker job(s) of {name}"
    assert f"{total} of {total} blocks computed" in out
    _same_output(root, name)
    assert _no_job_left(slurm_env, name) == []
    history = _jobs(slurm_env, name, "all")
    assert {job for job, _ in history} >= seen


def test_cancelled_worker_job_is_replaced_and_its_blocks_redone(slurm_env, volume):
    root, image, total = volume
    name = f"unet-test-{uuid.uuid4().hex[:6]}"
    child = _start(root, image, name, slurm_env)
    reached = _wait_until_finished(root, name, total // 2, child)
    assert reached is not None, f"the run ended before half-way: {child.communicate()[1][-3000:]}"
    running = [job for job, state in _jobs(slurm_env, name, "RUNNING")]
    assert running, "no running worker job to cancel"
    slurm(slurm_env, "scancel", running[0])
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err
    assert reached < total
    assert "ran again (its worker was lost)" in err, err[-3000:]
    _same_output(root, name)
    assert _no_job_left(slurm_env, name) == []


def test_sigterm_closes_the_worker_jobs(slurm_env, volume):
    root, image, total = volume
    name = f"unet-test-{uuid.uuid4().hex[:6]}"
    child = _start(root, image, name, slurm_env)
    assert _wait_until_finished(root, name, total // 4, child) is not None, child.communicate()[1][-3000:]
    assert _jobs(slurm_env, name), "no worker job while the run goes on"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-3000:]
    assert _no_job_left(slurm_env, name, timeout=30) == []
    assert not (root / f"{name}.ome.zarr").exists()  # nothing published; the finished blocks are kept
    assert len(finished_blocks(root / f".{name}.ome.zarr.partial" / ".blocks")) < total


def test_failed_run_leaves_no_job(slurm_env, volume, tmp_path):
    """An input chunk of the last plane turns corrupt after the run started (past the intensity
    statistics): a block task fails on a worker, the error reaches the user, the worker jobs are
    cancelled and nothing is published."""
    root, image, total = volume
    broken = tmp_path / "broken.ome.zarr"
    subprocess.run(["cp", "-r", str(image), str(broken)], check=True)
    last_plane = broken / "0" / str(io.open_image(broken).array.shape[0] - 1)
    name = f"unet-test-{uuid.uuid4().hex[:6]}"
    output = tmp_path / f"{name}.ome.zarr"
    child = _start(root, broken, name, slurm_env, output=output)
    assert _wait_until_finished(tmp_path, name, 1, child) is not None, child.communicate()[1][-3000:]
    for chunk in (p for p in last_plane.rglob("*") if p.is_file()):
        chunk.write_bytes(b"not a blosc chunk" * 10)
    _, err = child.communicate(timeout=600)
    assert child.returncode != 0
    assert "failed; rerun to resume" in err and "blosc" in err, err[-3000:]
    assert _no_job_left(slurm_env, name, timeout=30) == []
    assert not output.exists()
