"""Nightly reruns: after a finished run, only new or changed stacks are reprocessed.

Every scenario is a dry run (``-n``) with the local profile on a copy of one finished demo
run, and asserts the exact set of jobs Snakemake would run.
"""

import contextlib
import os
import re
import shutil

import numpy as np
import pytest
import tifffile
from conftest import run_snakemake

PREDICTED = ["timelapse_c", "timelapse_d", "timelapse_e", "volume_3d"]  # roles val + predict
_JOB = re.compile(r"^(?:local)?rule (\w+):\n(.*?)(?=\n\n|\Z)", re.M | re.S)


def _planned(workdir, *args) -> set[tuple[str, str]]:
    """(rule, stack) of every job a dry run lists; stack is '' for rules without one."""
    result = run_snakemake(workdir, "--profile", "profiles/local", "-n", *args, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    if "Nothing to be done" in text:
        return set()
    jobs = set()
    for rule, block in _JOB.findall(text):
        stack = re.search(r"wildcards: .*?stack=([\w.-]+)", block)
        jobs.add((rule, stack.group(1) if stack else ""))
    assert jobs, text[-3000:]
    return jobs


def _per_stack(stacks, rules=("predict", "segment", "evaluate")):
    return {(rule, stack) for stack in stacks for rule in rules}


REPORT = {("report", ""), ("all", "")}


@pytest.fixture(scope="module")
def night(demo_run, tmp_path_factory):
    """A private copy of the finished demo run (mtimes preserved) that the tests may change."""
    workdir = tmp_path_factory.mktemp("night") / "run"
    shutil.copytree(demo_run[0], workdir, symlinks=True)
    assert _planned(workdir) == set()
    return workdir


@contextlib.contextmanager
def _changed_pixels(path):
    """The raw stack at ``path`` mirrored (same path, new content) inside the block; restored after."""
    original = path.read_bytes()
    tifffile.imwrite(path, np.flip(tifffile.imread(path), axis=-1), imagej=True)
    try:
        yield
    finally:
        path.write_bytes(original)


def _later(path, seconds=5):
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


@pytest.mark.slow
def test_touched_stack_is_not_reprocessed(night):
    raw = night / "resources" / "demo" / "timelapse_e.tif"
    _later(raw)
    assert _planned(night) == set()


@pytest.mark.slow
def test_changed_pixels_rerun_only_that_stack(night):
    with _changed_pixels(night / "resources" / "demo" / "timelapse_d.tif"):
        assert _planned(night) == _per_stack(["timelapse_d"], ("ingest", "predict", "segment", "evaluate")) | REPORT
    # The same content again, but a newer mtime: nothing to do.
    assert _planned(night) == set()


@pytest.mark.slow
def test_new_stack_runs_only_its_jobs(night):
    demo = night / "resources" / "demo"
    image = tifffile.imread(demo / "timelapse_e.tif")
    tifffile.imwrite(demo / "timelapse_f.tif", np.flip(image, axis=-2), imagej=True)
    sheet = night / "config" / "samples.tsv"
    original = sheet.read_text()
    sheet.write_text(original + "timelapse_f\tresources/demo/timelapse_f.tif\t\tpredict\t\n")
    try:
        assert _planned(night) == _per_stack(["timelapse_f"], ("ingest", "predict", "segment", "evaluate")) | REPORT
    finally:
        sheet.write_text(original)
    assert _planned(night) == set()


@pytest.mark.slow
def test_discovered_stack_in_raw_folder_runs_only_its_jobs(night, tmp_path):
    raw = tmp_path / "incoming"
    raw.mkdir()
    image = tifffile.imread(night / "resources" / "demo" / "timelapse_e.tif")
    tifffile.imwrite(raw / "scope 1 (run).tif", image[:, ::-1], imagej=True)
    override = tmp_path / "discover.yaml"
    override.write_text(f"discover: {{folder: '{raw}', min_age_minutes: 0}}\n")
    assert _planned(night, "--configfile", "config/config.yaml", str(override)) == _per_stack(
        ["scope_1_run"], ("ingest", "predict", "segment", "evaluate")) | REPORT


@pytest.mark.slow
def test_changed_training_stack_retrains_and_repredicts(night):
    with _changed_pixels(night / "resources" / "demo" / "timelapse_a.tif"):
        expected = {("ingest", "timelapse_a"), ("weight_map", "timelapse_a"), ("train", "")}
        assert _planned(night) == expected | _per_stack(PREDICTED) | REPORT


@pytest.mark.slow
def test_changed_training_config_retrains_and_repredicts(night, tmp_path):
    override = tmp_path / "steps.yaml"
    override.write_text("train: {steps: 301}\n")
    planned = _planned(night, "--configfile", "config/config.yaml", str(override))
    assert planned == {("train", "")} | _per_stack(PREDICTED) | REPORT


@pytest.mark.slow
def test_code_only_change_reruns_nothing(night):
    script = night / "workflow" / "scripts" / "predict.py"
    original = script.read_text()
    script.write_text(original + "\n# a comment: code changed, results did not\n")
    try:
        assert _planned(night) == set()
    finally:
        script.write_text(original)


@pytest.mark.slow
def test_switching_to_the_slurm_scheduler_reruns_nothing(night, tmp_path):
    """Who computes the blocks (predict.scheduler, predict.slurm) and which files are looked for
    (discover) is not what the results hold: nothing is done, not even the report."""
    override = tmp_path / "cluster.yaml"
    override.write_text("predict: {scheduler: slurm, slurm: {maximum_workers: 32, memory: 64GB}}\n"
                        "discover: {min_age_minutes: 30}\n")
    assert _planned(night, "--configfile", "config/config.yaml", str(override)) == set()


@pytest.mark.slow
def test_a_setting_the_report_shows_rewrites_only_the_report(night, tmp_path):
    override = tmp_path / "preset.yaml"
    override.write_text("presets: {trial: {train: {steps: 5}}}\n")  # defined, not chosen: shown, not used
    assert _planned(night, "--configfile", "config/config.yaml", str(override)) == REPORT


@pytest.mark.slow
def test_a_run_that_stopped_with_errors_makes_the_next_run_write_the_report(night):
    """The onerror handler appends to the record after writing its report: the record is an
    input of the report rule, so the next run writes the report again."""
    record = night / "results" / "report" / "incomplete_runs.tsv"
    assert record.read_text().startswith("time\t")
    original = record.read_bytes()
    stat = record.stat()
    try:
        with open(record, "a") as handle:
            handle.write("2026-12-04T00:00:00\tvolume_3d\tyes\t-\n")
        _later(record)
        assert _planned(night) == REPORT
    finally:
        record.write_bytes(original)
        os.utime(record, ns=(stat.st_atime_ns, stat.st_mtime_ns))
