# Sample sheet, config validation and input functions shared by all rules.
import re
from pathlib import Path

from snakemake.utils import validate

from unet_core.demo import DEMO_STACKS
from unet_core.samples import discover_stacks, merge_stacks, read_sample_sheet

validate(config, schema="../schemas/config.schema.yaml")


def _apply_preset(config):
    """Merge config["presets"][config["preset"]] over the model and train sections."""
    name = config.get("preset")
    if not name:
        return
    presets = config.get("presets", {})
    if name not in presets:
        raise ValueError(
            f"config: preset {name!r} is not defined; known presets: {sorted(presets)}"
        )
    for section, values in presets[name].items():
        config[section] = {**config.get(section, {}), **values}


_apply_preset(config)
validate(config, schema="../schemas/config.schema.yaml")


def _read_samples():
    """The batch: the sample sheet's rows, then stacks discovered in the raw folder."""
    sheet = read_sample_sheet(config["samples"])
    discover = config["discover"]
    found = []
    if discover["folder"]:
        found = discover_stacks(
            discover["folder"],
            discover["pattern"],
            labels_suffix=discover["labels_suffix"],
            min_age_s=60 * discover["min_age_minutes"],
        )
    stacks = merge_stacks(sheet, found)
    for row in stacks.values():
        validate(row, schema="../schemas/samples.schema.yaml")
    return stacks


SAMPLES = _read_samples()
MODEL = config["model_name"]
TRAIN = [s for s, row in SAMPLES.items() if row["role"] == "train"]
VAL = [s for s, row in SAMPLES.items() if row["role"] == "val"]
PREDICT = [s for s, row in SAMPLES.items() if row["role"] in ("val", "predict")]
LABELLED = [s for s, row in SAMPLES.items() if row.get("labels")]

if not TRAIN:
    raise ValueError(f"{config['samples']}: no stack has role 'train'")
for stack in TRAIN + VAL:
    if stack not in LABELLED:
        raise ValueError(
            f"{config['samples']}: stack {stack!r} has role {SAMPLES[stack]['role']!r} but no labels"
        )


wildcard_constraints:
    stack="|".join(map(re.escape, SAMPLES)) if SAMPLES else "^$",
    model=re.escape(MODEL),


def ingest_inputs(wildcards):
    row = SAMPLES[wildcards.stack]
    inputs = {"image": row["path"]}
    if row.get("labels"):
        inputs["labels"] = row["labels"]
    return inputs


def stack_axes(wildcards):
    return SAMPLES[wildcards.stack].get("axes") or None


def stack_subset(wildcards):
    return SAMPLES[wildcards.stack].get("subset") or None


def zarr_of(stacks):
    return expand(rules.ingest.output.zarr, stack=stacks)


def weights_of(stacks):
    return expand(rules.weight_map.output.weights, stack=stacks)


def stack_role(wildcards):
    return SAMPLES[wildcards.stack]["role"]


def demo_files():
    outdir = Path(config["demo"]["outdir"])
    files = []
    for name, (_kind, _shape, has_truth) in DEMO_STACKS.items():
        files.append(outdir / f"{name}.tif")
        if has_truth:
            files.append(outdir / f"{name}_labels.tif")
    return [str(f) for f in files]


def demo_outdir(wildcards, output):
    return str(Path(output[0]).parent)


def _ablation_table():
    """The measured ablation table the report shows (config report.ablation): a path inside
    the workflow's folder, or none."""
    if not config["report"]["ablation"]:
        return []
    folder = Path(workflow.basedir).resolve()
    path = (folder / config["report"]["ablation"]).resolve()
    if not path.is_relative_to(folder):
        raise ValueError(
            f"config report.ablation {config['report']['ablation']!r} leads outside the workflow folder {folder}"
        )
    return [str(path)]


ABLATION = _ablation_table()
