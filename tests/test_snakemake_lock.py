"""unet_core.snakemake_lock: a Snakemake lock is live while a Snakemake process works in the folder."""

import subprocess
import sys
import time

import pytest

from unet_core.snakemake_lock import lock_state


def _lock(folder):
    locks = folder / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text(f"{folder}/raw.tif\n")
    (locks / "0.output.lock").write_text(f"{folder}/results/x\n")
    return sorted(locks.glob("*.lock"))


def _running(argv, cwd):
    process = subprocess.Popen(argv, cwd=cwd)
    time.sleep(0.3)  # exec done, cwd set
    return process


def test_no_lock_is_free(tmp_path):
    state = lock_state(tmp_path)
    assert state.status == "free" and state.lock_files == () and state.processes == ()


def test_lock_without_a_process_is_stale(tmp_path):
    files = _lock(tmp_path)
    state = lock_state(tmp_path)
    assert state.status == "stale" and list(state.lock_files) == files
    assert str(files[0]) in state.describe() and "stale" in state.describe()


@pytest.mark.parametrize("argv", [
    ["bash", "-c", "exec -a snakemake sleep 20"],                                   # snakemake itself
    [sys.executable, "-c", "import time; time.sleep(20)", ".snakemake/scripts/tmpab12.predict.py"],  # a rule script
], ids=["snakemake", "rule script"])
def test_live_process_in_the_folder_holds_the_lock(tmp_path, argv):
    files = _lock(tmp_path)
    process = _running(argv, tmp_path)
    try:
        state = lock_state(tmp_path)
        assert state.status == "held"
        assert [pid for pid, _ in state.processes] == [process.pid]
        assert str(files[0]) in state.describe() and f"pid {process.pid}" in state.describe()
        # the same process working in another folder does not hold this one
        other = tmp_path / "other"
        other.mkdir()
        assert lock_state(other).status == "free"
    finally:
        process.kill()
        process.wait()
    assert lock_state(tmp_path).status == "stale"


def test_a_run_still_starting_holds_the_folder(tmp_path):
    """A Snakemake process that has not written its lock yet must not be run beside either."""
    process = _running(["bash", "-c", "exec -a snakemake sleep 20"], tmp_path)
    try:
        state = lock_state(tmp_path)
        assert state.status == "held" and state.lock_files == ()
        assert "starting or running" in state.describe()
    finally:
        process.kill()
        process.wait()


def test_other_programs_do_not_count(tmp_path):
    _lock(tmp_path)
    process = _running(["sleep", "20"], tmp_path)
    try:
        assert lock_state(tmp_path).status == "stale"
    finally:
        process.kill()
        process.wait()


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        lock_state(tmp_path / "missing")
