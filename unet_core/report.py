"""Self-contained HTML QC report of a run: batch table, overlays, training curves, provenance.

One function writes the report, :func:`write_report`, whether the run finished or not: each
stack whose metrics JSON exists is reported in full, the others are listed as failed (with
the rule that failed and the last exception line of its log) or as not run. The workflow's
``onerror`` handler calls :func:`report_incomplete_run`, the same function behind a guard
that never raises, so that a broken report cannot mask the run's own error.

Everything that came from files or users (stack names, TIFF metadata, config, error
messages) is escaped by Jinja2's autoescape; images are inlined as base64 PNG, so the page
needs no network and no other file. Stacks are never loaded whole: a few representative
planes are read, one at a time. Planes are ``(Y, X)`` arrays throughout.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from . import io
from .atomic import write_text
from .figures import histogram_figure, plane_images, training_figure
from .qc import flag_outlier_stacks
from .run_status import (STACK_RULES, STATUS_FAILED, STATUS_NOT_RUN, STATUS_OK, failed_job_logs, last_exception,
                         model_status, stack_status)
from .weights import LABEL_KIND_TARGETS

__all__ = ["write_report", "report_incomplete_run", "start_record", "qc_flags", "last_exception", "STACK_RULES"]


_UNCERTAIN_LIMIT = 0.15
_OUTLIER_Z = 3.5
_VERSIONED = ("unet-core", "torch", "numpy", "zarr", "dask", "snakemake", "tifffile", "scikit-image",
              "matplotlib", "jinja2")
# Columns of the batch table: key, header, section of the metrics JSON, field, format.
# Every column is judged for outliers against the batch (robust z-score).
_COLUMNS = (
    ("objects", "objects / plane", "qc", "mean_objects_per_plane", "{:.1f}"),
    ("size", "median size (px)", "qc", "object_size_median", "{:.0f}"),
    ("uncertain", "uncertain fraction", "qc", "uncertain_fraction", "{:.3f}"),
    ("drift", "intensity drift", "qc", "relative_intensity_drift", "{:+.2f}"),
    ("iou", "foreground IoU", "metrics", "foreground_iou", "{:.3f}"),
    ("dice", "foreground Dice", "metrics", "foreground_dice", "{:.3f}"),
    ("seg", "SEG", "metrics", "seg", "{:.3f}"),
    ("ap50", "AP@0.5", "metrics", "ap50", "{:.3f}"),
    ("merges", "merges", "metrics", "merges", "{:.0f}"),
    ("missed", "missed", "metrics", "missed", "{:.0f}"),
    ("v_rand", "V_rand", "metrics", "v_rand", "{:.3f}"),
    ("v_info", "V_info", "metrics", "v_info", "{:.3f}"),
    ("arand", "adapted Rand error", "metrics", "adapted_rand_error", "{:.3f}"),
    ("boundary_ap", "boundary AP", "metrics", "boundary_ap", "{:.3f}"),
)
# Rows of the learned-versus-classical table of dense ground truth: label, metrics key of the
# learned result, and where the baseline's figure is: metrics["baseline"][key], or for the raw
# stain's boundary AP metrics[key] itself.
_AGAINST_BASELINE = (
    ("adapted Rand error (lower is better)", "adapted_rand_error", ("baseline", "adapted_rand_error")),
    ("VOI split (lower is better)", "voi_split", ("baseline", "voi_split")),
    ("VOI merge (lower is better)", "voi_merge", ("baseline", "voi_merge")),
    ("boundary AP: boundary map vs raw stain (higher is better)", "boundary_ap", (None, "stain_boundary_ap")),
)


# ----------------------------------------------------------------------------- QC flags
def _value(result: dict, section: str, field: str) -> float | None:
    value = (result.get(section) or {}).get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _outlier_scores(results: list[dict]) -> list[dict[str, float]]:
    """Robust z-score of every batch-table column per stack (0 where the batch is too small)."""
    summaries = {}
    for i, result in enumerate(results):
        values = {key: _value(result, section, field) for key, _, section, field, _ in _COLUMNS}
        summaries[str(i)] = {key: value for key, value in values.items() if value is not None}
    judged = flag_outlier_stacks(summaries, threshold=_OUTLIER_Z)
    return [judged[str(i)]["z_scores"] for i in range(len(results))]


def qc_flags(results: list[dict]) -> list[list[str]]:
    """QC flags per stack: many uncertain pixels, no objects, outliers against the batch.

    ``results`` are the per-stack metrics JSONs of :func:`unet_core.evaluate.evaluate_stack`.
    A value is an outlier when its modified z-score against the batch exceeds 3.5 (see
    :func:`unet_core.qc.flag_outlier_stacks`; batches of fewer than 4 stacks are not judged).
    """
    headers = {key: header for key, header, *_ in _COLUMNS}
    flags = []
    for result, scores in zip(results, _outlier_scores(results)):
        stack_flags = []
        uncertain = _value(result, "qc", "uncertain_fraction")
        if uncertain is not None and uncertain > _UNCERTAIN_LIMIT:
            stack_flags.append(f"uncertain pixels {uncertain:.0%}")
        if _value(result, "qc", "mean_objects_per_plane") == 0:
            stack_flags.append("no objects found")
        for key, score in scores.items():
            if abs(score) > _OUTLIER_Z:
                stack_flags.append(f"{headers[key]} outlier in batch (robust z {score:+.1f})")
        flags.append(stack_flags)
    return flags


# ----------------------------------------------------------------------------- provenance
def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _git(source_dir: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(source_dir), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _commit(source_dir: Path | None) -> str:
    """``git rev-parse HEAD`` of the workflow's source, marked when it has uncommitted changes."""
    commit = _git(source_dir, "rev-parse", "HEAD") if source_dir is not None else None
    if not commit:
        return os.environ.get("UNET_PIPELINE_COMMIT", "unknown")
    if _git(source_dir, "status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return commit


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _runtimes(benchmarks_dir: Path | None) -> tuple[list[dict], list[dict]]:
    """Per-rule summary and per-job rows of Snakemake's ``benchmarks/<rule>/<job>.tsv`` files."""
    if benchmarks_dir is None or not benchmarks_dir.is_dir():
        return [], []
    jobs = []
    for path in sorted(benchmarks_dir.glob("*/*.tsv")):
        try:
            with open(path, newline="") as handle:
                records = list(csv.DictReader(handle, delimiter="\t"))
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
        seconds = [s for s in (_number(r.get("s")) for r in records) if s is not None]
        rss = [m for m in (_number(r.get("max_rss")) for r in records) if m is not None]
        cpu = [c for c in (_number(r.get("cpu_time")) for r in records) if c is not None]
        if not seconds:
            continue
        jobs.append({"rule": path.parent.name, "job": path.stem, "seconds": float(np.mean(seconds)),
                     "hms": records[-1].get("h:m:s", ""), "max_rss_mb": max(rss) if rss else None,
                     "cpu_seconds": float(np.mean(cpu)) if cpu else None, "modified": path.stat().st_mtime})
    summary = []
    for rule in sorted({j["rule"] for j in jobs}):
        mine = [j for j in jobs if j["rule"] == rule]
        seconds = [j["seconds"] for j in mine]
        rss = [j["max_rss_mb"] for j in mine if j["max_rss_mb"] is not None]
        summary.append({"rule": rule, "jobs": len(mine), "total": sum(seconds), "median": float(np.median(seconds)),
                        "max": max(seconds), "max_rss_mb": max(rss) if rss else None})
    return summary, jobs


# ----------------------------------------------------------------------------- assembly
def _cell(value: float | None, fmt: str, z: float | None = None) -> dict:
    outlier = z is not None and abs(z) > _OUTLIER_Z
    return {"text": fmt.format(value) if value is not None else "–", "sort": "" if value is None else repr(value),
            "outlier": outlier, "title": f"outlier: robust z = {z:+.1f} against the batch" if outlier else None}


def _source_metadata(image_path: Path) -> dict:
    """What ingest recorded about the raw stack: source, checksum, TIFF metadata, pixel sizes."""
    image = io.open_image(image_path)
    provenance = image.attrs.get("unet_core", {}).get("provenance", {})
    rows = {"axes / shape": f"{image.axes} {list(image.shape)}", "dtype": str(image.array.dtype),
            "pixel size": ", ".join(f"{a}={s:g}" for a, s in image.scale.items()) or "–"}
    for key in ("source", "size_bytes", "sha256"):
        if key in provenance:
            rows[key] = str(provenance[key])
    if "tiff" in provenance:
        rows["TIFF metadata"] = json.dumps(provenance["tiff"], indent=1, default=str)
    if provenance.get("warnings"):
        rows["reader warnings"] = "\n".join(map(str, provenance["warnings"]))
    return rows


def _scalars(mapping: dict | None) -> dict[str, str]:
    out = {}
    for key, value in (mapping or {}).items():
        if isinstance(value, bool) or isinstance(value, str):
            out[key] = str(value)
        elif isinstance(value, (int, float)):
            out[key] = f"{value:.4g}" if isinstance(value, float) else str(value)
    return out


def _stack_entry(status: dict, image: Path, segmentation: Path) -> dict:
    entry = {**status, "display": status["stack"], "role": None}
    if status["status"] != STATUS_OK:
        return entry
    result = entry["result"]
    entry["display"] = str(result.get("stack") or status["stack"])
    entry["role"] = str(result.get("role") or "") or None
    qc = result.get("qc", {})
    entry["qc_table"] = {
        "planes": str(len(qc.get("objects_per_plane", [])) or 1),
        **_scalars({k: qc[k] for k in ("mean_objects_per_plane", "object_size_median", "uncertain_fraction",
                                       "relative_intensity_drift") if k in qc}),
    }
    entry["metrics_table"] = _scalars(result.get("metrics"))
    entry["against_baseline"] = _against_baseline(result.get("metrics") or {})
    entry["problems"] = []
    try:
        entry["planes"] = plane_images(image, segmentation, qc.get("objects_per_plane", []))
    except Exception as error:  # noqa: BLE001 - one unreadable output must not lose the report
        entry["planes"] = []
        entry["problems"].append(f"overlays not drawn: {type(error).__name__}: {error}")
    try:
        entry["histograms"] = histogram_figure(result)
    except Exception as error:  # noqa: BLE001
        entry["histograms"] = None
        entry["problems"].append(f"histograms not drawn: {type(error).__name__}: {error}")
    try:
        entry["source"] = _source_metadata(image)
    except Exception as error:  # noqa: BLE001
        entry["source"] = {}
        entry["problems"].append(f"source metadata not read: {type(error).__name__}: {error}")
    return entry


def _against_baseline(metrics: dict) -> dict | None:
    """The learned result next to the classical baseline of the same run (dense ground truth)."""
    baseline = metrics.get("baseline")
    if not isinstance(baseline, dict):
        return None
    rows = []
    for label, learned, (section, key) in _AGAINST_BASELINE:
        other = (baseline if section else metrics).get(key)
        if isinstance(metrics.get(learned), (int, float)) and isinstance(other, (int, float)):
            rows.append({"metric": label, "learned": f"{metrics[learned]:.3f}", "baseline": f"{other:.3f}"})
    method = ", ".join(f"{k} {v}" for k, v in baseline.items() if isinstance(v, (str, int, float))
                       and k in ("method", "sigma", "h"))
    return {"rows": rows, "method": method}


def _ablation_section(path: str | Path | None) -> dict | None:
    """The ablation table of ``path`` (JSON written by bench/quality.py), or a problem to show."""
    if path is None:
        return None
    try:
        table = json.loads(Path(path).read_text())
        columns = [(str(key), str(header)) for key, header in table["columns"]]
        rows = []
        for row in table["rows"]:
            cells = [f"{row[key]:.4f}" if isinstance(row.get(key), (int, float)) else "–" for key, _ in columns]
            rows.append({"recipe": str(row["recipe"]), "cells": cells})
    except (OSError, ValueError, KeyError, TypeError) as error:
        return {"error": f"ablation table {path} not shown: {type(error).__name__}: {error}"}
    return {"title": str(table.get("title", "")), "measured": str(table.get("measured", "")),
            "reading": str(table.get("reading", "")), "headers": [h for _, h in columns], "rows": rows,
            "source": str(path)}


def _read_result(path: Path) -> dict:
    result = json.loads(path.read_text())
    if not isinstance(result, dict) or not isinstance(result.get("qc"), dict):
        raise ValueError(f"{path}: not a metrics JSON of unet_core.evaluate (no 'qc' section)")
    return result


def _rounded(value):
    """``value`` with its floats at 4 significant digits, for display."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


_KEPT_TOUCHING = "instance ids, touching kept as they are"


def _methods(card: dict, segmentations: Sequence[Path]) -> dict[str, str]:
    """Which ground-truth kind, normalisation and segmentation method the run used (model card and
    the segmentations' own attributes, so the report says what was done, not what was asked)."""
    methods = {}
    targets = [d.get("targets", {}) for d in card.get("training_data", []) if isinstance(d, dict)]
    kinds = sorted({(str(t.get("labels", "?")), t.get("separate_touching", True) is not False) for t in targets})
    if kinds:
        methods["ground truth"] = "; ".join(
            f"{k}: {LABEL_KIND_TARGETS.get(k, k) if separate or k != 'instances' else _KEPT_TOUCHING}"
            for k, separate in kinds)
    normalization = card.get("normalization")
    if isinstance(normalization, dict):
        methods["normalisation"] = str(normalization.get("description", normalization))
    elif normalization:
        methods["normalisation"] = str(normalization)
    used = {}
    for path in segmentations:
        try:
            settings = io.open_image(path).attrs.get("unet_core", {})
        except (OSError, ValueError):
            continue
        keys = ("threshold", "seed_threshold", "sigma", "h", "min_size")
        detail = ", ".join(f"{k} {settings[k]}" for k in keys if k in settings)
        used[f"{settings.get('name', settings.get('method', '?'))} ({detail})"] = True
    if used:
        methods["segmentation"] = "; ".join(used)
    return methods


def _model_section(model_dir: Path, logs_dir: Path | None, failed_logs: set[Path]) -> dict:
    section = {"name": model_dir.name, **model_status(model_dir, logs_dir, failed_logs)}
    card_path = model_dir / "model_card.json"
    card = {}
    if card_path.exists():
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError) as error:
            section["card_error"] = f"{card_path}: {error}"
    summary = {}
    for key in ("parameters", "device", "training_seconds", "normalization", "exported"):
        if key in card:
            summary[key] = str(card[key])
    for key in ("architecture", "final_metrics"):
        if key in card:
            summary[key] = json.dumps(_rounded(card[key]), default=str)
    for key in ("training_data", "validation_data"):
        if key in card:
            summary[key] = ", ".join(str(d.get("stack", d)) if isinstance(d, dict) else str(d) for d in card[key])
    section["card_summary"] = summary
    section["card_data"] = card
    section["card"] = json.dumps(card, indent=2, default=str) if card else None
    try:
        section["training_plot"] = training_figure(model_dir / "training_log.tsv")
    except (OSError, ValueError, KeyError) as error:
        section["training_plot"] = None
        section["card_error"] = f"training log not plotted: {error}"
    return section


def _render(context: dict) -> str:
    environment = Environment(loader=PackageLoader("unet_core", "templates"),
                              autoescape=select_autoescape(["html", "j2"]))
    return environment.get_template("report.html.j2").render(**context)


def write_report(*, metrics: Sequence[str | Path], images: Sequence[str | Path],
                 segmentations: Sequence[str | Path], model_dir: str | Path, output_path: str | Path,
                 config: dict | None = None, title: str = "unet-pipeline", summary_path: str | Path | None = None,
                 logs_dir: str | Path | None = None, benchmarks_dir: str | Path | None = None,
                 source_dir: str | Path | None = None, snakemake_logs: Sequence[str | Path] = (),
                 incomplete: bool = False, ablation: str | Path | None = None,
                 roles: Mapping[str, str] | None = None, skipped: Sequence[Mapping[str, str]] = ()) -> Path:
    """Render the HTML QC report of a run from the outputs that exist.

    Parameters
    ----------
    metrics, images, segmentations : sequence of path
        Per stack (aligned): the metrics JSON ``<stack>.json`` of ``evaluate``, the ingested
        OME-Zarr image and the segmentation OME-Zarr. A stack whose metrics JSON is missing is
        listed as failed (or not run) instead of being reported.
    model_dir : path
        ``results/models/<model>/``: model card, training log, ``model.pt``.
    output_path : path
        The HTML file, written atomically (temporary file, then rename).
    config : dict, optional
        The run's configuration, shown under provenance.
    title : str
        Name of the run in the page title.
    summary_path : path, optional
        Also write a machine-readable JSON summary here: whether the run is complete, and per
        stack its status, QC flags and metrics (or the failed rule, error and log).
    logs_dir : path, optional
        The workflow's ``logs/`` folder: ``<logs_dir>/<rule>/<stack>.log`` of the rules in
        :data:`STACK_RULES` (and ``train/<model>.log``) are searched for the error of a failed
        job. None: no log is read.
    benchmarks_dir : path, optional
        The workflow's ``benchmarks/`` folder: ``<rule>/*.tsv`` give the per-rule runtimes.
    source_dir : path, optional
        The workflow's source folder, whose git commit is recorded ("unknown" without git).
    snakemake_logs : sequence of path
        Snakemake's own logs of this run: jobs it reports as failed count as failed even
        when their log holds no traceback (e.g. a job killed for memory).
    incomplete : bool
        The run stopped with errors (the ``onerror`` handler): the report says so at the top.
    ablation : path, optional
        A measured ablation table (JSON of bench/quality.py: title, measured, columns, rows,
        reading), shown in its own section.
    roles : mapping, optional
        Stack -> role of the sample sheet, shown also for stacks that failed before ``evaluate``
        recorded theirs.
    skipped : sequence of mapping
        Discovered files that were not processed (``path``, ``reason``; see
        :func:`unet_core.samples.discover`): listed in the report and the summary.

    Returns
    -------
    Path
        ``output_path``.
    """
    if not len(metrics) == len(images) == len(segmentations):
        raise ValueError(f"metrics, images and segmentations must be aligned per stack, got "
                         f"{len(metrics)}, {len(images)} and {len(segmentations)} paths")
    model_dir, output_path = Path(model_dir), Path(output_path)
    logs_dir = Path(logs_dir) if logs_dir is not None else None
    failed_logs = failed_job_logs(snakemake_logs)
    model = _model_section(model_dir, logs_dir, failed_logs)

    statuses = _stack_statuses(metrics, logs_dir, failed_logs, model["status"] != STATUS_OK)
    results = [s["result"] for s in statuses if s["status"] == STATUS_OK]
    entries = [_stack_entry(s, Path(i), Path(g)) for s, i, g in zip(statuses, images, segmentations)]
    for entry in entries:
        entry["role"] = entry["role"] or (roles or {}).get(entry["stack"])
    skipped = [{"path": str(item["path"]), "reason": str(item["reason"])} for item in skipped]
    present = [c for c in _COLUMNS if any(_value(r, c[2], c[3]) is not None for r in results)]
    rows = _table_rows(entries, present)
    held_out = [r["metrics"]["foreground_iou"] for r in results
                if _value(r, "metrics", "foreground_iou") is not None and r.get("role") != "train"]
    runtime_summary, runtime_jobs = _runtimes(Path(benchmarks_dir) if benchmarks_dir is not None else None)
    counts = {state: sum(e["status"] == state for e in entries) for state in (STATUS_OK, STATUS_FAILED,
                                                                             STATUS_NOT_RUN)}
    methods = _methods(model.get("card_data", {}), [Path(p) for p in segmentations])
    html = _render({
        "title": title, "generated": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "incomplete": incomplete or counts[STATUS_OK] < len(entries) or model["status"] != STATUS_OK,
        "stopped_with_errors": incomplete, "counts": counts, "n_stacks": len(entries),
        "columns": [c[1] for c in present], "rows": rows, "entries": entries,
        "failures": [e for e in entries if e["status"] != STATUS_OK], "model": model,
        "mean_iou": float(np.mean(held_out)) if held_out else None,
        "versions": _versions(), "commit": _commit(Path(source_dir) if source_dir is not None else None),
        "host": platform.node(), "platform": platform.platform(), "source_dir": str(source_dir or "–"),
        "snakemake_logs": [str(p) for p in snakemake_logs or ()],
        "config": json.dumps(config or {}, indent=2, default=str),
        "runtime_summary": runtime_summary, "runtime_jobs": runtime_jobs,
        "ablation": _ablation_section(ablation),
        "methods": methods, "skipped": skipped,
    })
    if summary_path is not None:
        write_text(Path(summary_path), json.dumps({**_summary(entries, model, counts, incomplete),
                                                      "skipped": skipped, "methods": methods},
                                                     indent=2, default=str))
    write_text(output_path, html)
    return output_path


def _stack_statuses(metrics: Sequence[str | Path], logs_dir: Path | None, failed_logs, model_failed: bool) -> list:
    """Per stack: its status (run_status), its evaluate result when ok, and its QC flags and
    outlier scores among the stacks that are ok."""
    statuses = []
    for metrics_path in map(Path, metrics):
        stack = metrics_path.name.removesuffix(".json")
        status = stack_status(stack, metrics_path, logs_dir, failed_logs, model_failed)
        if status["status"] == STATUS_OK:
            try:
                status["result"] = _read_result(metrics_path)
            except (OSError, ValueError) as error:
                status = {**status, "status": STATUS_FAILED, "rule": "evaluate",
                          "error": f"{type(error).__name__}: {error}", "log": str(metrics_path)}
        statuses.append(status)
    ok = [s for s in statuses if s["status"] == STATUS_OK]
    results = [s["result"] for s in ok]
    for status, flags, scores in zip(ok, qc_flags(results), _outlier_scores(results)):
        status["flags"], status["z"] = flags, scores
    return statuses


def _table_rows(entries: list[dict], present: list) -> list[dict]:
    """The overview table: one row per stack, a cell per metric column that any stack has."""
    rows = []
    for number, entry in enumerate(entries, start=1):
        row = {"number": number, "entry": entry, "cells": []}
        for key, _header, section, field, fmt in present:
            result = entry.get("result", {})
            row["cells"].append(_cell(_value(result, section, field), fmt, entry.get("z", {}).get(key)))
        rows.append(row)
    return rows


def _summary(entries: list[dict], model: dict, counts: dict, stopped_with_errors: bool) -> dict:
    stacks = []
    for entry in entries:
        item = {"stack": entry["stack"], "role": entry["role"], "status": entry["status"]}
        if entry["status"] == STATUS_OK:
            item.update(flags=entry.get("flags", []), metrics=entry["result"].get("metrics"))
        else:
            item.update(rule=entry["rule"], error=entry["error"], log=entry["log"])
        stacks.append(item)
    complete = not stopped_with_errors and counts[STATUS_OK] == len(entries) and model["status"] == STATUS_OK
    return {"complete": complete, "stopped_with_errors": stopped_with_errors,
            "counts": counts, "model": {k: model[k] for k in ("name", "status", "error", "log")}, "stacks": stacks}


def report_incomplete_run(*, metrics: Sequence[str | Path], images: Sequence[str | Path],
                          segmentations: Sequence[str | Path], model_dir: str | Path, output_path: str | Path,
                          record_path: str | Path, config: dict | None = None,
                          summary_path: str | Path | None = None, logs_dir: str | Path = "logs",
                          benchmarks_dir: str | Path | None = "benchmarks", source_dir: str | Path | None = None,
                          snakemake_logs: Sequence[str | Path] = (),
                          ablation: str | Path | None = None, roles: Mapping[str, str] | None = None,
                          skipped: Sequence[Mapping[str, str]] = ()) -> Path | None:
    """:func:`write_report` for a run that stopped with errors; never raises.

    For the workflow's ``onerror`` handler: stacks whose metrics exist are reported, the others
    are listed with the rule that failed and its error, and the page says the run is incomplete.
    Then a line (time, failed stacks, Snakemake's log) is appended to ``record_path``, an input
    of the report rule (created by :func:`start_record`): the new line makes Snakemake write
    the report again on the next run, even when the failed stacks are then removed from the
    batch and every other input is unchanged.

    Any problem is printed to stderr and to ``<logs_dir>/report/onerror.log`` and None is
    returned, so that the run's own error stays the one Snakemake reports.
    """
    written = None
    try:
        written = write_report(metrics=metrics, images=images, segmentations=segmentations, model_dir=model_dir,
                               output_path=output_path, config=config, summary_path=summary_path,
                               logs_dir=logs_dir, benchmarks_dir=benchmarks_dir, source_dir=source_dir,
                               snakemake_logs=snakemake_logs, incomplete=True, ablation=ablation,
                               roles=roles, skipped=skipped)
    except Exception:  # noqa: BLE001 - a broken report must not mask the original error
        _report_problem(logs_dir, "the report of the incomplete run was not written")
    try:
        _append_record(Path(record_path), metrics, snakemake_logs, written)
    except Exception:  # noqa: BLE001
        _report_problem(logs_dir, f"{record_path} was not updated")
    return written


_RECORD_HEADER = "time\tstacks_without_metrics\treport_written\tsnakemake_log\n"


def start_record(path: str | Path) -> Path:
    """The record of runs that stopped with errors, as its header only, unless it exists (it is
    never emptied: it is the history :func:`report_incomplete_run` appends to)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, _RECORD_HEADER)
    return path


def _append_record(path: Path, metrics: Sequence[str | Path], snakemake_logs: Sequence[str | Path],
                   written: Path | None) -> None:
    """One line per run that stopped with errors: when, which stacks have no metrics, the logs."""
    missing = [Path(m).name.removesuffix(".json") for m in metrics if not Path(m).exists()]
    start_record(path)
    with open(path, "a") as handle:
        when = datetime.datetime.now().astimezone().isoformat(timespec="microseconds")
        fields = [when, ",".join(missing) or "-", "yes" if written else "no",
                  ",".join(map(str, snakemake_logs or ())) or "-"]
        handle.write("\t".join(field.replace("\t", " ").replace("\n", " ") for field in fields) + "\n")


def _report_problem(logs_dir: str | Path, what: str) -> None:
    message = f"unet_core.report: {what}:\n{traceback.format_exc()}"
    print(message, file=sys.stderr)
    try:
        log = Path(logs_dir) / "report" / "onerror.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            handle.write(message)
    except Exception:  # noqa: BLE001
        pass
