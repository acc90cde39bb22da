"""Shared by the rule scripts: send stderr (progress bars, warnings, tracebacks) to the rule's log."""

import contextlib
import sys


@contextlib.contextmanager
def logged(snakemake):
    """Redirect stderr into ``snakemake.log[0]`` for the duration of the rule."""
    with open(snakemake.log[0], "w") as log, contextlib.redirect_stderr(log):
        try:
            yield
        except Exception:
            import traceback

            traceback.print_exc(file=log)
            raise
        finally:
            sys.stderr.flush()
