"""The batch's stack table: a sample sheet (TSV), and stacks discovered in a raw folder.

Rows are plain dicts with the sample-sheet columns ``stack, path, labels, role, axes,
subset, labels_kind`` (strings, empty when unset). Stack names end up in output file names and in the
HTML report, and discovered ones come from whatever a microscope wrote: they are reduced to
``[A-Za-z0-9_.-]`` and never lead outside the configured folder.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

from .defaults import default

__all__ = ["read_sample_sheet", "check_row", "discover", "discover_stacks", "Discovery", "merge_stacks", "stack_name"]

COLUMNS = ("stack", "path", "labels", "role", "axes", "subset", "labels_kind")
_TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# Snakemake reads {...} in file paths as wildcards and <...> as path variables: such a path
# cannot be a job's input (Snakemake 9 then silently drops the job from the DAG).
_SNAKEMAKE_SYNTAX = re.compile(r"[{}<>]")


def _row(**values: str) -> dict[str, str]:
    return {column: (values.get(column) or "").strip() for column in COLUMNS}


def check_row(row: dict[str, str], schema: dict, where: str) -> None:
    """Check one stack row against the sample-sheet JSON schema.

    Raises
    ------
    ValueError
        Naming ``where`` (the sheet and its line), the stack, the column, the value and what
        the column must hold; every problem of the row, one per line.
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(row), key=lambda e: list(e.path)):
        column = str(error.path[0]) if error.path else None
        described = schema.get("properties", {}).get(column, {}).get("description")
        text = f"column {column!r}: {error.message}" if column else error.message
        problems.append(text + (f" ({column}: {described})" if described else ""))
    if problems:
        raise ValueError(f"{where}: stack {row.get('stack')!r}: " + "; ".join(problems))


