"""Dask workers as SLURM jobs (dask-jobqueue) for the blocks of one large volume.

:func:`slurm_client` starts a ``SLURMCluster`` from inside the predict job: each worker is one
SLURM job (one GPU, ``cores`` CPUs, ``memory``) running the same Python environment, and the
cluster adapts between ``minimum_workers`` and ``maximum_workers`` jobs. It always shuts the
cluster down, on success, on an error and on SIGTERM (which SLURM and Snakemake send to stop a
job): no worker job outlives the run. As a second line of defence every worker job of a run
carries the run's own job name and is cancelled by name at the end, and a worker whose
scheduler is gone exits after ``death_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .defaults import section

__all__ = ["SlurmSettings", "slurm_client", "Terminated", "ClusterError"]

_LOG = logging.getLogger(__name__)
_DEFAULTS = section("predict", "slurm")
_JOB_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ClusterError(RuntimeError):
    """The worker jobs could not be started (no sbatch, none started in time)."""


class Terminated(SystemExit):
    """SIGTERM arrived while the cluster ran (exit status 143, as a signalled process)."""

    def __init__(self) -> None:
        super().__init__(143)


@dataclass(frozen=True)
class SlurmSettings:
    """Worker jobs of the ``slurm`` scheduler; the config's ``predict.slurm`` section.

    ``partition``/``account``/``gpus`` go to sbatch (``-p``, ``-A``, ``--gpus``), ``cores`` and
    ``memory`` are per worker job (one Dask worker process each), ``walltime`` is HH:MM:SS.
    ``job_directives`` are extra ``#SBATCH`` lines (e.g. ``--constraint=a100``).
    ``start_timeout`` (s): how long to wait for the first ``minimum_workers`` jobs to start.
    ``job_name``: the worker jobs' SLURM name; default ``unet-predict-<8 hex>``, new per run.
    """

    minimum_workers: int = _DEFAULTS["minimum_workers"]
    maximum_workers: int = _DEFAULTS["maximum_workers"]
    cores: int = _DEFAULTS["cores"]
    memory: str = _DEFAULTS["memory"]
    gpus: int = _DEFAULTS["gpus"]
    partition: str | None = _DEFAULTS["partition"]
    account: str | None = _DEFAULTS["account"]
    walltime: str = _DEFAULTS["walltime"]
    job_directives: tuple[str, ...] = tuple(_DEFAULTS["job_directives"])
    log_directory: str | None = _DEFAULTS["log_directory"]
    # not config settings: the worker's scratch folder and how long it outlives its scheduler
    local_directory: str | None = None
    death_timeout: int = 60
    start_timeout: float = float(_DEFAULTS["start_timeout"])
    job_name: str | None = None

    @classmethod
    def from_config(cls, section: dict | None) -> SlurmSettings:
        section = dict(section or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise ValueError(f"predict.slurm: unknown setting(s) {unknown}; known: {sorted(names)}")
        if "job_directives" in section:
            section["job_directives"] = tuple(section["job_directives"] or ())
        # The values end up in a shell script (#SBATCH lines and the worker command): one line each.
        for name, value in section.items():
            for text in (value if isinstance(value, tuple) else (value,)):
                if isinstance(text, str) and not text.isprintable():
                    raise ValueError(f"predict.slurm.{name}: {text!r} holds a line break or control character")
        if section.get("job_name") is not None and not _JOB_NAME.fullmatch(str(section["job_name"])):
            raise ValueError(f"predict.slurm.job_name: {section['job_name']!r} must be letters, digits, '-', '_' "
                             f"or '.' (at most 64)")
        settings = cls(**section)
        if not 1 <= settings.minimum_workers <= settings.maximum_workers:
            raise ValueError(f"predict.slurm: need 1 <= minimum_workers <= maximum_workers, got "
                             f"{settings.minimum_workers} and {settings.maximum_workers}")
        if settings.cores < 1 or settings.gpus < 0:
            raise ValueError(f"predict.slurm: cores must be >= 1 and gpus >= 0, got {settings.cores} and "
                             f"{settings.gpus}")
        return settings


def _cancel_by_name(name: str) -> None:
    """Cancel every job of this user named ``name`` (no shell: the name is an argument)."""
    if shutil.which("scancel") is None:
        return
    result = subprocess.run(["scancel", "--name", name, "--user", getpass.getuser()], capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0:
        _LOG.warning("scancel --name %s failed: %s", name, result.stderr.strip())


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread, so that cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def slurm_client(settings: SlurmSettings):
    """A ``distributed.Client`` on a SLURMCluster of worker jobs; the cluster is always closed.

    Waits until ``minimum_workers`` worker jobs run (``start_timeout``).
    """
    if shutil.which("sbatch") is None:
        raise ClusterError("scheduler 'slurm' needs SLURM's sbatch on PATH (run predict on a SLURM login or "
                           "compute node), or use scheduler 'threads'")
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    job_name = settings.job_name or f"unet-predict-{uuid.uuid4().hex[:8]}"
    directives = [f"--gpus={settings.gpus}"] if settings.gpus else []
    directives += list(settings.job_directives)
    if settings.log_directory:
        Path(settings.log_directory).mkdir(parents=True, exist_ok=True)
    cluster = client = None
    with _sigterm_raises():
        try:
            cluster = SLURMCluster(
                cores=settings.cores, processes=1, memory=settings.memory, queue=settings.partition,
                account=settings.account, walltime=settings.walltime, job_name=job_name,
                job_extra_directives=directives, python=sys.executable, log_directory=settings.log_directory,
                local_directory=settings.local_directory, death_timeout=settings.death_timeout,
                scheduler_options={"dashboard_address": None})
            cluster.adapt(minimum=settings.minimum_workers, maximum=settings.maximum_workers)
            client = Client(cluster)
            _LOG.warning("SLURM worker jobs %r: %d to %d workers (%d cores, %s, %d GPU each); waiting for %d",
                         job_name, settings.minimum_workers, settings.maximum_workers, settings.cores,
                         settings.memory, settings.gpus, settings.minimum_workers)
            try:
                client.wait_for_workers(settings.minimum_workers, timeout=settings.start_timeout)
            except TimeoutError as error:
                raise ClusterError(f"no {settings.minimum_workers} SLURM worker job(s) {job_name!r} started within "
                                   f"{settings.start_timeout:.0f} s; see `squeue --name {job_name}` and the worker "
                                   f"logs in {settings.log_directory}") from error
            yield client
        finally:
            for resource in (client, cluster):
                if resource is not None:
                    with contextlib.suppress(Exception):
                        resource.close()
            _cancel_by_name(job_name)
            _LOG.warning("SLURM worker jobs %r closed", job_name)
