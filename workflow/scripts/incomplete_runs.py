"""Rule incomplete_runs: the record of runs that stopped with errors, created empty (a header)."""

from _common import logged

from unet_core.report import start_record


def main(snakemake):
    with logged(snakemake):
        start_record(snakemake.output.record)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
