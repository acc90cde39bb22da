"""scripts/nightly.sh: one run at a time, a log per night, snakemake's exit status."""

import shutil
import subprocess
import time

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


def _nightly(project, *args, **env):
    return subprocess.Popen(["bash", "scripts/nightly.sh", *args], cwd=project, stderr=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", "SNAKEMAKE": str(project / "fake-snakemake"), **env})


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
    assert "args: --profile profiles/local --unlock" in text and "finished with status 0" in text


def test_exit_status_is_snakemakes(project):
    run = _nightly(project, "profiles/slurm", "--keep-going", FAKE_STATUS="1")
    assert run.wait(10) == 1
    log = next((project / "logs" / "nightly").glob("*.log")).read_text()
    assert "args: --profile profiles/slurm --keep-going" in log and "finished with status 1" in log
