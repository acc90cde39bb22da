"""Rule ingest: raw TIFF stack (+ ground truth) -> OME-Zarr."""

from _common import logged

from unet_core.ingest import ingest


def main(snakemake):
    with logged(snakemake):
        ingest(
            snakemake.input.image,
            snakemake.output.zarr,
            labels_path=snakemake.input.get("labels"),
            axes=snakemake.params.axes,
            chunks=snakemake.params.chunks,
            subset=snakemake.params.subset,
            format=snakemake.params.format,
            shards=snakemake.params.shards,
        )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
