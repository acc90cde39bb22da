"""scripts/nightly.sh: one run at a time, never beside a live manual run, a log per night,
snakemake's exit status."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture
def project(repo, tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(repo / "scripts" / "nightly.sh", tmp_path / "scripts")
    fake = tmp_path / "fake-snakemake"
    # Stands in for snakemake: records its arguments, "runs" for a while, fails on demand.
    fake.write_text('#!/usr/bin/env bash\necho "args: $*"\n[[ " $* " == *" --unlock "* ]] && exit 0\n'
                    'sleep "${FAKE_SECONDS:-0}"\nexit "${FAKE_STATUS:-0}"\n')
    fake.chmod(0o755)
    return tmp_path


UNET_CORE = str(Path(sys.executable).with_name("unet-core"))
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def _nightly(project, *args, **env):
    env = {"PATH": "/usr/bin:/bin", "SNAKEMAKE": str(project / "fake-snakemake"), "UNET_CORE": UNET_CORE, **env}
    return subprocess.Popen(["bash", "scripts/nightly.sh", *args], cwd=project, stderr=subprocess.PIPE, text=True,
                            env=env)


def _stale_lock(project):
    locks = project / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text(f"{project}/results/report/index.html\n")
    return locks / "0.output.lock"


def test_second_run_does_not_overlap(project):
    first = _nightly(project, "profiles/local", FAKE_SECONDS="3")
    time.sleep(1)
    second = _nightly(project, "profiles/local")
    assert second.wait(10) == 75
    assert "still going" in second.stderr.read()
    assert first.wait(10) == 0
    logs = sorted((project / "logs" / "nightly").glob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "finished with status 0" in text
    assert "--unlock" not in text  # no lock to release


def test_stale_lock_is_released(project):
    lock = _stale_lock(project)
    assert _nightly(project, "profiles/local").wait(30) == 0
    text = next((project / "logs" / "nightly").glob("*.log")).read_text()
    assert f"stale Snakemake lock {lock}" in text
    assert "args: --profile profiles/local --unlock" in text and "finished with status 0" in text


def test_stale_lock_is_kept_when_unlocking_is_off(project):
    lock = _stale_lock(project)
    run = _nightly(project, "profiles/local", NIGHTLY_UNLOCK="never")
    assert run.wait(30) == 75
    assert f"stale Snakemake lock {lock}" in run.stderr.read() and lock.exists()
    assert not list((project / "logs" / "nightly").glob("*.log"))


def test_live_manual_run_is_never_run_beside(project):
    """A manual `snakemake` in the folder holds its lock: the nightly run exits with a message
    naming the lock and does not touch it, and the manual run finishes."""
    # the manual run's job waits until the test lets it finish (no race with a fixed sleep)
    (project / "hold").touch()
    (project / "Snakefile").write_text('rule all:\n    output: "done.txt"\n'
                                       '    shell: "while [ -e hold ]; do sleep 0.1; done; echo ok > {output}"\n')
    (project / "profiles" / "local").mkdir(parents=True)
    (project / "profiles" / "local" / "config.yaml").write_text("cores: 1\n")
    manual = subprocess.Popen([SNAKEMAKE, "--cores", "1"], cwd=project, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    locks = project / ".snakemake" / "locks"
    deadline = time.time() + 60
    while not list(locks.glob("*.lock")) and time.time() < deadline and manual.poll() is None:
        time.sleep(0.1)
    assert list(locks.glob("*.lock")), "the manual run did not lock the folder"
    nightly = _nightly(project, "profiles/local", SNAKEMAKE=SNAKEMAKE)
    assert nightly.wait(60) == 75
    message = nightly.stderr.read()
    held = ", ".join(str(p) for p in sorted(locks.glob("*.lock")))
    assert f"Snakemake lock {held} is held by a live run" in message
    assert f"pid {manual.pid}" in message
    (project / "hold").unlink()
    assert manual.wait(120) == 0, manual.stdout.read()
    assert (project / "done.txt").read_text() == "ok\n"
    assert not list((project / "logs" / "nightly").glob("*.log"))


def test_unknown_unlock_policy_is_refused(project):
    run = _nightly(project, "profiles/local", NIGHTLY_UNLOCK="no")
    assert run.wait(30) == 2
    assert "NIGHTLY_UNLOCK must be 'stale' (the default) or 'never', got 'no'" in run.stderr.read()


def test_exit_status_is_snakemakes(project):
    run = _nightly(project, "profiles/slurm", "--keep-going", FAKE_STATUS="1")
    assert run.wait(10) == 1
    log = next((project / "logs" / "nightly").glob("*.log")).read_text()
    assert "args: --profile profiles/slurm --keep-going" in log and "finished with status 1" in log
