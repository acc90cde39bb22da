"""The HTML QC report: escaping, outliers, failures from logs, provenance, and the browser view.

Unit tests build tiny synthetic runs (OME-Zarr image + segmentation + metrics JSON per stack).
The workflow tests run the demo with a corrupt raw stack added (Bar 3 of the workflow issue)
and open its report in headless Chromium (Bar 4).
"""

import csv
import json
import os
import shutil
import subprocess
import time
import zipfile
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import copy_workflow, run_snakemake
from scipy import ndimage

from unet_core import figures, ingest, io
from unet_core import report as report_module
from unet_core.report import last_exception, qc_flags, report_incomplete_run, write_report

HOSTILE = "<script>alert(1)</script>"


# ----------------------------------------------------------------------------- helpers
class _Tables(HTMLParser):
    """Cells (text, attributes) of every <tr> of the tables with an id, and every <img> and <script>."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.scripts = {}, [], 0
        self._table, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = {"attrs": attrs, "cells": []}
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"text": "", "attrs": attrs}
            self._row["cells"].append(self._cell)
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tr":
            self._row = None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def _parse(html: str) -> _Tables:
    parser = _Tables()
    parser.feed(html)
    return parser


def _rows(page: _Tables, table: str) -> dict[str, dict]:
    """Body rows of a table keyed by their data-stack attribute."""
    return {row["attrs"]["data-stack"]: row for row in page.tables[table] if "data-stack" in row["attrs"]}


def _write_stack(root: Path, name: str, *, seed: int, planes: int = 3, cells: int = 6, display: str | None = None,
                 software: str = "synthetic", truth: bool = True) -> dict:
    """A tiny evaluated stack: raw OME-Zarr (via ingest), segmentation OME-Zarr, metrics JSON."""
    rng = np.random.default_rng(seed)
    shape = (planes, 48, 64)
    labels = np.zeros(shape, np.uint32)
    for t in range(planes):
        centres = rng.integers(6, 42, (cells + t, 2))
        for k, (y, x) in enumerate(centres, start=1):
            labels[t, max(y - 3, 0):y + 3, max(x - 3, 0):x + 3] = k
    image = (ndimage.gaussian_filter((labels > 0).astype(np.float32), (0, 1, 1)) * 3000 + 200
             + rng.normal(0, 50, shape)).clip(0, 65535).astype(np.uint16)
    tiff = root / "raw" / f"{name}.tif"
    tiff.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(tiff, image, software=software, photometric="minisblack", metadata={"axes": "TYX"})
    zarr_path = ingest.ingest(tiff, root / "zarr" / f"{name}.ome.zarr", axes="tyx")
    segmentation = root / "segmentation" / f"{name}.ome.zarr"
    with io.atomic_image(segmentation, "tyx", shape, dtype="uint32", scale=[1.0, 1.0, 1.0]) as writer:
        for t in range(planes):
            writer.write({"t": t}, labels[t], order=("y", "x"))
    counts = [int(len(np.unique(plane)) - 1) for plane in labels]
    sizes = np.bincount(labels[0].ravel())[1:].tolist()
    result = {
        "stack": display or name, "role": "predict", "has_ground_truth": truth,
        "qc": {"objects_per_plane": counts, "mean_objects_per_plane": float(np.mean(counts)),
               "object_size_median": float(np.median(sizes)), "object_sizes": sizes,
               "uncertain_fraction": 0.02 + 0.001 * seed, "probability_histogram": [100, 5, 3] + [1] * 16 + [80],
               "mean_intensity_per_plane": image.mean(axis=(1, 2)).tolist(), "relative_intensity_drift": 0.01},
    }
    if truth:
        result["metrics"] = {"foreground_iou": 0.85 + 0.01 * (seed % 3), "foreground_dice": 0.9, "seg": 0.7}
    metrics = root / "metrics" / f"{name}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(result))
    return {"metrics": metrics, "image": zarr_path, "segmentation": segmentation, "result": result}


def _write_model(root: Path, name: str = "demo") -> Path:
    model_dir = root / "models" / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.pt").write_bytes(b"weights")
    card = {"architecture": {"ndim": 2, "depth": 3}, "parameters": 1234, "device": "cpu",
            "training_data": [{"stack": "a", "sha256": "0" * 64}], "final_metrics": {"loss": 0.1, "val_iou": 0.9}}
    (model_dir / "model_card.json").write_text(json.dumps(card))
    (model_dir / "training_log.tsv").write_text(
        "step\tloss\tlr\tseconds\tval_loss\tval_iou\n10\t0.6\t0.001\t1.0\t\t\n20\t0.4\t0.001\t2.0\t0.45\t0.7\n")
    return model_dir


def _report(root: Path, stacks: list[dict], **kwargs) -> tuple[str, _Tables]:
    path = write_report(metrics=[s["metrics"] for s in stacks], images=[s["image"] for s in stacks],
                        segmentations=[s["segmentation"] for s in stacks], model_dir=root / "models" / "demo",
                        output_path=root / "report" / "index.html", **kwargs)
    html = path.read_text()
    return html, _parse(html)


def _traceback_log(path: Path, message: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "reading stack\n"
        "Traceback (most recent call last):\n"
        '  File "tifffile.py", line 4000, in __init__\n'
        "    raise TiffFileError('not a TIFF file')\n"
        "tifffile.TiffFileError: not a TIFF file\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n"
        '  File "workflow/scripts/ingest.py", line 20, in <module>\n'
        "    main(snakemake)\n"
        "    ~~~~^^^^^^^^^^^\n"
        f"{message}\n")
    return path


@pytest.fixture
def batch(tmp_path):
    """Five synthetic evaluated stacks and a model in tmp_path."""
    _write_model(tmp_path)
    return tmp_path, [_write_stack(tmp_path, f"s{i}", seed=i) for i in range(5)]


# ----------------------------------------------------------------------------- unit tests
def test_last_exception_takes_the_final_error_of_chained_tracebacks():
    log = ("Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'inner'\n\n"
           "During handling of the above exception, another exception occurred:\n\n"
           "Traceback (most recent call last):\n  File \"b.py\", line 2, in f\n    g()\n"
           "unet_core.tiff.TiffError: raw/b.tif: not a readable TIFF file\nsecond line of the message\n")
    assert last_exception(log) == ("unet_core.tiff.TiffError: raw/b.tif: not a readable TIFF file\n"
                                   "second line of the message")
    assert last_exception("step 1\nstep 2\n") is None
    assert last_exception("") is None


def test_report_of_a_batch_has_every_section(batch):
    root, stacks = batch
    bench = root / "benchmarks"
    jobs = [("ingest", "s0", 1.5, 100.0), ("ingest", "s1", 2.5, 120.0), ("train", "demo", 60, 900)]
    for rule, job, seconds, rss in jobs:
        (bench / rule).mkdir(parents=True, exist_ok=True)
        (bench / rule / f"{job}.tsv").write_text(
            "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
            f"{seconds}\t0:00:0{int(seconds) % 10}\t{rss}\t1\t1\t1\t0\t0\t50\t{seconds / 2}\n")
    html, page = _report(root, stacks, config={"train": {"steps": 300}}, benchmarks_dir=bench,
                         source_dir=report_module.__file__.rsplit("/", 2)[0], logs_dir=root / "logs",
                         summary_path=root / "report" / "summary.json")
    assert 'id="run-status" class="banner complete"' in html
    overview = _rows(page, "overview")
    assert set(overview) == {f"s{i}" for i in range(5)}
    assert all("status-ok" in row["attrs"]["class"] for row in overview.values())
    # every image is an inline PNG: 3 planes x (raw, overlay) + histograms per stack, + training curves
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert len(page.images) == 5 * (3 * 2 + 1) + 1
    assert "http://" not in html and "https://" not in html
    # runtimes per rule from the benchmark files
    runtimes = {row["cells"][0]["text"]: [c["text"] for c in row["cells"]] for row in page.tables["runtimes"][1:]}
    assert runtimes["ingest"][1:5] == ["2", "4.0", "2.0", "2.5"]
    assert runtimes["train"][5] == "900"
    versions = {row["cells"][0]["text"]: row["cells"][1]["text"] for row in page.tables["versions"]}
    assert {"python", "torch", "numpy", "zarr", "dask", "snakemake"} <= set(versions)
    assert versions["torch"] not in ("", "not installed")
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert summary["complete"] and [s["status"] for s in summary["stacks"]] == ["ok"] * 5


def test_skipped_files_and_sheet_roles_are_reported(batch):
    root, stacks = batch
    hostile = "raw/<img src=x onerror=alert(1)>.tif"
    skipped = [{"path": hostile, "reason": "its name holds one of { } < >"}]
    summary_path = root / "report" / "summary.json"
    (stacks[1]["metrics"]).unlink()  # failed before evaluate: no role of its own
    html, page = _report(root, stacks[:2], roles={"s0": "val", "s1": "val"}, skipped=skipped,
                         summary_path=summary_path)
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;.tif" in html
    rows = [[c["text"].strip() for c in row["cells"]] for row in page.tables["skipped-table"]
            if row["attrs"].get("class") == "skipped"]
    assert rows == [[hostile, "its name holds one of { } < >"]]
    overview = _rows(page, "overview")
    # the evaluated stack keeps the role its metrics record; the failed one gets the sheet's
    assert [overview[name]["cells"][1]["text"] for name in ("s0", "s1")] == ["predict", "val"]
    summary = json.loads(summary_path.read_text())
    assert summary["skipped"] == skipped
    assert [(s["stack"], s["role"]) for s in summary["stacks"]] == [("s0", "predict"), ("s1", "val")]
    html, page = _report(root, stacks[:1])
    assert "skipped-table" not in html and 'id="skipped-status"' not in html


def test_commit_is_read_from_git_or_unknown(tmp_path, repo):
    expected = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if expected.returncode == 0:
        assert report_module._commit(repo).startswith(expected.stdout.strip())
    assert report_module._commit(tmp_path) in ("unknown", os.environ.get("UNET_PIPELINE_COMMIT"))


def test_hostile_names_metadata_config_and_errors_are_escaped(tmp_path):
    _write_model(tmp_path)
    stacks = [_write_stack(tmp_path, "s0", seed=0, display=HOSTILE, software=HOSTILE),
              _write_stack(tmp_path, "s1", seed=1)]
    broken = {"metrics": tmp_path / "metrics" / "broken.json", "image": tmp_path / "zarr" / "broken.ome.zarr",
              "segmentation": tmp_path / "segmentation" / "broken.ome.zarr"}
    _traceback_log(tmp_path / "logs" / "ingest" / "broken.log", f"ValueError: <img src=x onerror=alert(2)> {HOSTILE}")
    html, page = _report(tmp_path, [*stacks, broken], config={"note": HOSTILE, HOSTILE: 1}, logs_dir=tmp_path / "logs",
                         title=HOSTILE)
    assert HOSTILE not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    assert page.scripts == 1  # only the report's own sorting script
    # the hostile software tag is shown (escaped) in the stack's source metadata
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4  # title x2, stack name, TIFF metadata, config


def test_outliers_are_flagged_and_highlighted(tmp_path):
    _write_model(tmp_path)
    stacks = [_write_stack(tmp_path, f"s{i}", seed=i, cells=6) for i in range(4)]
    stacks.append(_write_stack(tmp_path, "crowded", seed=9, cells=30))
    flags = qc_flags([s["result"] for s in stacks])
    assert flags[:4] == [[]] * 4
    assert any(f.startswith("objects / plane outlier in batch") for f in flags[4])
    html, page = _report(tmp_path, stacks)
    header = [c["text"] for c in page.tables["overview"][0]["cells"]]
    column = header.index("objects / plane")
    rows = _rows(page, "overview")
    assert "outlier" in rows["crowded"]["cells"][column]["attrs"].get("class", "")
    assert "robust z" in rows["crowded"]["cells"][column]["attrs"]["title"]
    assert "flagged" in rows["crowded"]["attrs"]["class"]
    assert not any("outlier" in c["attrs"].get("class", "") for name in ("s0", "s1", "s2", "s3")
                   for c in rows[name]["cells"])
    # numeric cells carry their value for sorting
    assert float(rows["crowded"]["cells"][column]["attrs"]["data-sort"]) == pytest.approx(
        stacks[4]["result"]["qc"]["mean_objects_per_plane"])


def test_small_batches_and_uncertain_stacks():
    result = {"qc": {"mean_objects_per_plane": 0.0, "uncertain_fraction": 0.4}}
    assert qc_flags([result]) == [["uncertain pixels 40%", "no objects found"]]
    assert qc_flags([]) == []


def test_failed_and_missing_stacks_are_listed_with_their_error(tmp_path):
    _write_model(tmp_path)
    logs = tmp_path / "logs"
    good = _write_stack(tmp_path, "good", seed=0)
    stale = _write_stack(tmp_path, "repaired", seed=1)
    # an old traceback of a job that a later run repaired (the metrics are newer): not a failure
    old = _traceback_log(logs / "predict" / "repaired.log", "RuntimeError: out of memory")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    missing = {name: {"metrics": tmp_path / "metrics" / f"{name}.json", "image": tmp_path / f"{name}.ome.zarr",
                      "segmentation": tmp_path / f"{name}.seg.ome.zarr"} for name in ("corrupt", "killed", "waiting")}
    _traceback_log(logs / "ingest" / "corrupt.log",
                   "unet_core.tiff.TiffError: raw/corrupt.tif: not a readable TIFF file (not a TIFF file)")
    (logs / "segment").mkdir(parents=True)
    (logs / "segment" / "killed.log").write_text("segmenting\nKilled\n")
    snakemake_log = tmp_path / "snakemake.log"
    snakemake_log.write_text("Error in rule segment:\n    jobid: 7\n    input: x\n"
                             f"    log: {logs / 'segment' / 'killed.log'} (check log file(s) for error details)\n")
    summary = tmp_path / "report" / "summary.json"
    record = tmp_path / "report" / "incomplete_runs.tsv"
    path = report_incomplete_run(
        metrics=[good["metrics"], stale["metrics"], *(m["metrics"] for m in missing.values())],
        images=[good["image"], stale["image"], *(m["image"] for m in missing.values())],
        segmentations=[good["segmentation"], stale["segmentation"], *(m["segmentation"] for m in missing.values())],
        model_dir=tmp_path / "models" / "demo", output_path=tmp_path / "report" / "index.html", logs_dir=logs,
        summary_path=summary, record_path=record, snakemake_logs=[snakemake_log], benchmarks_dir=None)
    assert path is not None
    html = path.read_text()
    page = _parse(html)
    assert 'id="run-status" class="banner incomplete"' in html and "stopped with errors" in html
    status = json.loads(summary.read_text())
    assert not status["complete"] and status["stopped_with_errors"]
    assert [(s["stack"], s["status"], s.get("rule")) for s in status["stacks"]] == [
        ("good", "ok", None), ("repaired", "ok", None), ("corrupt", "failed", "ingest"),
        ("killed", "failed", "segment"), ("waiting", "not run", None)]
    # one line per incomplete run in the record, which the report rule takes as an input
    lines = record.read_text().splitlines()
    assert lines[0].split("\t") == ["time", "stacks_without_metrics", "report_written", "snakemake_log"]
    assert lines[1].split("\t")[1:] == ["corrupt,killed,waiting", "yes", str(snakemake_log)]
    overview = _rows(page, "overview")
    assert [overview[n]["cells"][2]["text"] for n in ("good", "repaired")] == ["ok", "ok"]
    failures = {name: [c["text"].strip() for c in row["cells"]] for name, row in _rows(page, "failure-table").items()}
    assert set(failures) == {"corrupt", "killed", "waiting"}
    assert failures["corrupt"][1:4] == ["failed", "ingest", "unet_core.tiff.TiffError: raw/corrupt.tif: not a "
                                                            "readable TIFF file (not a TIFF file)"]
    assert failures["corrupt"][4] == str(logs / "ingest" / "corrupt.log")
    assert failures["killed"][1:4] == ["failed", "segment", "Killed"]
    assert failures["waiting"][1:3] == ["not run", "–"]


def test_incomplete_report_never_raises(tmp_path, capsys):
    record = tmp_path / "incomplete_runs.tsv"
    result = report_incomplete_run(metrics=["a.json"], images=[], segmentations=[], model_dir=tmp_path,
                                   output_path=tmp_path / "index.html", logs_dir=tmp_path / "logs",
                                   record_path=record)
    assert result is None and not (tmp_path / "index.html").exists()
    assert "must be aligned per stack" in capsys.readouterr().err
    assert "must be aligned per stack" in (tmp_path / "logs" / "report" / "onerror.log").read_text()
    # the record is still appended: the next run tries the report again
    assert record.read_text().splitlines()[1].split("\t")[1:3] == ["a", "no"]
    # nothing at all can be written: still no exception
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert report_incomplete_run(metrics=[], images=[], segmentations=[], model_dir=blocked,
                                 output_path=blocked / "index.html", logs_dir=blocked / "logs",
                                 record_path=blocked / "record.tsv") is None


def test_representative_planes_are_read_one_at_a_time(batch, monkeypatch):
    root, stacks = batch
    reads = []
    original = io.Image.read

    def recording_read(self, where, order):
        reads.append((self.axes, dict(where)))
        return original(self, where, order)

    monkeypatch.setattr(io.Image, "read", recording_read)
    counts = stacks[0]["result"]["qc"]["objects_per_plane"]  # 6, 7, 8 objects in t = 0, 1, 2
    planes = figures.plane_images(stacks[0]["image"], stacks[0]["segmentation"], counts)
    assert [p["position"] for p in planes] == ["t=0", "t=1", "t=2"]
    assert "fewest objects" in planes[0]["reason"] and "most objects" in planes[2]["reason"]
    assert all("t" in where for _, where in reads) and len(reads) == 6  # one raw + one label plane each
    assert figures.representative_planes([3, 9, 1, 4, 4, 2, 5], 7) == [
        (1, "most objects (9)"), (2, "fewest objects (1)"), (3, "middle plane")]
    assert figures.representative_planes([], 1) == [(0, "the only plane")]


# ----------------------------------------------------------------------------- workflow (Bar 3)
def _snakemake(workdir, *args, timeout=1500):
    return run_snakemake(workdir, *args, timeout=timeout)


def _add_sample(path: Path, values: dict) -> None:
    """Append a row to a sample sheet, in the order of its header's columns."""
    text = path.read_text()
    header = next(line for line in text.splitlines() if line.strip() and not line.startswith("#")).split("\t")
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text + "\t".join(values.get(column, "") for column in header) + "\n")


