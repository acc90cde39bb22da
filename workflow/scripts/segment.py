"""Rule segment: probabilities -> instance labels (NGFF label image)."""

from _common import logged

from unet_core.segment import segment_image


def main(snakemake):
    with logged(snakemake):
        segment_image(
            snakemake.input.probabilities,
            snakemake.output.labels,
            threshold=snakemake.params.threshold,
            seed_threshold=snakemake.params.seed_threshold,
            min_size=snakemake.params.min_size,
            min_relative_size=snakemake.params.min_relative_size,
            method=snakemake.params.method,
            sigma=snakemake.params.sigma,
            h=snakemake.params.h,
        )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
