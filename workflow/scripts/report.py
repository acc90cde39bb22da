"""Rule report: the self-contained HTML QC report of the run (and its JSON summary)."""

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
            summary_path=snakemake.output.summary,
            config=dict(snakemake.params.config),
            roles=dict(snakemake.params.roles),
            skipped=list(snakemake.params.skipped),
            logs_dir=snakemake.params.logs_dir,
            benchmarks_dir=snakemake.params.benchmarks_dir,
            source_dir=Path(snakemake.scriptdir).parents[1],
            ablation=snakemake.input.ablation[0] if snakemake.input.ablation else None,
        )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