@pytest.fixture(scope="module")
def corrupt_batch(repo, tmp_path_factory):
    """The demo workflow with a corrupt raw stack added, run once with the local profile (--keep-going)."""
    work = copy_workflow(tmp_path_factory.mktemp("corrupt_batch"))
    config = work / "config" / "config.yaml"
    # the report needs a model, not a good one: fewer training steps keep the test short
    text = config.read_text().replace("steps: 300", "steps: 100")
    # the microscopes' folder holds a file whose name Snakemake cannot take: skipped, and said
    assert "  folder: null\n" in text
    config.write_text(text.replace("  folder: null\n", "  folder: microscope\n"))
    (work / "microscope").mkdir()
    (work / "microscope" / "scan <2>.tif").write_bytes(b"II*\x00")
    os.utime(work / "microscope" / "scan <2>.tif", (time.time() - 3600, time.time() - 3600))
    corrupt = work / "incoming" / "broken_stack.tif"
    corrupt.parent.mkdir()
    corrupt.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _add_sample(work / "config" / "samples.tsv",
                {"stack": "broken_stack", "path": "incoming/broken_stack.tif", "role": "predict"})
    run = _snakemake(work, "--profile", "profiles/local", "--cores", "2")
    html_path = work / "results" / "report" / "index.html"
    saved = work.parent / f"{work.name}-incomplete-report.html"
    if html_path.exists():
        shutil.copy(html_path, saved)
    summary_path = work / "results" / "report" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    record = work / "results" / "report" / "incomplete_runs.tsv"
    with open(work / "config" / "samples.tsv") as handle:
        rows = list(csv.DictReader((line for line in handle if not line.startswith("#")), delimiter="\t"))
    return {
        "work": work, "run": run, "html": saved,  # a copy: a later test writes the report again
        "summary": summary,
        "record": record.read_text().splitlines() if record.exists() else [],
        "others": [r["stack"] for r in rows if r["role"] != "train" and r["stack"] != "broken_stack"],
        "metrics": sorted(p.stem for p in (work / "results" / "metrics").glob("*.json")),
    }


