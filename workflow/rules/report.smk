rule report:
    input:
        metrics=expand(rules.evaluate.output.metrics, stack=PREDICT),
        images=zarr_of(PREDICT),
        labels=expand(rules.segment.output.labels, stack=PREDICT),
        model=expand(rules.train.output.model, model=MODEL),
        card=expand(rules.train.output.card, model=MODEL),
        training_log=expand(rules.train.output.log, model=MODEL),
    output:
        html=report(
            "results/report/index.html",
            caption="../report/qc_report.rst",
            category="QC report",
        ),
    log:
        "logs/report/report.log",
    conda:
        "../../envs/unet.yaml"
    params:
        config=config,
    script:
        "../scripts/report.py"
