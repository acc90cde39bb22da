"""Defaults live once: the config schema. The stages' keyword defaults, the settings classes and
the command line all say what the schema says, and the workflow validates against the same file."""

import dataclasses
import inspect

import pytest
import yaml

from unet_core import defaults
from unet_core.cli import build_parser
from unet_core.cluster import SlurmSettings
from unet_core.evaluate import DEFAULT_BASELINE, evaluate_stack
from unet_core.normalize import Normalization
from unet_core.plan import plan_prediction
from unet_core.predict import predict_image
from unet_core.prepare import prepare_targets
from unet_core.samples import discover
from unet_core.segment import SEGMENT_METHODS, segment_image
from unet_core.train import TrainSettings
from unet_core.weights import LABEL_KINDS


def _keyword_defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


# (function, config section, {keyword: setting} where the names differ)
STAGES = [
    (segment_image, "segment", {}),
    (predict_image, "predict", {}),
    (plan_prediction, "predict", {}),
    (prepare_targets, "weight_map", {"ndim": ("model", "ndim")}),
]


@pytest.mark.parametrize("function, section, renamed", STAGES, ids=lambda v: getattr(v, "__name__", None))
def test_stage_keyword_defaults_are_the_schema_defaults(function, section, renamed):
    schema = defaults.section(section)
    checked = 0
    for name, value in _keyword_defaults(function).items():
        if name in renamed:
            assert value == defaults.default(*renamed[name]), name
            checked += 1
        elif name in schema and not isinstance(schema[name], dict):  # a subsection (slurm): None = its defaults
            assert value == schema[name], f"{function.__name__}({name}={value!r}) but the schema says {schema[name]!r}"
            checked += 1
    assert checked >= 2, f"{function.__name__} shares no setting with config section {section!r}"


def test_settings_classes_are_the_schema_defaults():
    train = TrainSettings()
    for section in ("model", "train"):
        for key, value in defaults.section(section).items():
            assert getattr(train, key) == value, f"TrainSettings.{key}"
    assert (train.w0, train.sigma) == (defaults.default("weight_map", "w0"), defaults.default("weight_map", "sigma"))
    assert dataclasses.asdict(Normalization()) == defaults.section("normalize")
    slurm = SlurmSettings()
    for key, value in defaults.section("predict", "slurm").items():
        assert getattr(slurm, key) == (tuple(value) if isinstance(value, list) else value), f"SlurmSettings.{key}"
    assert DEFAULT_BASELINE == defaults.section("evaluate", "baseline")
    assert _keyword_defaults(evaluate_stack)["ground_truth"] == defaults.default("weight_map", "labels")
    assert _keyword_defaults(discover)["min_age_s"] == 60 * defaults.default("discover", "min_age_minutes")


def test_train_settings_take_w0_and_sigma_from_the_weight_map_section():
    settings = TrainSettings.from_config({}, {"steps": 5}, None, {"w0": 20.0, "sigma": 3.0, "labels": "binary"})
    assert (settings.steps, settings.w0, settings.sigma) == (5, 20.0, 3.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainSettings.from_config({}, {"optimizer": "lbfgs"})


def _option_defaults(command: str, argv: list[str]) -> dict:
    return vars(build_parser().parse_args([command, *argv]))


def test_command_line_defaults_are_the_schema_defaults():
    segment = _option_defaults("segment", ["in", "out"])
    for key, value in defaults.section("segment").items():
        assert segment[key] == value, f"unet-core segment --{key.replace('_', '-')}"
    for command, argv in (("predict", ["--model", "m", "--input", "i", "--output", "o"]),
                          ("plan", ["--model", "m", "--input", "i"])):
        options = _option_defaults(command, argv)
        for key in ("tta", "planewise", "batch_size", "dtype", "precision") + (("scheduler",) if command == "predict" else ()):
            assert options[key] == defaults.default("predict", key), f"unet-core {command} --{key}"
    weight_map = _option_defaults("weight-map", ["in", "out"])
    assert (weight_map["w0"], weight_map["sigma"], weight_map["labels"]) == tuple(
        defaults.default("weight_map", k) for k in ("w0", "sigma", "labels"))
    assert _option_defaults("demo-data", ["d"])["seed"] == defaults.default("demo", "seed")
    ingest = _option_defaults("ingest", ["in", "out"])
    assert (ingest["format"], ingest["shards"]) == (defaults.default("ingest", "format"), None)


def test_the_command_line_help_shows_the_defaults():
    parser = build_parser()
    segment = parser._subparsers._group_actions[0].choices["segment"].format_help()  # noqa: SLF001
    assert f"(default: {defaults.default('segment', 'min_size')})" in segment


def test_one_list_of_each_choice():
    assert LABEL_KINDS == defaults.choices("weight_map", "labels") == defaults.choices("evaluate", "ground_truth")
    assert defaults.samples_schema()["properties"]["labels_kind"]["enum"] == ["", *LABEL_KINDS]
    assert SEGMENT_METHODS == defaults.choices("segment", "method")
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions}  # noqa: SLF001
    assert tuple(actions["scheduler"].choices) == defaults.choices("predict", "scheduler")
    assert tuple(actions["dtype"].choices) == defaults.choices("predict", "dtype")


def test_unknown_settings_are_named():
    with pytest.raises(KeyError, match="segment.min_sise"):
        defaults.default("segment", "min_sise")
    with pytest.raises(KeyError, match="has no default"):
        defaults.default("model_name")


def test_the_example_config_only_sets_known_settings_and_the_schema_is_valid_json_schema(repo):
    import jsonschema

    schema = defaults.config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    jsonschema.Draft202012Validator(schema).validate(config)


def test_result_settings_leave_out_only_where_and_how_the_work_runs():
    config = {"samples": "s.tsv", "model_name": "m", "discover": {"folder": "raw"},
              "predict": {"tta": True, "scheduler": "slurm", "slurm": {"gpus": 2}}, "segment": {"min_size": 3}}
    assert defaults.result_settings(config) == {"model_name": "m", "predict": {"tta": True},
                                                "segment": {"min_size": 3}}
