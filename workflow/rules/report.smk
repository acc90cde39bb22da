from pathlib import Path

from unet_core.defaults import result_settings
from unet_core.report import report_incomplete_run

# One line per run that stopped with errors, appended by the onerror handler below. The rule
# incomplete_runs creates it (a header only) if it is missing, so it is always an input of the
# report: a new line is newer than the report and makes the next run write the report again.
INCOMPLETE_RUNS = "results/report/incomplete_runs.tsv"


rule incomplete_runs:
    output:
        record=INCOMPLETE_RUNS,
    log:
        "logs/report/incomplete_runs.log",
    localrule: True
    conda:
        "../../envs/unet.yaml"
    script:
        "../scripts/incomplete_runs.py"


# The HTML QC report of the run. The same function writes it from the onerror handler below
# when the run stopped with errors (--keep-going: the other stacks still finish).
rule report:
    input:
        metrics=expand(rules.evaluate.output.metrics, stack=PREDICT),
        images=zarr_of(PREDICT),
        labels=expand(rules.segment.output.labels, stack=PREDICT),
        model=expand(rules.train.output.model, model=MODEL),
        card=expand(rules.train.output.card, model=MODEL),
        training_log=expand(rules.train.output.log, model=MODEL),
        incomplete_runs=rules.incomplete_runs.output.record,
        ablation=ABLATION,
    output:
        html=report(
            "results/report/index.html",
            caption="../report/qc_report.rst",
            category="QC report",
            labels={"file": "HTML QC report"},
        ),
        summary=report(
            "results/report/summary.json",
            caption="../report/summary.rst",
            category="QC report",
            labels={"file": "batch summary (JSON)"},
        ),
    log:
        "logs/report/report.log",
    conda:
        "../../envs/unet.yaml"
    params:
        # the settings that shape the results; where and how the jobs ran is left out, so that
        # changing only that rewrites nothing (unet_core.defaults.result_settings)
        config=result_settings(config),
        roles={stack: SAMPLES[stack]["role"] for stack in PREDICT},
        skipped=SKIPPED,
        logs_dir="logs",
        benchmarks_dir="benchmarks",
    script:
        "../scripts/report.py"


# A failed job (with --keep-going, after all others finished): write the report from what
# exists, the failed stacks listed with their errors. Never raises (see report_incomplete_run).
onerror:
    report_incomplete_run(
        metrics=rules.report.input.metrics,
        images=rules.report.input.images,
        segmentations=rules.report.input.labels,
        model_dir=Path(rules.report.input.model[0]).parent,
        output_path=rules.report.output.html,
        summary_path=rules.report.output.summary,
        record_path=INCOMPLETE_RUNS,
        config=rules.report.params.config,
        roles=rules.report.params.roles,
        skipped=SKIPPED,
        logs_dir=rules.report.params.logs_dir,
        benchmarks_dir=rules.report.params.benchmarks_dir,
        source_dir=workflow.basedir,
        snakemake_logs=log,
        ablation=ABLATION[0] if ABLATION else None,
    )
