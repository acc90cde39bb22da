"""Benchmark: segmentation quality on real data, each figure next to a baseline of the same run.

Runs the real workflow (Snakemake, local profile) in its own working directory per recipe and
prints the tables of README "Quality on real data":

- ``isbi``: ISBI 2012, cpu preset, train on slices 0-19, score slices 20-29 with the faithful
  ISBI metrics; the same model again with 8-fold test-time augmentation (TTA), and the paper's
  two ablations in the same budget: no border weight map (w0 = 0) and no elastic deformation,
  and the full recipe with a second seed (the spread by chance, against which the ablations
  are read). Baseline: the full recipe without TTA. About 21 minutes per recipe on 2 cores.
- ``cells3d``: the 3D U-Net on the cells3d tissue patch (train x < 100, score x >= 100).
  Baselines: the seeded watershed of the smoothed stain (instances) and the raw stain (boundary
  average precision), both computed in the same run. About 21 minutes.

A recipe whose results exist is not run again (Snakemake finds nothing to do), so the tables
can be printed again at no cost. ``--repeat`` trains the chosen data sets a second time with
the same seed in ``<recipe>-repeat`` and prints how far the weights and the scores moved.
The ISBI ablation table is written as JSON (``--ablation-json``) for the HTML report
(config ``report.ablation``; the measured table of the repository is
``docs/quality/isbi2012_ablation.json``).

Usage: python bench/quality.py [--only isbi,cells3d|RECIPE,...] [--workdir results/quality] [--repeat]
                               [--ablation-json PATH] [--no-run]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# The ISBI recipes predict without TTA (the config's default is with it): the ablations are read
# without it, and the full recipe's TTA figures are computed from its model (_tta).
_NO_TTA = {"predict": {"tta": False}}
# recipe -> (config file, extra config or None, data set)
RECIPES = {
    "isbi-full": ("isbi2012.yaml", _NO_TTA, "isbi"),
    "isbi-no-weight-map": ("isbi2012.yaml", {**_NO_TTA, "weight_map": {"w0": 0.0}}, "isbi"),
    "isbi-no-elastic": ("isbi2012.yaml", {**_NO_TTA, "train": {"elastic_sigma": 0.0}}, "isbi"),
    # The full recipe with another seed: how far the score moves by chance alone.
    "isbi-full-seed1": ("isbi2012.yaml", {**_NO_TTA, "train": {"seed": 1}}, "isbi"),
    "cells3d": ("cells3d.yaml", None, "cells3d"),
}
ABLATION_ROWS = (
    ("isbi-full", "full: border weight map (w0 = 10, sigma = 5) and elastic deformation"),
    ("isbi-no-weight-map", "no weight map (w0 = 0; class balance kept)"),
    ("isbi-no-elastic", "no elastic deformation (sigma = 0; flips, rotations, gray values kept)"),
    ("isbi-full-seed1", "full, another seed (1): the spread by chance"),
)
ISBI_COLUMNS = (("v_rand", "V_rand"), ("v_info", "V_info"), ("pixel_error", "pixel error"),
                ("warping_error", "warping error"))


def _prepare(workdir: Path, recipe: str) -> Path:
    """The recipe's working directory: the config folder, sample paths made absolute."""
    config_file, extra, _ = RECIPES[recipe]
    run = workdir / recipe
    (run / "config").mkdir(parents=True, exist_ok=True)
    for source in (ROOT / "config").iterdir():
        if source.suffix in (".yaml", ".tsv") and not source.name.endswith("_samples.tsv"):
            shutil.copy2(source, run / "config" / source.name)
    for sheet in (ROOT / "config").glob("*_samples.tsv"):
        with sheet.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        for row in rows:
            for key in ("path", "labels"):
                if row.get(key):
                    row[key] = str((ROOT / row[key]).resolve())
        target, text = run / "config" / sheet.name, io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = text.getvalue()
        # Unchanged sheets keep their mtime: nothing to rerun on a second call.
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    if extra is not None:
        (run / "recipe.json").write_text(json.dumps(extra))
    return run


