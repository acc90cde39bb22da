# The embedded demo data set: generated (not downloaded) when the default config needs it.
rule demo_data:
    output:
        demo_files(),
    log:
        "logs/demo_data/demo_data.log",
    conda:
        "../../envs/unet.yaml"
    params:
        outdir=demo_outdir,
        seed=config["demo"]["seed"],
    script:
        "../scripts/demo_data.py"
