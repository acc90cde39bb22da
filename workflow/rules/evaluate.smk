rule evaluate:
    input:
        zarr=rules.ingest.output.zarr,
        probabilities=rules.predict.output.probabilities,
        labels=rules.segment.output.labels,
    output:
        metrics="results/metrics/{stack}.json",
    log:
        "logs/evaluate/{stack}.log",
    conda:
        "../../envs/unet.yaml"
    params:
        role=stack_role,
        ground_truth=config["evaluate"]["ground_truth"],
    script:
        "../scripts/evaluate.py"