@pytest.mark.slow
def test_corrupt_stack_does_not_stop_the_batch(corrupt_batch):
    run = corrupt_batch["run"]
    assert run.returncode != 0, "the run with a corrupt stack must fail"
    assert "broken_stack" in run.stderr
    assert set(corrupt_batch["others"]) <= set(corrupt_batch["metrics"]), run.stderr[-3000:]
    assert "broken_stack" not in corrupt_batch["metrics"]


@pytest.mark.slow
def test_skipped_discovered_file_is_listed_with_the_reason(corrupt_batch):
    """A file in the raw folder that cannot be processed is in the report and summary.json."""
    assert "scan <2>.tif" in corrupt_batch["run"].stderr  # also said when the workflow starts
    skipped = corrupt_batch["summary"]["skipped"]
    assert [item["path"] for item in skipped] == ["microscope/scan <2>.tif"]
    assert "{ } < >" in skipped[0]["reason"] and "rename the file" in skipped[0]["reason"]
    html = corrupt_batch["html"].read_text()
    assert "microscope/scan &lt;2&gt;.tif" in html and "scan <2>" not in html  # escaped
    rows = [[c["text"].strip() for c in row["cells"]] for row in _parse(html).tables["skipped-table"]
            if row["attrs"].get("class") == "skipped"]
    assert rows == [["microscope/scan <2>.tif", skipped[0]["reason"]]]
    assert 'id="skipped-status"' in html


