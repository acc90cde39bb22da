rule ingest:
    input:
        unpack(ingest_inputs),
    output:
        zarr=directory("results/zarr/{stack}.ome.zarr"),
    log:
        "logs/ingest/{stack}.log",
    benchmark:
        "benchmarks/ingest/{stack}.tsv"
    conda:
        "../../envs/unet.yaml"
    params:
        axes=stack_axes,
        chunks=config["ingest"]["chunks"],
        subset=stack_subset,
    script:
        "../scripts/ingest.py"
