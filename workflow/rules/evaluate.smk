rule evaluate:
    input:
        zarr=rules.ingest.output.zarr,
        probabilities=rules.predict.output.probabilities,
        labels=rules.segment.output.labels,
    output:
        metrics=report(
            "results/metrics/{stack}.json",
            caption="../report/metrics.rst",
            category="Metrics",
            labels={"stack": "{stack}"},
        ),
    log:
        "logs/evaluate/{stack}.log",
    conda:
        "../../envs/unet.yaml"
    params:
        role=stack_role,
        ground_truth=labels_kind,
        baseline=config["evaluate"]["baseline"],
    script:
        "../scripts/evaluate.py"
