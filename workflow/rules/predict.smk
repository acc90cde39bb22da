rule predict:
    input:
        zarr=rules.ingest.output.zarr,
        model=expand(rules.train.output.model, model=MODEL),
    output:
        probabilities=directory("results/predictions/{stack}.ome.zarr"),
    log:
        "logs/predict/{stack}.log",
    benchmark:
        "benchmarks/predict/{stack}.tsv"
    conda:
        "../../envs/unet.yaml"
    # As many cores as the run or the SLURM job grants (Snakemake caps threads at --cores).
    threads: 64
    resources:
        gpu=1,
    # Not params: predict.scheduler, predict.slurm and predict.compile say who computes the blocks
    # and how, not what they hold, so changing them must not rerun finished stacks (rerun-triggers
    # include params); the script reads them from the config.
    params:
        tile=config["predict"]["tile"],
        block=config["predict"]["block"],
        tta=config["predict"]["tta"],
        planewise=config["predict"]["planewise"],
        batch_size=config["predict"]["batch_size"],
        dtype=config["predict"]["dtype"],
        precision=config["predict"]["precision"],
    script:
        "../scripts/predict.py"
