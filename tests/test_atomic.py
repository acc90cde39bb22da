"""unet_core.atomic: every output is published in one step; a kill anywhere leaves it whole."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unet_core import atomic

# Publishes a new folder (or file) over the old one and SIGKILLs itself at the given step.
KILL_AT_STEP = """
import os, signal, sys
from pathlib import Path
from unet_core import atomic
target, kind, step, exchange = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if not exchange:
    atomic._exchange = lambda a, b: False
def hook(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)
atomic._STEP_HOOK = hook
if kind == "dir":
    with atomic.atomic_directory(target) as tmp:
        for i in range(50):
            (tmp / f"part{i}").write_text("new")
else:
    atomic.write_text(target, "new" * 1000)
"""


def _old(target, kind):
    if kind == "dir":
        target.mkdir()
        for i in range(30):
            (target / f"part{i}").write_text("old")
    else:
        target.write_text("old" * 1000)


def _content(target, kind):
    if kind == "dir":
        return sorted((p.name, p.read_text()) for p in target.iterdir())
    return target.read_text()


def _expected(kind, which):
    if kind == "dir":
        return sorted((f"part{i}", which) for i in range(30 if which == "old" else 50))
    return which * 1000


@pytest.mark.parametrize("kind, step, after", [
    ("dir", "exchange", "old"), ("dir", "cleanup", "new"), ("file", "rename", "old"),
])
def test_kill_at_any_step_leaves_the_old_or_the_new_result_whole(tmp_path, kind, step, after):
    target = tmp_path / "result"
    _old(target, kind)
    run = subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(target), kind, step, "1"])
    assert run.returncode == -signal.SIGKILL
    assert _content(target, kind) == _expected(kind, after)
    # what the killed run left under temporary names goes with the next publish
    with atomic.atomic_directory(target) if kind == "dir" else atomic.atomic_file(target) as tmp:
        (tmp / "part0" if kind == "dir" else tmp).write_text("third")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_without_exchange_the_old_folder_is_aside_never_half_deleted(tmp_path):
    """A file system that cannot exchange: killed between the two renames, the final path is
    missing (Snakemake reruns the job) and the old result is whole under its temporary name."""
    target = tmp_path / "result"
    _old(target, "dir")
    run = subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(target), "dir", "aside", "0"])
    assert run.returncode == -signal.SIGKILL
    assert not target.exists()
    (aside,) = tmp_path.glob(".result.old-*")
    assert _content(aside, "dir") == _expected("dir", "old")
    run = subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(target), "dir", "none", "0"])
    assert run.returncode == 0 and _content(target, "dir") == _expected("dir", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_atomic_directory_keeps_previous_output_on_error(tmp_path):
    target = tmp_path / "result"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash")
    assert (target / "old.txt").read_text() == "previous"
    assert not list(tmp_path.glob(".result.partial*"))


def test_atomic_directory_replaces_previous_output(tmp_path):
    target = tmp_path / "result"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    with atomic.atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_atomic_file_keeps_previous_file_on_error_and_writes_the_same_bytes(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    # torch.save names its archive after the file: the temporary file has the target's name
    state = {"w": torch.arange(5.0)}
    with atomic.atomic_file(target) as tmp:
        torch.save(state, tmp)
    (tmp_path / "ref").mkdir()
    torch.save(state, tmp_path / "ref" / "model.pt")
    assert target.read_bytes() == (tmp_path / "ref" / "model.pt").read_bytes()


def test_exchange_swaps_two_folders(tmp_path):
    """The system call itself (ext4, tmpfs, xfs, btrfs have it; without it the fallback runs)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "y").write_text("from b")
    assert atomic._exchange(a, b), "renameat2(RENAME_EXCHANGE) is not available on this file system"
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename aside"])
@pytest.mark.parametrize("kind", ["symlink to a folder", "file", "dangling symlink"])
def test_a_folder_replaces_whatever_is_at_the_target(tmp_path, monkeypatch, kind, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours to delete")
    target = tmp_path / "result"
    if kind == "symlink to a folder":
        target.symlink_to(elsewhere)
    elif kind == "file":
        target.write_text("old")
    else:
        target.symlink_to(tmp_path / "missing")
    with atomic.atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _is_real_folder(target) and [p.name for p in target.iterdir()] == ["new.txt"]
    assert (elsewhere / "keep.txt").read_text() == "not ours to delete"  # a link is replaced, not followed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result", "scratch"]


def _is_real_folder(path):
    return path.is_dir() and not path.is_symlink()


def test_a_file_replaces_a_symlink_without_following_it(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("untouched")
    link = tmp_path / "result.json"
    link.symlink_to(real)
    atomic.write_text(link, "new")
    assert not link.is_symlink() and link.read_text() == "new" and real.read_text() == "untouched"


def test_failed_rename_after_aside_puts_the_old_result_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "result"
    _old(target, "dir")
    rename = atomic.os.rename

    def failing(source, destination):
        if Path(destination) == target and "partial" in Path(source).name:
            raise OSError("disk quota exceeded")
        return rename(source, destination)

    monkeypatch.setattr(atomic.os, "rename", failing)
    with pytest.raises(OSError, match="quota"):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "part0").write_text("new")
    assert _content(target, "dir") == _expected("dir", "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]
