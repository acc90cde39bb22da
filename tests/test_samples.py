"""The stack table: sample sheet parsing and raw-folder discovery."""

import os

import pytest

from unet_core.samples import discover_stacks, merge_stacks, read_sample_sheet, stack_name


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


def test_discovery_pairs_labels_and_waits_for_copies(tmp_path, capsys):
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
    stacks = discover_stacks(raw, "*.tif", min_age_s=60, now=1_000_000.0 + 120)
    assert [(s["stack"], s["role"]) for s in stacks] == [("a", "predict"), ("b", "predict"),
                                                         ("orphan_labels", "predict")]
    assert stacks[0]["labels"] == str(raw / "a_labels.tif") and stacks[1]["labels"] == ""
    warnings = capsys.readouterr().err
    assert "scan {1}.tif" in warnings and "scan <2>.tif" in warnings and "rename the file" in warnings


def test_discovery_disambiguates_and_stays_inside(tmp_path):
    raw = tmp_path / "raw"
    _touch(raw / "x y.tif")
    _touch(raw / "x_y.tif")
    outside = _touch(tmp_path / "secret.tif")
    (raw / "link.tif").symlink_to(outside)
    stacks = discover_stacks(raw, "**/*.tif")
    names = [s["stack"] for s in stacks]
    assert len(set(names)) == 2 and all(n.startswith("x_y-") for n in names)
    with pytest.raises(ValueError, match="without '..'"):
        discover_stacks(raw, "../*.tif")
    with pytest.raises(ValueError, match="raw folder not found"):
        discover_stacks(tmp_path / "missing")


def test_merge_keeps_sheet_first_and_rejects_name_clash(tmp_path):
    raw = tmp_path / "raw"
    a = _touch(raw / "a.tif")
    found = discover_stacks(raw)
    sheet = [{"stack": "t", "path": str(a), "labels": "", "role": "train", "axes": "", "subset": ""}]
    assert list(merge_stacks(sheet, found)) == ["t"]  # same file: the sheet's row wins
    other = [{**sheet[0], "stack": "a", "path": str(tmp_path / "elsewhere.tif")}]
    with pytest.raises(ValueError, match="would be named 'a'"):
        merge_stacks(other, found)