def read_sample_sheet(path: str | Path, schema: dict | None = None) -> list[dict[str, str]]:
    """Rows of a tab-separated sample sheet (``#`` lines are comments), in file order.

    With ``schema`` (:func:`unet_core.defaults.samples_schema`), each row is checked against
    it and a bad row is named by the sheet's file name and line number.

    Raises
    ------
    ValueError
        The sheet is missing, lacks the required columns, names a stack twice, or (with
        ``schema``) has a row that breaks it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: sample sheet not found (config key 'samples')")
    with open(path, newline="", encoding="utf-8") as handle:
        numbered = [(number, line) for number, line in enumerate(handle, start=1) if not line.startswith("#")]
    reader = csv.DictReader((line for _, line in numbered), delimiter="\t")
    missing = {"stack", "path", "role"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; the sheet is tab-separated with "
                         f"columns {', '.join(COLUMNS)}")
    rows = []
    for record in reader:
        row = _row(**{k: v for k, v in record.items() if k in COLUMNS})
        if schema is not None:
            check_row(row, schema, f"{path}, line {numbered[reader.line_num - 1][0]}")
        rows.append(row)
    _check_unique(rows, str(path))
    for row in rows:
        for column in ("path", "labels"):
            if _SNAKEMAKE_SYNTAX.search(row[column]):
                raise ValueError(f"{path}: stack {row['stack']!r}: {column} {row[column]!r} contains one of "
                                 f"{{ }} < >, which Snakemake reads as wildcards or path variables; rename the file")
    return rows


def _check_unique(rows: list[dict[str, str]], where: str) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        seen[row["stack"]] = seen.get(row["stack"], 0) + 1
    duplicates = sorted(name for name, count in seen.items() if count > 1)
    if duplicates:
        raise ValueError(f"{where}: duplicate stack names {duplicates}")


def _strip_suffix(name: str) -> str | None:
    lower = name.lower()
    for suffix in _TIFF_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def stack_name(relative: str | Path) -> str:
    """A safe stack name for a raw file, from its path relative to the raw folder.

    Sub-folders are joined with ``__``, the TIFF suffix is dropped and every run of characters
    outside ``[A-Za-z0-9_.-]`` becomes ``_``.

    >>> stack_name("2026-11-30/embryo 1.ome.tif")
    '2026-11-30__embryo_1'
    """
    parts = list(Path(relative).parts)
    parts[-1] = _strip_suffix(parts[-1]) or Path(parts[-1]).stem
    name = "__".join(_UNSAFE.sub("_", part) for part in parts).strip("._-")
    return name or "stack"


class Discovery(NamedTuple):
    """What a raw folder holds: the stacks to process, and the files skipped with the reason."""

    stacks: list[dict[str, str]]
    skipped: list[dict[str, str]]  # {"path": ..., "reason": ...}, in path order


def _skip_reason(path: Path, root: Path, real_root: Path, now: float, min_age_s: float) -> str | None:
    """Why a matching file cannot be a stack in this run (None: it can)."""
    if not path.resolve().is_relative_to(real_root):
        return f"points outside {root} (a symbolic link); only files inside the raw folder are processed"
    try:
        age = now - path.stat().st_mtime
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if age < min_age_s:
        # no age in the text: it is a parameter of the report, which a changing text would rerun
        return (f"modified less than {min_age_s / 60:g} min ago (discover.min_age_minutes), still being "
                f"written or copied: taken by the first run after that")
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    if _SNAKEMAKE_SYNTAX.search(str(path)):
        return "its name holds one of { } < >, which Snakemake reads as wildcards or path variables; rename the file"
    return None


def discover(folder: str | Path, pattern: str = default("discover", "pattern"), *,
             labels_suffix: str = default("discover", "labels_suffix"),
             min_age_s: float = 60 * default("discover", "min_age_minutes"), now: float | None = None) -> Discovery:
    """``predict`` stacks for the files matching ``pattern`` in ``folder`` (new files = new stacks).

    A file ``X<labels_suffix>.tif`` beside ``X.tif`` is X's ground truth (evaluated, not a
    stack of its own). Files modified less than ``min_age_s`` seconds ago are still being
    written by the microscope or a copy job and wait for the next run; files whose real path
    lies outside ``folder`` (symbolic links), unreadable files and names that Snakemake cannot
    take are skipped. Every skipped file is returned with its reason (the report lists them);
    hidden files and folders (``.name``, e.g. rsync's temporary copies) are ignored. Names that
    collide after sanitising get a short hash of their relative path appended.

    Raises
    ------
    ValueError
        ``folder`` does not exist or ``pattern`` escapes it.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: raw folder not found (config key 'discover.folder')")
    if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        raise ValueError(f"discover.pattern {pattern!r} must be relative to the raw folder, without '..'")
    real_root = root.resolve()
    now = time.time() if now is None else now
    found: dict[str, Path] = {}
    skipped = []
    for path in sorted(root.glob(pattern)):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if not path.is_file() and not path.is_symlink():
            continue  # folders, sockets, FIFOs
        reason = _skip_reason(path, root, real_root, now, min_age_s)
        if reason is not None:
            skipped.append({"path": str(path), "reason": reason})
            continue
        found[path.relative_to(root).as_posix()] = path
    stacks = []
    for relative, path in found.items():
        base = _strip_suffix(path.name)
        if base is not None and base.endswith(labels_suffix) and labels_suffix:
            partner = relative[: len(relative) - len(path.name)] + base[: -len(labels_suffix)]
            if any(_strip_suffix(other) == partner for other in found):
                continue  # ground truth of another stack
        labels = ""
        if base is not None:
            for suffix in _TIFF_SUFFIXES:
                candidate = path.with_name(base + labels_suffix + suffix)
                if labels_suffix and candidate.relative_to(root).as_posix() in found:
                    labels = str(candidate)
                    break
        stacks.append(_row(stack=stack_name(relative), path=str(path), labels=labels, role="predict"))
    return Discovery(_disambiguate(stacks, root), skipped)


def discover_stacks(folder: str | Path, pattern: str = default("discover", "pattern"), *,
                    labels_suffix: str = default("discover", "labels_suffix"),
                    min_age_s: float = 60 * default("discover", "min_age_minutes"),
                    now: float | None = None) -> list[dict[str, str]]:
    """The stacks of :func:`discover` (without the skipped files)."""
    return discover(folder, pattern, labels_suffix=labels_suffix, min_age_s=min_age_s, now=now).stacks


def _disambiguate(stacks: list[dict[str, str]], root: Path) -> list[dict[str, str]]:
    names = [row["stack"] for row in stacks]
    for row in stacks:
        if names.count(row["stack"]) > 1:
            relative = Path(row["path"]).relative_to(root).as_posix()
            row["stack"] += "-" + hashlib.sha1(relative.encode()).hexdigest()[:6]
    return stacks


def merge_stacks(sheet: list[dict[str, str]], discovered: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """The batch: sheet rows first, then discovered stacks not already listed (by name or path).

    Raises
    ------
    ValueError
        A discovered file's stack name is taken by a different file in the sheet.
    """
    stacks = {row["stack"]: row for row in sheet}
    listed = {Path(row["path"]).resolve() for row in sheet}
    for row in discovered:
        if Path(row["path"]).resolve() in listed:
            continue
        if row["stack"] in stacks:
            raise ValueError(f"discovered stack {row['path']} would be named {row['stack']!r}, which the sample "
                             f"sheet already uses for {stacks[row['stack']]['path']}; rename one of them")
        stacks[row["stack"]] = row
    return stacks