def _snakemake(run: Path, recipe: str, *more: str) -> None:
    config_file, extra, _ = RECIPES[recipe]
    command = [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
               "--profile", str(ROOT / "profiles" / "local"),
               "--configfile", f"config/{config_file}", *(["recipe.json"] if extra is not None else []), *more]
    print(f"[{recipe}] in {run}: {' '.join(command)}", flush=True)
    with (run / "bench.log").open("a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=run)


def _tta(run: Path) -> Path:
    """Held-out ISBI metrics of the run's model with 8-fold TTA (written once, beside results/)."""
    from unet_core.evaluate import evaluate_stack
    from unet_core.predict import predict_image
    from unet_core.segment import segment_image

    out = run / "tta"
    metrics = out / "isbi_heldout.json"
    if not metrics.exists():
        image = run / "results" / "zarr" / "isbi_heldout.ome.zarr"
        probs = predict_image(run / "results" / "models" / "isbi2012" / "model.pt", image,
                              out / "probabilities.ome.zarr", tta=True, planewise=True, dtype="float32")
        # The ISBI scores are computed on the probabilities; the segmentation only feeds the QC part.
        seg = segment_image(probs, out / "segmentation.ome.zarr", threshold=0.5, min_size=10)
        evaluate_stack(image_path=image, probabilities_path=probs, segmentation_path=seg, output_path=metrics,
                       stack="isbi_heldout", role="val", ground_truth="binary")
    return metrics


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())["metrics"]


def _card(run: Path, model: str) -> dict:
    return json.loads((run / "results" / "models" / model / "model_card.json").read_text())


# Without a second seed, differences in V_rand below this are not read as effects (one run
# per recipe).
_NOISE = 0.01


def _reading(rows: dict[str, dict]) -> str:
    """What the ablation rows say about each idea, in words, from the numbers."""
    full = rows["isbi-full"]
    if "isbi-full-seed1" in rows:
        noise = abs(full["v_rand"] - rows["isbi-full-seed1"]["v_rand"])
        basis = (f"Seeds 0 and 1 of the full recipe differ by {noise:.3f} V_rand, so differences up to that size "
                 f"are chance")
    else:
        noise = _NOISE
        basis = (f"One run per recipe: the spread between seeds was not measured, so differences below {noise} "
                 f"V_rand are not read as effects")
    sentences = []
    for recipe, idea in (("isbi-no-weight-map", "the border weight map"), ("isbi-no-elastic", "elastic deformation")):
        if recipe not in rows:
            continue
        loss = full["v_rand"] - rows[recipe]["v_rand"]
        if loss > noise:
            sentences.append(f"{idea} helps: without it V_rand drops by {loss:.3f}")
        elif loss < -noise:
            sentences.append(f"{idea} does not help at this budget: without it V_rand is higher by {-loss:.3f}")
        else:
            sentences.append(f"{idea} brings no measurable gain at this budget: without it V_rand "
                             f"{'rises' if loss < 0 else 'drops'} by {abs(loss):.3f}")
    text = "; ".join(sentences)
    return f"{text[0].upper()}{text[1:]}. {basis}." if text else f"{basis}."


def _isbi_tables(workdir: Path, ablation_json: Path | None) -> None:
    runs = {r: workdir / r for r, _ in ABLATION_ROWS}
    full = _metrics(runs["isbi-full"] / "results" / "metrics" / "isbi_heldout.json")
    tta = _metrics(_tta(runs["isbi-full"]))
    print("\nISBI 2012, cpu preset, held-out slices 20-29 (faithful ISBI metrics)")
    print(f"{'':28s} {'V_rand':>8s} {'V_info':>8s} {'pixel err':>10s} {'warping':>9s}")
    for name, m in (("full, no TTA (baseline)", full), ("full, 8-fold TTA", tta)):
        print(f"{name:28s} {m['v_rand']:8.4f} {m['v_info']:8.4f} {m['pixel_error']:10.4f} {m['warping_error']:9.5f}")
    print(f"TTA / no TTA: V_rand {tta['v_rand'] / full['v_rand']:.4f}, V_info {tta['v_info'] / full['v_info']:.4f}, "
          f"pixel error {tta['pixel_error'] / full['pixel_error']:.3f}")
    rows = {}
    print("\nAblations (same steps, no TTA); ratio of V_rand to the full recipe's")
    for recipe, label in ABLATION_ROWS:
        path = runs[recipe] / "results" / "metrics" / "isbi_heldout.json"
        if not path.exists():
            print(f"{recipe:22s} not run")
            continue
        m, card = _metrics(path), _card(runs[recipe], "isbi2012")
        rows[recipe] = {"recipe": label, **{k: m[k] for k, _ in ISBI_COLUMNS}, "seed": card["settings"]["seed"],
                        "training_seconds": card["training_seconds"], "steps": card["settings"]["steps"]}
        print(f"{recipe:22s} V_rand {m['v_rand']:.4f} ({m['v_rand'] / full['v_rand']:.4f}) V_info {m['v_info']:.4f} "
              f"pixel error {m['pixel_error']:.4f} warping {m['warping_error']:.5f} "
              f"({card['settings']['steps']} steps, {card['training_seconds']:.0f} s)")
    if ablation_json is not None and all(r in rows for r, _ in ABLATION_ROWS[:3]):
        ablation_json.parent.mkdir(parents=True, exist_ok=True)
        ablation_json.write_text(json.dumps({
            "title": "ISBI 2012, cpu preset, same steps (and seed 0 but for the last row), held-out slices 20-29, "
                     "no test-time augmentation",
            "measured": f"{datetime.date.today().isoformat()} on {platform.node()} by bench/quality.py",
            "columns": [list(c) for c in ISBI_COLUMNS], "rows": list(rows.values()),
            "reading": _reading(rows),
        }, indent=2) + "\n")
        print(f"ablation table written to {ablation_json}")


