rule train:
    input:
        images=zarr_of(TRAIN),
        weights=weights_of(TRAIN),
        val_images=zarr_of(VAL),
        val_weights=weights_of(VAL),
    output:
        model="results/models/{model}/model.pt",
        card="results/models/{model}/model_card.json",
        log="results/models/{model}/training_log.tsv",
    log:
        "logs/train/{model}.log",
    benchmark:
        "benchmarks/train/{model}.tsv"
    conda:
        "../../envs/unet.yaml"
    threads: workflow.cores
    resources:
        gpu=1,
    params:
        model=config["model"],
        train=config["train"],
    script:
        "../scripts/train.py"
