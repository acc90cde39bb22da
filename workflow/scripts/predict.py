"""Rule predict: overlap-tile class probabilities of one stack."""

import torch
from _common import logged

from unet_core.predict import predict_image


def main(snakemake):
    with logged(snakemake):
        torch.set_num_threads(snakemake.threads)
        tile, block = snakemake.params.tile, snakemake.params.block
        scheduler = snakemake.config["predict"]["scheduler"]
        predict_image(
            snakemake.input.model[0],
            snakemake.input.zarr,
            snakemake.output.probabilities,
            block_shape=tuple(block) if block else None,
            tile_shape=tuple(tile) if tile else None,
            batch_size=snakemake.params.batch_size,
            dtype=snakemake.params.dtype,
            precision=snakemake.params.precision,
            compile=snakemake.config["predict"]["compile"],
            tta=snakemake.params.tta,
            planewise=snakemake.params.planewise,
            scheduler=scheduler,
            slurm=dict(snakemake.config["predict"]["slurm"]) if scheduler == "slurm" else None,
        )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
