"""The stack table: sample sheet parsing and raw-folder discovery."""

import os
from pathlib import Path

import pytest
from conftest import copy_workflow, run_snakemake

from unet_core.defaults import samples_schema
from unet_core.samples import discover, discover_stacks, merge_stacks, read_sample_sheet, stack_name


def _touch(path, mtime=1_000_000.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"II*\x00")
    os.utime(path, (mtime, mtime))
    return path


def test_sheet_rows_and_empty_columns(tmp_path):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("# comment\nstack\tpath\tlabels\trole\na\tx.tif\t\ttrain\nb\ty.tif\ty_l.tif\tval\n")
    rows = read_sample_sheet(sheet)
    assert [r["stack"] for r in rows] == ["a", "b"]
    assert rows[0]["labels"] == "" and rows[0]["axes"] == "" and rows[1]["labels"] == "y_l.tif"


@pytest.mark.parametrize("text, message", [
    ("stack\tpath\trole\na\tx.tif\ttrain\na\ty.tif\tval\n", "duplicate stack names \\['a'\\]"),
    ("stack\tfile\trole\na\tx.tif\ttrain\n", "missing column\\(s\\) \\['path'\\]"),
    ("stack\tpath\trole\na\tscan<1>.tif\ttrain\n", "stack 'a': path 'scan<1>.tif' contains"),
])
def test_bad_sheet_is_named(tmp_path, text, message):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(text)
    with pytest.raises(ValueError, match=f"{sheet}.*{message}"):
        read_sample_sheet(sheet)


def test_missing_sheet_is_named(tmp_path):
    with pytest.raises(ValueError, match="sample sheet not found"):
        read_sample_sheet(tmp_path / "nope.tsv")


@pytest.mark.parametrize("relative, name", [
    ("embryo1.tif", "embryo1"),
    ("2026-11-30/embryo 1.ome.tif", "2026-11-30__embryo_1"),
    ("<script>alert(1)</script>.tiff", "script_alert_1___script"),
    ("../../etc/passwd.tif", "etc__passwd"),
    ("....tif", "stack"),
])
def test_stack_names_are_safe(relative, name):
    assert stack_name(relative) == name


def test_discovery_pairs_labels_and_waits_for_copies(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    _touch(raw / "b.tif")
    _touch(raw / "a.tif")
    _touch(raw / "a_labels.tif")
    _touch(raw / "orphan_labels.tif")
    _touch(raw / "fresh.tif", mtime=1_000_000.0 + 100)
    _touch(raw / ".hidden.tif")
    _touch(raw / "notes.txt")
    _touch(raw / "scan {1}.tif")  # Snakemake syntax in the path: skipped with a warning
    _touch(raw / "scan <2>.tif")
    _touch(raw / "locked.tif")  # unreadable for this user (os.access says so: root reads anything)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked.tif" and access(path, mode))
    found = discover(raw, "*.tif", min_age_s=60, now=1_000_000.0 + 120)
    stacks = found.stacks
    assert [(s["stack"], s["role"]) for s in stacks] == [("a", "predict"), ("b", "predict"),
                                                         ("orphan_labels", "predict")]
    assert stacks[0]["labels"] == str(raw / "a_labels.tif") and stacks[1]["labels"] == ""
    assert discover_stacks(raw, "*.tif", min_age_s=60, now=1_000_000.0 + 120) == stacks
    # every file that is not processed is said, with why (hidden files and other patterns are not)
    reasons = {Path(s["path"]).name: s["reason"] for s in found.skipped}
    assert set(reasons) == {"fresh.tif", "scan {1}.tif", "scan <2>.tif", "locked.tif"}
    assert reasons["fresh.tif"].startswith("modified less than 1 min ago (discover.min_age_minutes), still being")
    assert "rename the file" in reasons["scan {1}.tif"] and "{ } < >" in reasons["scan <2>.tif"]
    assert "permission denied" in reasons["locked.tif"]


def test_discovery_disambiguates_and_stays_inside(tmp_path):
    raw = tmp_path / "raw"
    _touch(raw / "x y.tif")
    _touch(raw / "x_y.tif")
    outside = _touch(tmp_path / "secret.tif")
    (raw / "link.tif").symlink_to(outside)
    stacks, skipped = discover(raw, "**/*.tif", min_age_s=0)
    names = [s["stack"] for s in stacks]
    assert len(set(names)) == 2 and all(n.startswith("x_y-") for n in names)
    assert [(Path(s["path"]).name, "points outside" in s["reason"]) for s in skipped] == [("link.tif", True)]
    with pytest.raises(ValueError, match="without '..'"):
        discover_stacks(raw, "../*.tif")
    with pytest.raises(ValueError, match="raw folder not found"):
        discover_stacks(tmp_path / "missing")


def test_merge_keeps_sheet_first_and_rejects_name_clash(tmp_path):
    raw = tmp_path / "raw"
    a = _touch(raw / "a.tif")
    found = discover_stacks(raw, min_age_s=0)
    sheet = [{"stack": "t", "path": str(a), "labels": "", "role": "train", "axes": "", "subset": ""}]
    assert list(merge_stacks(sheet, found)) == ["t"]  # same file: the sheet's row wins
    other = [{**sheet[0], "stack": "a", "path": str(tmp_path / "elsewhere.tif")}]
    with pytest.raises(ValueError, match="would be named 'a'"):
        merge_stacks(other, found)


@pytest.mark.parametrize("row, problem", [
    ("a\traw/a.tif\t\ttrian", "column 'role': 'trian' is not one of ['train', 'val', 'predict']"),
    ("a b\traw/a.tif\t\ttrain", "column 'stack': 'a b' does not match"),
    ("a\t\t\tpredict", "column 'path': '' should be non-empty"),
    ("a\traw/a.tif\tl.tif\ttrain\tbinry", "column 'labels_kind': 'binry' is not one of ['', 'instances', 'binary', 'dense']"),
])
def test_bad_sheet_row_names_the_file_and_line(tmp_path, row, problem):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("# comment lines count\nstack\tpath\tlabels\trole\tlabels_kind\nok\traw/ok.tif\t\ttrain\n" + row + "\n")
    with pytest.raises(ValueError) as error:
        read_sample_sheet(sheet, samples_schema())
    message = str(error.value)
    assert message.startswith(f"{sheet}, line 4: stack ")
    assert problem in message
    assert len(read_sample_sheet(sheet)) == 2  # without a schema the rows are only read


def test_bad_sheet_row_in_the_workflow_names_the_file_and_line(repo, tmp_path):
    """Snakemake's own validate says only "Error validating config file."."""
    work = copy_workflow(tmp_path / "work")
    sheet = work / "config" / "samples.tsv"
    lines = sheet.read_text().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines, start=1) if "\tpredict" in line)
    lines[number - 1] = lines[number - 1].replace("\tpredict", "\tpredcit")
    sheet.write_text("".join(lines))
    run = run_snakemake(work, "-n")
    output = run.stdout + run.stderr  # Snakemake prints its errors to stdout
    assert run.returncode != 0
    assert f"config/samples.tsv, line {number}: stack 'timelapse_d': column 'role': 'predcit' is not one of" in output
    assert "Error validating config file" not in output
