import subprocess
import sys

import numpy as np
import tifffile

from unet_core.cli import build_parser, main
from unet_core.demo import DEMO_STACKS, synthetic_cells


def test_one_subcommand_per_stage():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo-data", "ingest", "weight-map", "train", "predict", "segment", "evaluate", "report"} <= set(commands)


def test_help_is_plain_text_and_every_option_is_explained():
    parser = build_parser()
    text = parser.format_help()
    assert "``" not in text and ":func:" not in text and "COMMAND --help" in text
    for name, command in parser._subparsers._group_actions[0].choices.items():
        assert "``" not in command.format_help(), name
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"unet-core {name}: {'/'.join(action.option_strings) or action.dest} has no help"


def test_snakemake_lock_command_exit_codes(tmp_path, capsys):
    assert main(["snakemake-lock", str(tmp_path)]) == 0
    (tmp_path / ".snakemake" / "locks").mkdir(parents=True)
    (tmp_path / ".snakemake" / "locks" / "0.output.lock").write_text("x\n")
    assert main(["snakemake-lock", str(tmp_path)]) == 3
    assert "stale Snakemake lock" in capsys.readouterr().out


def test_demo_data_is_deterministic_and_has_ground_truth(tmp_path):
    assert main(["demo-data", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main(["demo-data", str(tmp_path / "b"), "--seed", "3"]) == 0
    for name, (kind, shape, has_truth) in DEMO_STACKS.items():
        a = tifffile.imread(tmp_path / "a" / f"{name}.tif")
        np.testing.assert_array_equal(a, tifffile.imread(tmp_path / "b" / f"{name}.tif"))
        assert a.shape == shape
        assert (tmp_path / "a" / f"{name}_labels.tif").exists() == has_truth


def test_synthetic_cells_touch_and_are_separated():
    image, labels = synthetic_cells((2, 96, 96), seed=1)
    assert image.dtype == np.uint16 and labels.max() > 5
    # touching cells are separated by background: no two ids are 4-adjacent
    a, b = labels[:, :, :-1], labels[:, :, 1:]
    assert not np.any((a > 0) & (b > 0) & (a != b))


def test_errors_are_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("not a tiff")
    result = subprocess.run([sys.executable, "-m", "unet_core.cli", "ingest", str(bad), str(tmp_path / "o.ome.zarr")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "bad.tif" in result.stderr and "not a readable TIFF" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.ome.zarr").exists()
