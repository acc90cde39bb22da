"""Which blocks of a blockwise prediction are written: append-only logs, one per task.

A task appends the id of every block whose output chunk is written to its own log file,
``<folder>/<task>.log``, one line per block. The finished blocks of a run are the union of all
logs, read once when a run starts or resumes.

Why not one marker file per block (the first version): 10^6 blocks made 10^6 files, each a
metadata operation on a parallel filesystem, and listing them took minutes. A log costs one
``write`` per block on an open file, and reading 10^6 ids takes a fraction of a second.

A task that is run again (its worker was lost, e.g. a cancelled SLURM job) opens the same log:
the blocks in it are written and are skipped, the others are redone. A line cut short by a
crash has no newline and is ignored, so its block is computed again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

__all__ = ["TaskLog", "finished_blocks", "ranges"]

_SUFFIX = ".log"


def _read_ids(path: Path) -> np.ndarray:
    data = path.read_bytes()
    data = data[:data.rfind(b"\n") + 1]  # drop a line cut short by a crash
    if not data:
        return np.empty(0, np.int64)
    try:
        return np.array(data.split(), dtype=np.int64)
    except ValueError as error:
        raise ValueError(f"{path}: not a block log of this pipeline ({error})") from error


def finished_blocks(folder: str | Path) -> np.ndarray:
    """Sorted unique ids of the blocks recorded in every log under ``folder``."""
    logs = [_read_ids(path) for path in sorted(Path(folder).glob(f"*{_SUFFIX}"))]
    return np.unique(np.concatenate(logs)) if logs else np.empty(0, np.int64)


class TaskLog:
    """The log of one task: ``previous`` holds what an earlier attempt of the task recorded.

    ``rerun`` is True when the log existed before, i.e. this is a repeated attempt of the task.
    ``add`` is thread-safe (one write of one line per block, O_APPEND).
    """

    def __init__(self, folder: str | Path, task: str):
        self.path = Path(folder) / f"{task}{_SUFFIX}"
        self.rerun = self.path.exists()
        self.previous = set(_read_ids(self.path).tolist()) if self.rerun else set()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def add(self, block_id: int) -> None:
        with self._lock:
            os.write(self._fd, b"%d\n" % block_id)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> TaskLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ranges(ids) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``: block ids for a log line."""
    ids = sorted(int(i) for i in ids)
    parts, start = [], None
    for k, value in enumerate(ids):
        if start is None:
            start = value
        if k + 1 == len(ids) or ids[k + 1] != value + 1:
            parts.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)