@pytest.mark.slow
def test_report_lists_the_failed_stack_with_its_error(corrupt_batch):
    assert corrupt_batch["html"].exists(), corrupt_batch["run"].stderr[-3000:]
    html = corrupt_batch["html"].read_text()
    page = _parse(html)
    assert 'id="run-status" class="banner incomplete"' in html
    failures = {name: [c["text"].strip() for c in row["cells"]] for name, row in _rows(page, "failure-table").items()}
    assert list(failures) == ["broken_stack"]
    _, status, rule, error, log = failures["broken_stack"]
    assert (status, rule, log) == ("failed", "ingest", "logs/ingest/broken_stack.log")
    assert "broken_stack.tif" in error and "not a readable TIFF file" in error
    overview = _rows(page, "overview")
    assert overview["broken_stack"]["cells"][2]["text"] == "failed (ingest)"
    assert overview["broken_stack"]["cells"][1]["text"] == "predict"  # its role, from the sample sheet
    assert all(overview[name]["cells"][2]["text"] == "ok" for name in corrupt_batch["others"])
    summary = corrupt_batch["summary"]
    assert {s["stack"]: (s["role"], s["status"]) for s in summary["stacks"]}["broken_stack"] == ("predict", "failed")
    assert not (corrupt_batch["work"] / "logs" / "report" / "onerror.log").exists()
    assert corrupt_batch["record"][1].split("\t")[1:3] == ["broken_stack", "yes"]