def _cells3d_table(workdir: Path) -> None:
    run = workdir / "cells3d"
    m = _metrics(run / "results" / "metrics" / "cells_heldout.json")
    b = m["baseline"]
    card = _card(run, "cells3d")
    print(f"\ncells3d, held-out half x >= 100 ({card['settings']['steps']} steps, {card['training_seconds']:.0f} s "
          f"of training)")
    print(f"{'':34s} {'U-Net':>8s} {'baseline':>9s} {'ratio':>7s}")
    for key, label in (("adapted_rand_error", "adapted Rand error (lower better)"),
                       ("voi_split", "VOI split (lower better)"), ("voi_merge", "VOI merge (lower better)")):
        print(f"{label:34s} {m[key]:8.3f} {b[key]:9.3f} {m[key] / b[key]:7.3f}")
    print(f"{'boundary AP (map vs raw stain)':34s} {m['boundary_ap']:8.3f} {m['stain_boundary_ap']:9.3f} "
          f"{m['boundary_ap'] / m['stain_boundary_ap']:7.3f}")


def _repeat(workdir: Path, recipe: str, model: str, stack: str) -> None:
    """Train ``recipe`` again with the same seed and compare the weights and the scores."""
    from unet_core.train import weights_digest

    first, second = workdir / recipe, workdir / f"{recipe}-repeat"
    if not second.exists():
        shutil.copytree(first / "config", second / "config")
        if (first / "recipe.json").exists():
            shutil.copy2(first / "recipe.json", second)
    _snakemake(second, recipe)
    digests = [weights_digest(torch.load(r / "results" / "models" / model / "model.pt", weights_only=True)["model"])
               for r in (first, second)]
    a, b = (_metrics(r / "results" / "metrics" / f"{stack}.json") for r in (first, second))
    moved = {k: abs(a[k] - b[k]) for k in a if isinstance(a[k], float) and isinstance(b.get(k), float)}
    print(f"\n[{recipe}] same seed twice: weights {'bitwise equal' if digests[0] == digests[1] else 'differ'} "
          f"({digests[0][:12]} / {digests[1][:12]}); largest score difference "
          f"{max(moved.values()):.2e} ({max(moved, key=moved.get)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="isbi,cells3d",
                        help=f"comma-separated data sets (isbi, cells3d) or recipes ({', '.join(RECIPES)})")
    parser.add_argument("--workdir", type=Path, default=ROOT / "results" / "quality")
    parser.add_argument("--ablation-json", type=Path, default=None,
                        help="write the ISBI ablation table here (default <workdir>/isbi2012_ablation.json)")
    parser.add_argument("--repeat", action="store_true", help="train a second time with the same seed and compare")
    parser.add_argument("--no-run", action="store_true", help="only print the tables of the runs that exist")
    args = parser.parse_args()
    chosen = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = chosen - {"isbi", "cells3d"} - set(RECIPES)
    if unknown:
        parser.error(f"--only: unknown data sets or recipes {sorted(unknown)}")
    run = [r for r, (_, _, data) in RECIPES.items() if r in chosen or data in chosen]
    sets = {RECIPES[r][2] for r in run}
    workdir = args.workdir.resolve()
    for recipe in run:
        if not args.no_run:
            _snakemake(_prepare(workdir, recipe), recipe)
    print(f"\nmachine: {platform.node()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    if "isbi" in sets:
        _isbi_tables(workdir, args.ablation_json or workdir / "isbi2012_ablation.json")
        if args.repeat and not args.no_run:
            _repeat(workdir, "isbi-full", "isbi2012", "isbi_heldout")
    if "cells3d" in sets:
        _cells3d_table(workdir)
        if args.repeat and not args.no_run:
            _repeat(workdir, "cells3d", "cells3d", "cells_heldout")


if __name__ == "__main__":
    main()
