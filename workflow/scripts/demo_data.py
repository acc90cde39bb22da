"""Rule demo_data: write the synthetic demo stacks."""

from _common import logged

from unet_core.demo import write_demo_data


def main(snakemake):
    with logged(snakemake):
        write_demo_data(snakemake.params.outdir, seed=snakemake.params.seed)


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