# ----------------------------------------------------------------------------- browser (Bar 4)
@pytest.fixture(scope="module")
def chromium(repo):
    """Paths of Debian's chromium and chromedriver, installed by the project's script when missing."""
    script = repo / "scripts" / "install_chromium.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
    browser, driver = result.stdout.split()[-2:]
    return browser, driver


def _distinct_colours(png: bytes) -> tuple[int, float]:
    from PIL import Image

    pixels = np.asarray(Image.open(BytesIO(png)).convert("RGB"))
    return len(np.unique(pixels.reshape(-1, 3), axis=0)), float(pixels.std())


@pytest.mark.slow
def test_report_renders_in_headless_chromium(corrupt_batch, chromium, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    assert corrupt_batch["html"].exists(), corrupt_batch["run"].stderr[-3000:]
    browser, driver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1600", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver path is given, so selenium-manager never looks for (or downloads) one
    with webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver)) as page:
        page.get(corrupt_batch["html"].as_uri())
        assert page.execute_script("return document.readyState") == "complete"
        images = page.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(images) > 10
        broken = [alt for alt, complete, width, height in images if not (complete and width > 0 and height > 0)]
        assert not broken, f"images not loaded: {broken}"
        # sorting works: the stack column descending puts the names in reverse order
        header = page.find_element(By.CSS_SELECTOR, "#overview thead th")
        header.click()
        header.click()
        names = page.execute_script(
            "return Array.from(document.querySelectorAll('#overview tbody tr')).map(r => r.dataset.stack)")
        assert names == sorted(names, reverse=True)
        errors = [entry for entry in page.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        screenshot = page.get_screenshot_as_png()
        (tmp_path / "report.png").write_bytes(screenshot)
        colours, spread = _distinct_colours(screenshot)
        assert colours > 50 and spread > 20, f"blank screenshot? {colours} colours, std {spread:.1f}"
        overlay = page.find_element(By.CSS_SELECTOR, "figure.plane img:nth-of-type(2)")
        page.execute_script("arguments[0].scrollIntoView()", overlay)
        colours, spread = _distinct_colours(overlay.screenshot_as_png)
        assert colours > 20 and spread > 10, f"overlay image renders blank: {colours} colours, std {spread:.1f}"


# ----------------------------------------------------------------------------- recovery + --report
def _jobs(dry: subprocess.CompletedProcess) -> set[str]:
    """Rules in the job table of a dry run (empty when there is nothing to do)."""
    text = dry.stdout + dry.stderr
    if "Job stats:" not in text:
        return set()
    rows = [line.split() for line in text.split("Job stats:")[1].strip().split("\n\n")[0].splitlines()]
    return {row[0] for row in rows if len(row) == 2 and row[1].isdigit() and row[0] != "total"}


@pytest.mark.slow
def test_fixed_batch_gets_a_complete_report_and_snakemake_report(corrupt_batch):
    work = corrupt_batch["work"]
    samples = work / "config" / "samples.tsv"
    with_broken = samples.read_text()
    without_broken = "".join(line for line in with_broken.splitlines(keepends=True)
                             if not line.startswith("broken_stack\t"))

    # the corrupt stack removed from the batch: only the report is written again, now complete
    samples.write_text(without_broken)
    dry = _snakemake(work, "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert _jobs(dry) - {"all"} == {"report"}, dry.stdout[-3000:]
    run = _snakemake(work, "--profile", "profiles/local", "--cores", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    html = (work / "results" / "report" / "index.html").read_text()
    assert 'id="run-status" class="banner complete"' in html and "broken_stack" not in html
    assert json.loads((work / "results" / "report" / "summary.json").read_text())["complete"]
    assert _jobs(_snakemake(work, "-n")) == set()

    # Snakemake's own report of the finished run: the outputs marked report(...), captioned
    # (--cores: the rules' threads are workflow.cores, which Snakemake asks for even here)
    zipped = _snakemake(work, "--cores", "1", "--report", "report.zip")
    assert zipped.returncode == 0, zipped.stderr[-3000:]
    with zipfile.ZipFile(work / "report.zip") as archive:
        names = {Path(name).name for name in archive.namelist() if "/data/raw/" in name}
        index = archive.read("report/report.html").decode()
    expected = {"index.html", "summary.json", "model_card.json", "training_log.tsv"}
    assert names == expected | {f"{stack}.json" for stack in corrupt_batch["others"]}
    for text in ("QC report", "Metrics", "Model", "Self-contained HTML QC report", "batch summary (JSON)"):
        assert text in index, text

    # it fails again (after a complete report was recorded), and is removed again: the
    # report must still be written again, although its other inputs are all unchanged
    samples.write_text(with_broken)
    failed = _snakemake(work, "--profile", "profiles/local", "--cores", "2")
    assert failed.returncode != 0
    assert "broken_stack" in (work / "results" / "report" / "index.html").read_text()
    samples.write_text(without_broken)
    assert _jobs(_snakemake(work, "-n")) - {"all"} == {"report"}
