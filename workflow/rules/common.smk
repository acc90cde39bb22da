# Sample sheet, config validation and input functions shared by all rules.
import re
import sys
from pathlib import Path

from snakemake.utils import validate

from unet_core.defaults import CONFIG_SCHEMA, samples_schema
from unet_core.demo import DEMO_STACKS
from unet_core.samples import check_row, discover, merge_stacks, read_sample_sheet

validate(config, schema=str(CONFIG_SCHEMA))


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
validate(config, schema=str(CONFIG_SCHEMA))
if (
    config["evaluate"].get("ground_truth", config["weight_map"]["labels"])
    != config["weight_map"]["labels"]
):
    raise ValueError(
        f"config: evaluate.ground_truth ({config['evaluate']['ground_truth']!r}) is replaced by "
        f"weight_map.labels ({config['weight_map']['labels']!r}), the kind of ground truth of every stack "
        f"whose sample-sheet column labels_kind is empty; set weight_map.labels (or labels_kind per "
        f"stack) and remove evaluate.ground_truth"
    )


def _read_samples():
    """The batch: the sample sheet's rows, then stacks discovered in the raw folder; and the
    discovered files that were skipped (listed in the report with the reason)."""
    schema = samples_schema()
    sheet = read_sample_sheet(config["samples"], schema)
    settings = config["discover"]
    found, skipped = [], []
    if settings["folder"]:
        found, skipped = discover(
            settings["folder"],
            settings["pattern"],
            labels_suffix=settings["labels_suffix"],
            min_age_s=60 * settings["min_age_minutes"],
        )
    for item in skipped:
        print(f"discover: skipped {item['path']}: {item['reason']}", file=sys.stderr)
    for row in found:
        check_row(row, schema, f"{row['path']} (discovered in {settings['folder']})")
    return merge_stacks(sheet, found), skipped


SAMPLES, SKIPPED = _read_samples()
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


def labels_kind(wildcards):
    """What the stack's ground truth holds: its sheet row's labels_kind, else weight_map.labels."""
    return SAMPLES[wildcards.stack].get("labels_kind") or config["weight_map"]["labels"]


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
