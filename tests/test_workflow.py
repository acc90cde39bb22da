"""The whole demo workflow through Snakemake: dry run, real run, nothing left to do, lint."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from conftest import copy_workflow, run_snakemake

STAGES = ["demo_data", "ingest", "weight_map", "train", "predict", "segment", "evaluate", "report"]
_snakemake = run_snakemake


@pytest.fixture(scope="module")
def workdir(demo_run):
    return demo_run[0]


@pytest.fixture(scope="module")
def finished_run(demo_run):
    return demo_run[1]


@pytest.mark.slow
def test_dry_run_lists_every_stage(finished_run):
    table = finished_run.split("Job stats:")[1]
    for rule in STAGES:
        assert re.search(rf"^{rule}\s+\d+$", table, re.M), f"rule {rule} missing from dry run"


@pytest.mark.slow
def test_demo_segmentation_is_right(workdir, finished_run):
    metrics = {p.stem: json.loads(p.read_text()) for p in (workdir / "results" / "metrics").glob("*.json")}
    held_out = {name: m["metrics"]["foreground_iou"] for name, m in metrics.items() if m["has_ground_truth"]}
    assert set(held_out) == {"timelapse_c", "timelapse_d", "volume_3d"}
    assert all(iou >= 0.8 for iou in held_out.values()), held_out
    html = (workdir / "results" / "report" / "index.html").read_text()
    reported = float(re.search(r'id="mean-iou">([0-9.]+)<', html).group(1))
    assert reported >= 0.8
    assert html.count("data:image/png;base64,") >= len(metrics) + 1


@pytest.mark.slow
def test_second_run_has_nothing_to_do(workdir, finished_run):
    again = _snakemake(workdir, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_export_target_writes_a_package_that_passes_the_bioimageio_test(workdir, tmp_path):
    """`snakemake export` (not part of `all`) after a run: the trained demo model as a package."""
    import shutil

    import bioimageio.core

    work = tmp_path / "run"
    shutil.copytree(workdir, work, symlinks=True)
    run = _snakemake(work, "--profile", "profiles/local", "--cores", "2", "export")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "export_bioimageio" in run.stderr and "rule train:" not in run.stderr  # only the export ran
    package = work / "results" / "export" / "demo.bioimageio" / "bioimageio.yaml"
    summary = bioimageio.core.test_model(package, devices=["cpu"])
    assert summary.status == "passed", summary.format()


@pytest.mark.slow
def test_the_demo_runs_in_bf16_within_the_stated_bound_of_fp32(workdir, tmp_path):
    """predict.precision: bf16 through the whole demo (CPU autocast): only prediction and what
    follows it rerun, and the probabilities stay within the bound of tests/test_precision.py."""
    import shutil

    import numpy as np
    from test_precision import BF16_MAX, BF16_MEAN

    work = tmp_path / "run"
    shutil.copytree(workdir, work, symlinks=True)
    override = tmp_path / "bf16.yaml"
    override.write_text("predict: {precision: bf16}\n")
    run = _snakemake(work, "--profile", "profiles/local", "--cores", "2", "--configfile", "config/config.yaml",
                     str(override))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rule train:" not in run.stderr and "rule predict:" in run.stderr
    for path in sorted((workdir / "results" / "predictions").glob("*.ome.zarr")):
        exact = zarr.open_group(path, mode="r")["0"][...].astype(np.float32)
        half_group = zarr.open_group(work / "results" / "predictions" / path.name, mode="r")
        assert half_group.attrs["unet_core"]["precision"] == "bf16"
        difference = np.abs(half_group["0"][...].astype(np.float32) - exact)
        assert difference.max() <= BF16_MAX and difference.mean() <= BF16_MEAN, path.name
    assert json.loads((work / "results" / "report" / "summary.json").read_text())["complete"]


def test_lint_and_format(repo):
    lint = _snakemake(repo, "--lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Congratulations" in lint.stdout + lint.stderr
    fmt = subprocess.run([str(Path(sys.executable).with_name("snakefmt")), "--check", "Snakefile", "workflow/"],
                         cwd=repo, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr


def test_config_errors_name_the_key(workdir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((workdir / "config" / "config.yaml").read_text().replace("steps: 300", "steps: -3"))
    result = _snakemake(workdir, "-n", "--configfile", str(bad))
    assert result.returncode != 0
    assert "steps" in result.stdout + result.stderr


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_isbi_config_dry_run(repo, preset):
    if not (repo.parent / "shared" / "data" / "isbi2012" / "train-volume.tif").exists():
        pytest.skip("ISBI 2012 data not present in ../shared")
    result = _snakemake(repo, "-n", "--configfile", "config/isbi2012.yaml", "--config", f"preset={preset}")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    table = text.split("Job stats:")[1]
    assert re.search(r"^ingest\s+2$", table, re.M) and re.search(r"^train\s+1$", table, re.M)


def test_cells3d_config_dry_run(repo):
    if not (repo.parent / "shared" / "data" / "cells3d-boundaries" / "raw.tif").exists():
        pytest.skip("cells3d-boundaries data not present in ../shared")
    result = _snakemake(repo, "-n", "--configfile", "config/cells3d.yaml")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    table = text.split("Job stats:")[1]
    for rule, count in (("ingest", 2), ("weight_map", 2), ("train", 1), ("predict", 1), ("segment", 1),
                        ("evaluate", 1), ("report", 1)):
        assert re.search(rf"^{rule}\s+{count}$", table, re.M), table


def test_ablation_table_must_stay_inside_the_workflow_folder(repo, tmp_path):
    outside = tmp_path / "outside.yaml"
    outside.write_text("report: {ablation: ../../../etc/passwd}\n")
    result = _snakemake(repo, "-n", "--configfile", str(outside))
    assert result.returncode != 0
    assert "report.ablation '../../../etc/passwd' leads outside the workflow folder" in result.stdout + result.stderr


def test_unknown_preset_is_named(repo):
    result = _snakemake(repo, "-n", "--config", "preset=turbo")
    assert result.returncode != 0
    assert "preset 'turbo' is not defined" in result.stdout + result.stderr


def test_replaced_ground_truth_key_is_named(repo, tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("evaluate: {ground_truth: binary}\n")
    result = _snakemake(repo, "-n", "--configfile", str(old))
    assert result.returncode != 0
    assert "evaluate.ground_truth ('binary') is replaced by weight_map.labels ('instances')" in \
        result.stdout + result.stderr
    same = tmp_path / "same.yaml"
    same.write_text("evaluate: {ground_truth: instances}\n")  # an old config that agrees still runs
    assert _snakemake(repo, "-n", "--configfile", str(same)).returncode == 0


def test_ground_truth_kind_per_stack_from_the_sheet(tmp_path):
    """The sheet's labels_kind column sets the kind of one stack; the others keep the config's."""
    work = copy_workflow(tmp_path / "work")
    sheet = work / "config" / "samples.tsv"
    lines = sheet.read_text().splitlines()
    lines[0] += "\tlabels_kind"
    lines = [lines[0]] + [line + ("\tbinary" if line.startswith("timelapse_b\t") else "\t") for line in lines[1:]]
    sheet.write_text("\n".join(lines) + "\n")
    targets = ["results/weights/timelapse_a.zarr", "results/weights/timelapse_b.zarr"]
    run = _snakemake(work, "--cores", "2", *targets)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    kinds = [zarr.open_group(work / target, mode="r").attrs["labels"] for target in targets]
    assert kinds == ["instances", "binary"]
