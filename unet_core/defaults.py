"""The configuration's defaults and choices, owned by one file.

``unet_core/schemas/config.schema.yaml`` is the JSON schema the workflow validates
``config/config.yaml`` against (Snakemake's ``validate`` fills in its defaults). The keyword
defaults of the package's functions and settings classes, and the ``unet-core`` command's
options, are read from the same file through this module, so that a default is written once.

Examples
--------
>>> default("segment", "min_size")
10
>>> choices("weight_map", "labels")
('instances', 'binary', 'dense')
>>> default("predict", "slurm", "partition")
'gpu'
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CONFIG_SCHEMA", "SAMPLES_SCHEMA", "config_schema", "samples_schema", "default", "choices", "section",
           "result_settings"]

CONFIG_SCHEMA = Path(__file__).with_name("schemas") / "config.schema.yaml"
SAMPLES_SCHEMA = Path(__file__).with_name("schemas") / "samples.schema.yaml"


@functools.cache
def _load(path: Path) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def config_schema() -> dict:
    """The config schema (parsed once per process; do not modify the returned mapping)."""
    return _load(CONFIG_SCHEMA)


@functools.cache
def samples_schema() -> dict:
    """The schema of one sample-sheet row; its ``labels_kind`` may be empty or one of the
    config's label kinds (one list, in the config schema)."""
    schema = dict(_load(SAMPLES_SCHEMA))
    properties = dict(schema["properties"])
    properties["labels_kind"] = {**properties["labels_kind"], "enum": ["", *choices("weight_map", "labels")]}
    return {**schema, "properties": properties}


def _entry(path: tuple[str, ...]) -> dict:
    schema = config_schema()
    node = schema
    for key in path:
        try:
            node = node["properties"][key]
        except KeyError:
            raise KeyError(f"{CONFIG_SCHEMA.name} has no setting {'.'.join(path)}") from None
    if "$ref" in node:  # only local definitions: "#/$defs/<name>"
        node = {**schema["$defs"][node["$ref"].removeprefix("#/$defs/")], **node}
    return node


def default(*path: str) -> Any:
    """The default of the setting at ``path`` (section, key[, subkey]), e.g. ``("train", "tile")``."""
    entry = _entry(path)
    if "default" not in entry:
        raise KeyError(f"{CONFIG_SCHEMA.name}: setting {'.'.join(path)} has no default")
    value = entry["default"]
    return list(value) if isinstance(value, list) else value


def choices(*path: str) -> tuple:
    """The allowed values of an enumerated setting, in the schema's order."""
    entry = _entry(path)
    if "enum" not in entry:
        raise KeyError(f"{CONFIG_SCHEMA.name}: setting {'.'.join(path)} is not an enumeration")
    return tuple(entry["enum"])


def section(*path: str) -> dict[str, Any]:
    """The defaults of every setting of a section that has one, e.g. ``section("train")``."""
    return {key: default(*path, key) for key, entry in _entry(path)["properties"].items() if "default" in entry}


def result_settings(config: dict) -> dict:
    """``config`` without the settings the schema marks ``x-execution-only`` (where and how the
    work runs: the sample sheet's path, discovery, the predict scheduler and its SLURM jobs).

    >>> result_settings({"samples": "s.tsv", "predict": {"tta": True, "scheduler": "slurm"}, "segment": {}})
    {'predict': {'tta': True}, 'segment': {}}
    """
    return _without_execution(config, config_schema())


def _without_execution(value, schema: dict):
    if not isinstance(value, dict):
        return value
    properties = schema.get("properties", {})
    return {key: _without_execution(item, properties.get(key, {})) for key, item in value.items()
            if not properties.get(key, {}).get("x-execution-only")}
