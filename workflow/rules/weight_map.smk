rule weight_map:
    input:
        zarr=rules.ingest.output.zarr,
    output:
        weights=directory("results/weights/{stack}.zarr"),
    log:
        "logs/weight_map/{stack}.log",
    benchmark:
        "benchmarks/weight_map/{stack}.tsv"
    conda:
        "../../envs/unet.yaml"
    params:
        ndim=config["model"]["ndim"],
        w0=config["weight_map"]["w0"],
        sigma=config["weight_map"]["sigma"],
        labels=config["weight_map"]["labels"],
    script:
        "../scripts/weight_map.py"
