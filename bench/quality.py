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
- ``nuclei``: touching, dim and crowded fluorescence nuclei (``unet_core.demo.synthetic_nuclei``:
  clusters that touch with no background between them, a 20x brightness range, a textured
  background), ``config/nuclei.yaml``, trained on frames 0-2 and scored on frames 3-9 (CTC SEG,
  AP@0.5, merges, splits, missed, spurious objects, recall of the dim nuclei). ``nuclei-old`` is
  what ``labels: instances`` did before (touching instances kept touching in the targets,
  z-score per stack, threshold + components), ``nuclei-new`` the config as shipped; each model
  is also segmented with the other method, so targets and post-processing are read apart.
  About 15 minutes per recipe.

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
    # Touching/dim/crowded synthetic nuclei: what `labels: instances` did before, and the config as shipped.
    "nuclei-old": ("nuclei.yaml", {"samples": "config/nuclei_bench_samples.tsv",
                                   "normalize": {"method": "zscore", "scope": "stack"},
                                   "weight_map": {"separate_touching": False},
                                   "segment": {"method": "components", "threshold": 0.5,
                                               "min_relative_size": 0.0}}, "nuclei"),
    "nuclei-new": ("nuclei.yaml", {"samples": "config/nuclei_bench_samples.tsv"}, "nuclei"),
}
# The synthetic nuclei stack: frames, height, width, seed; train on frames 0-2, score the rest.
NUCLEI_STACK = ((10, 320, 320), 7)
NUCLEI_TRAIN_FRAMES = 3
# Nuclei this much dimmer than the brightest count as dim (the 20x range is log-uniform).
DIM = 0.2
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
    if RECIPES[recipe][2] == "nuclei":
        _nuclei_sheet(workdir, run / "config" / "nuclei_bench_samples.tsv")
    if extra is not None:
        (run / "recipe.json").write_text(json.dumps(extra))
    return run


def _nuclei_data(workdir: Path) -> tuple[Path, Path, Path]:
    """The synthetic nuclei stack, its labels and the nuclei's brightness (written once)."""
    import numpy as np
    import tifffile

    from unet_core.demo import synthetic_nuclei

    folder = workdir / "nuclei-data"
    paths = folder / "nuclei.tif", folder / "nuclei_labels.tif", folder / "brightness.json"
    if not all(p.exists() for p in paths):
        folder.mkdir(parents=True, exist_ok=True)
        shape, seed = NUCLEI_STACK
        image, labels, brightness = synthetic_nuclei(shape, seed=seed)
        tifffile.imwrite(paths[0], image, imagej=True, metadata={"axes": "TYX"})
        tifffile.imwrite(paths[1], labels.astype(np.uint16), imagej=True, metadata={"axes": "TYX"})
        paths[2].write_text(json.dumps([float(b) for b in brightness]))
    return paths


def _nuclei_sheet(workdir: Path, sheet: Path) -> None:
    image, labels, _ = _nuclei_data(workdir)
    rows = [f"nuclei_train\t{image}\t{labels}\ttrain\ttyx\tt=0:{NUCLEI_TRAIN_FRAMES}",
            f"nuclei_val\t{image}\t{labels}\tval\ttyx\tt={NUCLEI_TRAIN_FRAMES}:"]
    text = "stack\tpath\tlabels\trole\taxes\tsubset\n" + "\n".join(rows) + "\n"
    if not sheet.exists() or sheet.read_text() != text:
        sheet.write_text(text)


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
        probs = out / "probabilities.ome.zarr"
        predict_image(run / "results" / "models" / "isbi2012" / "model.pt", image, probs, tta=True, planewise=True,
                      dtype="float32")
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


