# The trained model as a bioimage.io model package, which ilastik, deepImageJ, QuPath, napari
# and BiaPy open. Not part of `all`: `snakemake --profile profiles/local export`. The test input
# is a crop of the first validation stack (else the first training stack).
rule export_bioimageio:
    input:
        model=rules.train.output.model,
        card=rules.train.output.card,
        sample=zarr_of((VAL or TRAIN)[:1]),
    output:
        package=directory("results/export/{model}.bioimageio"),
    log:
        "logs/export_bioimageio/{model}.log",
    conda:
        "../../envs/unet.yaml"
    script:
        "../scripts/export_bioimageio.py"


rule export:
    input:
        expand(rules.export_bioimageio.output.package, model=MODEL),
