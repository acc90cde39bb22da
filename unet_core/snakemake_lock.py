"""Is a workflow folder's Snakemake lock held by a live run, or left behind by a killed one?

Snakemake locks a working directory by writing ``.snakemake/locks/<n>.input.lock`` and
``<n>.output.lock`` when a run starts and removing them when it ends; a run killed with
SIGKILL (power cut, ``scancel`` of the head job, OOM killer) leaves them behind, and every
later run refuses to start until ``snakemake --unlock``. The lock files hold no process id,
so a lock counts as live while any process on this host whose working directory is the
folder runs Snakemake or one of its rule scripts (and such a process without lock files is a
run still starting: it counts as holding the folder too) (Snakemake changes into its ``--directory``
itself, so a run started elsewhere with ``-d`` counts too). Runs on other hosts that share
the folder are not visible from here: do not let the nightly run unlock then
(``scripts/nightly.sh`` with ``NIGHTLY_UNLOCK=never``).
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
    processes: tuple[tuple[int, str], ...]  # (pid, command line)

    @property
    def status(self) -> str:
        """``free`` (no lock), ``held`` (a live run holds it) or ``stale`` (left by a killed run)."""
        if self.processes:
            return "held"
        return "stale" if self.lock_files else "free"

    def describe(self) -> str:
        locks = ", ".join(str(p) for p in self.lock_files)
        if self.status == "free":
            return "no Snakemake lock and no Snakemake run in this folder"
        if self.status == "stale":
            return f"stale Snakemake lock {locks}: no Snakemake process works in this folder"
        runs = "; ".join(f"pid {pid}: {command[:200]}" for pid, command in self.processes)
        held = f"Snakemake lock {locks} is held by a live run" if locks else "a Snakemake run is starting or running"
        return f"{held} ({runs})"


def _is_snakemake(argv: list[str]) -> bool:
    """A Snakemake run or a rule script of one (``.snakemake/scripts/tmp...py``)."""
    for i, arg in enumerate(argv):
        name = os.path.basename(arg)
        if name in ("snakemake", "snakemake.exe") or (arg == "-m" and argv[i + 1:i + 2] == ["snakemake"]):
            return True
        if f"{os.sep}.snakemake{os.sep}scripts{os.sep}" in arg or arg.startswith(f".snakemake{os.sep}scripts"):
            return True
    return False


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


def _processes_in(folder: Path, proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    mine, found = _ancestors(), []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            if Path(os.readlink(entry / "cwd")).resolve() != folder:
                continue
            argv = [a for a in (entry / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
        except OSError:  # gone meanwhile, or another user's process
            continue
        if _is_snakemake(argv):
            found.append((int(entry.name), " ".join(argv)))
    return sorted(found)


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
    return LockState(lock_files, tuple(_processes_in(folder)))