def _nuclei_scores(run: Path, method: str, workdir: Path) -> dict:
    """Held-out scores of the run's probabilities segmented with ``method``: interior_watershed as
    config/nuclei.yaml sets it, components as before (threshold 0.5, no relative size filter)."""
    import numpy as np

    from unet_core import io as unet_io
    from unet_core.metrics import average_precision, merges_and_splits, seg_score
    from unet_core.segment import segment_image

    import yaml

    probs = run / "results" / "predictions" / "nuclei_val.ome.zarr"
    shipped = yaml.safe_load((run / "config" / "nuclei.yaml").read_text())["segment"]
    settings = {k: v for k, v in shipped.items() if k != "method"}
    if method == "components":  # what it was before: threshold 0.5, no relative size filter
        settings.update(threshold=0.5, min_relative_size=0.0)
    out = run / "cross" / f"{method}.ome.zarr"
    if not out.exists():
        segment_image(probs, out, method=method, **settings)
    truth = np.asarray(unet_io.read_labels(run / "results" / "zarr" / "nuclei_val.ome.zarr").array)
    pred = np.asarray(unet_io.open_image(out).array)
    truth_frames, pred_frames = list(truth.reshape(-1, *truth.shape[-2:])), list(pred.reshape(-1, *pred.shape[-2:]))
    brightness = np.asarray(json.loads(_nuclei_data(workdir)[2].read_text()))
    dim_found = dim_total = 0
    for t, p in zip(truth_frames, pred_frames):
        ids = np.unique(t[t > 0])
        for i in ids[brightness[ids - 1] < DIM]:
            inside = t == i
            dim_total += 1
            hits = np.bincount(p[inside])
            hits[0] = 0
            dim_found += int(2 * hits.max() > inside.sum())  # SEG's match: more than half covered
    return {"seg": seg_score(truth_frames, pred_frames),
            "ap50": average_precision(truth_frames, pred_frames, thresholds=[0.5])["ap"][0],
            "dim_recall": dim_found / dim_total if dim_total else float("nan"),
            **merges_and_splits(truth_frames, pred_frames)}


def _nuclei_table(workdir: Path) -> None:
    rows = {}
    for recipe in ("nuclei-old", "nuclei-new"):
        run = workdir / recipe
        if not (run / "results" / "predictions" / "nuclei_val.ome.zarr").exists():
            print(f"{recipe}: not run")
            continue
        card = _card(run, "nuclei")
        for method in ("components", "interior_watershed"):
            rows[(recipe, method)] = {**_nuclei_scores(run, method, workdir), "seconds": card["training_seconds"],
                                      "steps": card["settings"]["steps"]}
    if not rows:
        return
    shape, seed = NUCLEI_STACK
    print(f"\nSynthetic touching/dim nuclei ({shape[1]}x{shape[2]}, seed {seed}), trained on frames "
          f"0-{NUCLEI_TRAIN_FRAMES - 1}, scored on frames {NUCLEI_TRAIN_FRAMES}-{shape[0] - 1}")
    header = ("SEG", "AP@0.5", "merges", "in merges", "splits", "missed", "spurious", "dim recall")
    print(f"{'targets / segmentation':44s}" + "".join(f"{h:>10s}" for h in header))
    for (recipe, method), m in rows.items():
        name = f"{'old targets, z-score' if recipe == 'nuclei-old' else 'separated, percentile'} / {method}"
        print(f"{name:44s}{m['seg']:10.3f}{m['ap50']:10.3f}{m['merges']:10d}{m['merged_true']:10d}{m['splits']:10d}"
              f"{m['missed']:10d}{m['spurious']:10d}{m['dim_recall']:10.3f}")
    old, new = rows.get(("nuclei-old", "components")), rows.get(("nuclei-new", "interior_watershed"))
    if old and new:
        print(f"new / old: SEG {new['seg'] / old['seg']:.3f}, AP@0.5 {new['ap50'] / old['ap50']:.3f}, merges "
              f"{old['merges']} -> {new['merges']} (down {old['merges'] / max(new['merges'], 1):.1f}x)")


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
    parser.add_argument("--only", default="isbi,cells3d,nuclei",
                        help=f"comma-separated data sets (isbi, cells3d, nuclei) or recipes ({', '.join(RECIPES)})")
    parser.add_argument("--workdir", type=Path, default=ROOT / "results" / "quality")
    parser.add_argument("--ablation-json", type=Path, default=None,
                        help="write the ISBI ablation table here (default <workdir>/isbi2012_ablation.json)")
    parser.add_argument("--repeat", action="store_true", help="train a second time with the same seed and compare")
    parser.add_argument("--no-run", action="store_true", help="only print the tables of the runs that exist")
    args = parser.parse_args()
    chosen = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = chosen - {"isbi", "cells3d", "nuclei"} - set(RECIPES)
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
    if "nuclei" in sets:
        _nuclei_table(workdir)


if __name__ == "__main__":
    main()
