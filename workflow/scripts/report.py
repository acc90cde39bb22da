"""Rule report: the self-contained HTML QC report of the run."""

from pathlib import Path

from _common import logged

from unet_core.report import write_report


def main(snakemake):
    with logged(snakemake):
        write_report(
            metrics=list(snakemake.input.metrics),
            images=list(snakemake.input.images),
            segmentations=list(snakemake.input.labels),
            model_dir=Path(snakemake.input.model[0]).parent,
            output_path=snakemake.output.html,
            config=dict(snakemake.params.config),
        )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
