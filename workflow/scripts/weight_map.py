"""Rule weight_map: class targets and the paper's weight maps from the ground truth."""

from _common import logged

from unet_core.prepare import prepare_targets


def main(snakemake):
    with logged(snakemake):
        prepare_targets(
            snakemake.input.zarr,
            snakemake.output.weights,
            ndim=snakemake.params.ndim,
            w0=snakemake.params.w0,
            sigma=snakemake.params.sigma,
            labels=snakemake.params.labels,
            separate_touching=snakemake.params.separate_touching,
        )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
