"""Rule export_bioimageio: the trained model as a bioimage.io model package (folder)."""

from _common import logged

from unet_core.export import export_bioimageio


def main(snakemake):
    with logged(snakemake):
        export_bioimageio(snakemake.input.model, snakemake.output.package, sample=snakemake.input.sample[0])


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
