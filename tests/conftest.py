"""Shared fixtures: tiny seeded synthetic data and the optional real data in ../shared."""

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


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
