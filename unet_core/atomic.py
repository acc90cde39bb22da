"""Atomic publication of results: a reader (or the next run) finds the old result or the new one, never a part.

Every output of the pipeline is written under a temporary name beside its final path and then
published with one system call: :func:`os.replace` for a file, and for a folder that replaces
an existing one Linux's ``renameat2(RENAME_EXCHANGE)``, which swaps the two names atomically,
after which the old folder (now under the temporary name) is removed. A process killed at any
point leaves the final path either as it was or complete and new; what is left under a
temporary name is removed by the next run (:func:`remove_stale`). Where the file system cannot
exchange (some network file systems), the old folder is first renamed aside: then a kill in the
instant between the two renames leaves the final path missing (never half-written), which
Snakemake reruns.

Temporary names are ``.NAME.partial-HOST-PID`` (``.old-`` for a folder renamed aside): the
host and process let a rerun tell its own dead runs apart from live runs on other nodes of a
shared file system. (Prediction keeps its resumable ``.NAME.partial`` under a fixed name and
publishes it with :func:`publish`.)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "publish", "remove_stale", "temporary_path", "write_text",
           "host_name"]

_LOG = logging.getLogger(__name__)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# Test hook: called with the name of each step of :func:`publish` ("rename" onto nothing or a
# file; "exchange", then "cleanup", or where the system cannot exchange "aside", then "cleanup"),
# so that a test can kill the process exactly there.
_STEP_HOOK: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(name)


def host_name() -> str:
    """This host's name as it appears in temporary names."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temporary_path(target: str | Path, kind: str = "partial") -> Path:
    """``.NAME.<kind>-HOST-PID`` beside ``target``."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{host_name()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(target: str | Path) -> None:
    """Remove the temporaries of earlier runs for ``target`` that were killed on this host.

    A ``.NAME.partial-HOST-PID`` (or ``.old-``) entry whose process no longer runs here is a
    leftover of a killed run. Entries of other hosts are left alone: a run there may still be
    writing (shared file systems on a cluster); a legacy ``.NAME.partial-PID`` counts as local.
    """
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:partial|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or int(match["pid"]) == os.getpid() and match["host"] in (None, host_name()):
            continue
        if match["host"] not in (None, host_name()) or _pid_alive(int(match["pid"])):
            continue
        _LOG.info("removing %s, left by a killed run", entry)
        _remove(entry)


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's renameat2, looked up once per process; None where there is none (not glibc >= 2.28)."""
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step; False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def publish(tmp: str | Path, target: str | Path) -> None:
    """Put the complete ``tmp`` (a file or a folder) at ``target``, replacing what is there atomically.

    Whatever ``target`` was (nothing, a file, a folder, a symbolic link, which is replaced and
    not followed) is removed afterwards. See the module notes for the guarantee.
    """
    tmp, target = Path(tmp), Path(target)
    if not os.path.lexists(target) or (not _is_folder(tmp) and not _is_folder(target)):
        _step("rename")
        os.replace(tmp, target)  # onto nothing, or a file onto a file or link: one atomic step
        return
    _step("exchange")
    if _exchange(tmp, target):
        _step("cleanup")
        _remove(tmp)  # now the old entry
        return
    old = temporary_path(target, "old")
    if os.path.lexists(old):  # left by a killed run of a process with this host and id
        _remove(old)
    os.rename(target, old)
    _step("aside")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # the old result back under its name
        raise
    _step("cleanup")
    _remove(old)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; publish it at ``target`` on success.

    On any error the temporary folder is removed and an existing ``target`` is left untouched,
    so an interrupted job never leaves a result that looks complete. Temporaries left by killed
    runs on this host are removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = temporary_path(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path for the file ``target``; publish it at ``target`` on success.

    The temporary file has ``target``'s own name, inside a private temporary folder beside it:
    writers that record the file name in the file (``torch.save`` names its zip archive after
    it) write the same bytes as they would at ``target``.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with atomic_file(folder / "result.json") as tmp:
    ...     _ = tmp.write_text("{}")
    >>> sorted(p.name for p in folder.iterdir())
    ['result.json']
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    folder = temporary_path(target)
    if folder.exists():
        _remove(folder)
    folder.mkdir()
    try:
        yield folder / target.name
        publish(folder / target.name, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_text(target: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)
