"""Rule train: train the U-Net on the training stacks, validate on the val stacks."""

from pathlib import Path

import torch
from _common import logged

from unet_core.train import TrainSettings, train


def main(snakemake):
    with logged(snakemake):
        torch.set_num_threads(snakemake.threads)
        settings = TrainSettings.from_config(
            dict(snakemake.params.model),
            dict(snakemake.params.train),
            dict(snakemake.params.normalize),
            dict(snakemake.params.weight_map),
        )
        train(
            train_images=list(snakemake.input.images),
            train_weights=list(snakemake.input.weights),
            val_images=list(snakemake.input.val_images),
            val_weights=list(snakemake.input.val_weights),
            out_dir=Path(snakemake.output.model).parent,
            settings=settings,
        )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
