rule train:
    input:
        images=zarr_of(TRAIN),
        weights=weights_of(TRAIN),
        val_images=zarr_of(VAL),
        val_weights=weights_of(VAL),
    output:
        model="results/models/{model}/model.pt",
        card=report(
            "results/models/{model}/model_card.json",
            caption="../report/model_card.rst",
            category="Model",
            labels={"model": "{model}", "file": "model card"},
        ),
        log=report(
            "results/models/{model}/training_log.tsv",
            caption="../report/training_log.rst",
            category="Model",
            labels={"model": "{model}", "file": "training log"},
        ),
    log:
        "logs/train/{model}.log",
    benchmark:
        "benchmarks/train/{model}.tsv"
    conda:
        "../../envs/unet.yaml"
    # As many cores as the run or the SLURM job grants (Snakemake caps threads at --cores).
    threads: 64
    resources:
        gpu=1,
    params:
        model=config["model"],
        train=config["train"],
        normalize=config["normalize"],
        # w0 and sigma, recorded in the model card (the weight maps are made by weight_map)
        weight_map={k: config["weight_map"][k] for k in ("w0", "sigma")},
    script:
        "../scripts/train.py"
