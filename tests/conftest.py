"""Shared fixtures and helpers: tiny seeded synthetic data, the optional real data in ../shared,
running the workflow, and the whole-image reference prediction."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unet_core.model import valid_sizes

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
WORKFLOW_ITEMS = ("Snakefile", "workflow", "config", "profiles", "envs")


def run_snakemake(workdir, *args, timeout=900) -> subprocess.CompletedProcess:
    """``snakemake *args`` in ``workdir`` with this environment's snakemake; output captured."""
    return subprocess.run([SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout)


def whole_image_reference(model, image):
    """Whole-image prediction of the reflect-padded image, cropped to the image."""
    spatial = image.shape[1:]
    margin = model.margin()
    out = [valid_sizes(model.depth, kind="output", near=s)[-1] if valid_sizes(model.depth, kind="output", near=s)[0] < s
           else valid_sizes(model.depth, kind="output", near=s)[0] for s in spatial]
    pad = [(0, 0)] + [(margin, margin + o - s) for o, s in zip(out, spatial)]
    padded = np.pad(image, pad, mode="reflect")
    with torch.inference_mode():
        logits = model.eval()(torch.from_numpy(padded[None]).float())
    probs = torch.softmax(logits, 1)[0].numpy()
    return probs[(slice(None),) + tuple(slice(0, s) for s in spatial)]


def copy_workflow(target: Path) -> Path:
    """A copy of the workflow (Snakefile, rules, config, profiles) in ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for item in WORKFLOW_ITEMS:
        source = REPO / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target / item)
    return target


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def _local_slurm(command):
    return subprocess.run(["bash", str(REPO / "scripts" / "local_slurm.sh"), command],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def slurm_env():
    """Environment whose SLURM clients talk to the local one-node cluster that
    scripts/local_slurm.sh starts (and that this fixture stops again if it started it)."""
    state = Path(os.environ.get("SLURM_LOCAL_DIR", REPO / ".slurm-local"))
    was_running = _local_slurm("status").returncode == 0
    started = _local_slurm("start")
    if started.returncode != 0:
        pytest.fail(f"local SLURM cluster did not start:\n{started.stdout}{started.stderr}")
    yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    if not was_running:
        stopped = _local_slurm("stop")
        assert stopped.returncode == 0, stopped.stderr


def slurm(env, *args) -> str:
    """Output of a SLURM client command (squeue, sinfo, scancel) run against ``env``'s cluster."""
    result = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def isbi_labels():
    """ISBI 2012 training labels (30, 512, 512), 255 = interior, 0 = membrane; skips without ../shared."""
    path = SHARED_DATA / "isbi2012" / "train-labels.tif"
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    import tifffile

    return tifffile.imread(path)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def demo_tiffs(tmp_path_factory):
    """The demo stacks written once per session."""
    from unet_core.demo import write_demo_data

    outdir = tmp_path_factory.mktemp("demo")
    write_demo_data(outdir, seed=0)
    return outdir


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One finished demo run of the whole workflow (local profile), shared by the workflow tests.

    Returns ``(workdir, dry_run_output)``, the latter from the dry run before the real one.
    Tests must not change files in it: copy it (``shutil.copytree(..., symlinks=True)``) first.
    """
    workdir = copy_workflow(tmp_path_factory.mktemp("demo_run"))
    dry = run_snakemake(workdir, "-n")
    assert dry.returncode == 0, dry.stderr
    run = run_snakemake(workdir, "--profile", "profiles/local", "--cores", "2")
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir, dry.stdout + dry.stderr
