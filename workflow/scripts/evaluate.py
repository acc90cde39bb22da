"""Rule evaluate: metrics against ground truth (when present) and QC statistics."""

from _common import logged

from unet_core.evaluate import evaluate_stack


def main(snakemake):
    with logged(snakemake):
        evaluate_stack(
            image_path=snakemake.input.zarr,
            probabilities_path=snakemake.input.probabilities,
            segmentation_path=snakemake.input.labels,
            output_path=snakemake.output.metrics,
            stack=snakemake.wildcards.stack,
            role=snakemake.params.role,
            ground_truth=snakemake.params.ground_truth,
            baseline=snakemake.params.baseline,
        )


if "snakemake" in globals():
    main(snakemake)  # noqa: F821
