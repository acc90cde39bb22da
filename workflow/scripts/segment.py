"""Rule segment: probabilities -> instance labels (NGFF label image)."""

from _common import logged

from unet_core.segment import segment_image


def main(snakemake):
    with logged(snakemake):
        segment_image(
            snakemake.input.probabilities,
            snakemake.output.labels,
            threshold=snakemake.params.threshold,
            min_size=snakemake.params.min_size,
            method=snakemake.params.method,
            sigma=snakemake.params.sigma,
            h=snakemake.params.h,
        )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
