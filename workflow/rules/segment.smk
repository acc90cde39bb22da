rule segment:
    input:
        probabilities=rules.predict.output.probabilities,
    output:
        labels=directory("results/segmentation/{stack}.ome.zarr"),
    log:
        "logs/segment/{stack}.log",
    benchmark:
        "benchmarks/segment/{stack}.tsv"
    conda:
        "../../envs/unet.yaml"
    params:
        threshold=config["segment"]["threshold"],
        min_size=config["segment"]["min_size"],
    script:
        "../scripts/segment.py"
