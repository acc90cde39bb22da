"""What happened to each job of a run, read from the files it left: outputs, job logs and Snakemake's logs.

A stack whose metrics exist finished; otherwise the first rule of :data:`STACK_RULES` whose
log holds a traceback newer than the output (or that Snakemake's own log lists as failed) is
the one that failed, with the last exception line of its log as the error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path




__all__ = ["last_exception", "failed_job_logs", "job_failure", "stack_status", "model_status", "STACK_RULES",
           "MODEL_RULE", "STATUS_OK", "STATUS_FAILED", "STATUS_NOT_RUN"]

# Rules that run once per stack, in pipeline order: the first one whose log holds an error
# is the one that failed. ``train`` runs once per model.
STACK_RULES = ("ingest", "weight_map", "predict", "segment", "evaluate")
MODEL_RULE = "train"
STATUS_OK, STATUS_FAILED, STATUS_NOT_RUN = "ok", "failed", "not run"
_LOG_TAIL_BYTES = 1 << 18
_TRACEBACK = "Traceback (most recent call last):"
_SNAKEMAKE_FAILED_LOG = re.compile(r"^\s*log: (.+) \(check log file\(s\) for error details\)\s*$", re.M)


def last_exception(text: str) -> str | None:
    """The exception line (with any continuation lines) of the last Python traceback in ``text``.

    Examples
    --------
    >>> log = '''Traceback (most recent call last):
    ...   File "x.py", line 1, in <module>
    ...     raise ValueError("raw/b.tif: not a TIFF")
    ... ValueError: raw/b.tif: not a TIFF'''
    >>> last_exception(log)
    'ValueError: raw/b.tif: not a TIFF'
    >>> last_exception("all fine") is None
    True
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().endswith(_TRACEBACK)]
    if not starts:
        return None
    message: list[str] = []
    for line in lines[starts[-1] + 1:]:
        if not message:
            if line.strip() and not line[:1].isspace():
                message.append(line.rstrip())
            continue
        if not line.strip() or line.startswith(("During handling", "The above exception", _TRACEBACK)):
            break
        message.append(line.rstrip())
        if len(message) >= 20:
            break
    return "\n".join(message)[:4000] or None


def _log_tail(path: Path) -> str:
    """The last ``_LOG_TAIL_BYTES`` of a log (logs of huge jobs are not read whole)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(handle.tell() - _LOG_TAIL_BYTES, 0))
        return handle.read().decode("utf-8", errors="replace")


def failed_job_logs(snakemake_logs: Sequence[str | Path]) -> set[Path]:
    """Log files of the jobs that Snakemake reported as failed ("Error in rule ...") in its logs."""
    failed = set()
    for path in snakemake_logs or ():
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for match in _SNAKEMAKE_FAILED_LOG.finditer(text):
            failed.update(Path(p.strip()).resolve() for p in match.group(1).split(","))
    return failed


def job_failure(log: Path, output: Path | None, failed_logs: set[Path]) -> str | None:
    """The error of the job that wrote ``log`` if its last attempt failed, else None.

    A job failed when Snakemake said so, or when its log holds a traceback that is not older
    than the stack's final output (an older one belongs to an attempt that a later run repaired).
    """
    if not log.is_file():
        return None
    error = last_exception(_log_tail(log))
    if log.resolve() in failed_logs:
        if error:
            return error
        lines = [line for line in _log_tail(log).splitlines() if line.strip()]
        return lines[-1][:4000] if lines else "the job failed and left an empty log"
    if error is None:
        return None
    if output is not None and output.exists() and output.stat().st_mtime > log.stat().st_mtime:
        return None
    return error


def stack_status(stack: str, metrics_path: Path, logs_dir: Path | None, failed_logs: set[Path],
                  model_failed: bool) -> dict:
    status = {"stack": stack, "status": STATUS_OK, "rule": None, "error": None, "log": None}
    if logs_dir is not None:
        for rule in STACK_RULES:
            log = logs_dir / rule / f"{stack}.log"
            error = job_failure(log, metrics_path, failed_logs)
            if error is not None:
                return {**status, "status": STATUS_FAILED, "rule": rule, "error": error, "log": str(log)}
    if metrics_path.exists():
        return status
    reason = ("the model was not trained (rule train failed)" if model_failed else
              "no output and no error in its logs: an upstream job failed or the run was interrupted")
    return {**status, "status": STATUS_NOT_RUN, "error": reason}


def model_status(model_dir: Path, logs_dir: Path | None, failed_logs: set[Path]) -> dict:
    model = model_dir / "model.pt"
    status = {"status": STATUS_OK, "error": None, "log": None}
    if logs_dir is not None:
        log = logs_dir / MODEL_RULE / f"{model_dir.name}.log"
        error = job_failure(log, model, failed_logs)
        if error is not None:
            return {"status": STATUS_FAILED, "error": error, "log": str(log)}
    if not model.exists():
        return {**status, "status": STATUS_NOT_RUN, "error": f"{model} does not exist"}
    return status


