"""Is a workflow folder's Snakemake lock held by a live run, or left behind by a killed one?

Snakemake locks a working directory by writing ``.snakemake/locks/<n>.input.lock`` and
``<n>.output.lock`` when a run starts and removing them when it ends; a run killed with
SIGKILL (power cut, ``scancel`` of the head job, OOM killer) leaves them behind, and every
later run refuses to start until ``snakemake --unlock``. The lock files hold no process id, so
the folder counts as held while a process on this host whose working directory is the folder
runs Snakemake or one of its rule scripts (with or without lock files: a run still starting has
not written them yet; Snakemake changes into its ``--directory`` itself, so ``-d`` runs count
too), and a lock is not called stale while that cannot be ruled out: a lock file written by
another user, or a Snakemake process whose working directory this user cannot read. Runs on
other hosts that share the folder are not visible from here: do not let the nightly run unlock
then (``scripts/nightly.sh`` with ``NIGHTLY_UNLOCK=never``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LockState", "lock_state"]


@dataclass(frozen=True)
class LockState:
    """The lock files of a workflow folder and the live Snakemake processes working in it."""

    lock_files: tuple[Path, ...]
    processes: tuple[tuple[int, str], ...]  # (pid, command line) working in the folder
    # Why a lock without a visible process cannot be called stale: Snakemake processes whose
    # working directory cannot be read (another user's, /proc mounted with hidepid), or lock
    # files written by another user.
    doubts: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        """``free`` (no lock), ``held`` (a live run holds it, or it cannot be shown not to) or
        ``stale`` (left by a killed run)."""
        if self.processes or (self.lock_files and self.doubts):
            return "held"
        return "stale" if self.lock_files else "free"

    def describe(self) -> str:
        locks = ", ".join(str(p) for p in self.lock_files)
        if self.status == "free":
            return "no Snakemake lock and no Snakemake run in this folder"
        if self.status == "stale":
            return f"stale Snakemake lock {locks}: no Snakemake process works in this folder"
        if not self.processes:
            return f"Snakemake lock {locks} may be held by a live run: {'; '.join(self.doubts)}"
        runs = "; ".join(f"pid {pid}: {command[:200]}" for pid, command in self.processes)
        held = f"Snakemake lock {locks} is held by a live run" if locks else "a Snakemake run is starting or running"
        return f"{held} ({runs})"


def _is_snakemake(argv: list[str]) -> bool:
    """A Snakemake run or a rule script of one (``python .snakemake/scripts/tmp...py``): the
    program itself, or the script or module a Python interpreter runs (not any argument, so
    that ``grep -r snakemake .`` does not count)."""
    def is_ours(arg: str) -> bool:
        return (os.path.basename(arg) == "snakemake" or f"{os.sep}.snakemake{os.sep}scripts{os.sep}" in arg
                or arg.startswith(f".snakemake{os.sep}scripts{os.sep}"))

    if not argv:
        return False
    if is_ours(argv[0]):
        return True
    if not os.path.basename(argv[0]).startswith("python"):
        return False
    rest = argv[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-m":
        rest = rest[1:]  # interpreter options (-u, -B, -X ...)
    if rest[:1] == ["-m"]:
        return rest[1:2] == ["snakemake"]
    return bool(rest) and is_ours(rest[0])


def _ancestors() -> set[int]:
    """This process and its parents (the nightly script that asks must not count as a run)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def _processes_in(folder: Path, proc: Path = Path("/proc")) -> tuple[list[tuple[int, str]], list[str]]:
    """Snakemake processes working in ``folder``, and those whose folder cannot be read."""
    mine, found, unknown = _ancestors(), [], []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            argv = [a for a in (entry / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
        except OSError:  # gone meanwhile
            continue
        if not _is_snakemake(argv):
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd")).resolve()
        except FileNotFoundError:  # gone meanwhile
            continue
        except OSError:  # another user's process: where it works cannot be seen
            unknown.append(f"pid {entry.name} ({' '.join(argv)[:200]}) runs Snakemake in a folder this user "
                           f"cannot see")
            continue
        if cwd == folder:
            found.append((int(entry.name), " ".join(argv)))
    return sorted(found), unknown


def lock_state(folder: str | Path) -> LockState:
    """The Snakemake lock files of ``folder`` and the live Snakemake processes working in it.

    Raises
    ------
    ValueError
        ``folder`` is not a directory, or this system has no ``/proc`` to look for processes in.
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory")
    if not Path("/proc/self/cwd").exists():
        raise ValueError("cannot tell live from stale Snakemake locks here: /proc is not available")
    locks_dir = folder / ".snakemake" / "locks"
    lock_files = tuple(sorted(locks_dir.glob("*.lock"))) if locks_dir.is_dir() else ()
    processes, doubts = _processes_in(folder)
    for path in lock_files:
        try:
            owner = path.stat().st_uid
        except FileNotFoundError:  # released meanwhile
            continue
        if owner != os.getuid():
            doubts.append(f"{path} was written by another user (uid {owner}), whose processes may not be visible")
    return LockState(lock_files, tuple(processes), tuple(doubts))
