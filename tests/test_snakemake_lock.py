"""unet_core.snakemake_lock: a Snakemake lock is live while a Snakemake process works in the folder."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unet_core.snakemake_lock import lock_state


def _lock(folder):
    locks = folder / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text(f"{folder}/raw.tif\n")
    (locks / "0.output.lock").write_text(f"{folder}/results/x\n")
    return sorted(locks.glob("*.lock"))


def _running(argv, cwd, name):
    """Start ``argv`` in ``cwd`` and wait until its command line shows ``name``. ``bash -c 'exec -a
    NAME ...'`` shows NAME in bash's own arguments before the exec: there, wait for the program
    name itself to be NAME (exec done), or a loaded machine sees bash and calls the lock stale."""
    process = subprocess.Popen(argv, cwd=cwd)
    execs = argv[0] == "bash" and argv[-1].startswith(f"exec -a {name} ")
    deadline = time.time() + 30
    while True:
        parts = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if (parts[0] == name) if execs else name in "\0".join(parts):
            return process
        assert time.time() < deadline, f"{argv} did not start"
        time.sleep(0.02)


def _rule_script(folder):
    """A rule script as Snakemake runs it: ``python .snakemake/scripts/tmp<x>.<name>.py``."""
    script = folder / ".snakemake" / "scripts" / "tmpab12.predict.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("import time\ntime.sleep(20)\n")
    return [sys.executable, "-u", ".snakemake/scripts/tmpab12.predict.py"]


def test_no_lock_is_free(tmp_path):
    state = lock_state(tmp_path)
    assert state.status == "free" and state.lock_files == () and state.processes == ()


def test_lock_without_a_process_is_stale(tmp_path):
    files = _lock(tmp_path)
    state = lock_state(tmp_path)
    assert state.status == "stale" and list(state.lock_files) == files
    assert str(files[0]) in state.describe() and "stale" in state.describe()


@pytest.mark.parametrize("kind", ["snakemake", "rule script"])
def test_live_process_in_the_folder_holds_the_lock(tmp_path, kind):
    files = _lock(tmp_path)
    if kind == "snakemake":
        process = _running(["bash", "-c", "exec -a snakemake sleep 20"], tmp_path, "snakemake")
    else:
        process = _running(_rule_script(tmp_path), tmp_path, "tmpab12")
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
    process = _running(["bash", "-c", "exec -a snakemake sleep 20"], tmp_path, "snakemake")
    try:
        state = lock_state(tmp_path)
        assert state.status == "held" and state.lock_files == ()
        assert "starting or running" in state.describe()
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("argv", [
    ["sleep", "20"],
    ["bash", "-c", "sleep 20; echo snakemake .snakemake/scripts/x.py"],  # the words as arguments only
    [sys.executable, "-c", "import time; time.sleep(20)", "snakemake"],
])
def test_other_programs_do_not_count(tmp_path, argv):
    _lock(tmp_path)
    process = _running(argv, tmp_path, argv[-1][:5])
    try:
        assert lock_state(tmp_path).status == "stale"
    finally:
        process.kill()
        process.wait()


def test_lock_of_another_user_is_never_called_stale(tmp_path, monkeypatch):
    """Another user's processes may be invisible (their working directory cannot be read)."""
    files = _lock(tmp_path)
    monkeypatch.setattr(os, "getuid", lambda: files[0].stat().st_uid + 1)
    state = lock_state(tmp_path)
    assert state.status == "held" and "written by another user" in state.describe()


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        lock_state(tmp_path / "missing")
