"""The ``unet-core`` command: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import yaml

from .defaults import choices, default
from .weights import LABEL_KINDS

__all__ = ["main"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


class _HelpFormatter(argparse.HelpFormatter):
    """An option's help ends with its default (the config schema's), unless that is None or False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _load_config(path: str) -> dict:
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"error: cannot read config {path}: {error}") from error
    if not isinstance(config, dict):
        raise SystemExit(f"error: config {path} must be a YAML mapping")
    return config


def _demo_data(args) -> None:
    from .demo import write_demo_data
    for path in write_demo_data(args.outdir, seed=args.seed):
        print(path)


def _ingest(args) -> None:
    from .ingest import ingest
    ingest(args.input, args.output, labels_path=args.labels, axes=args.axes, chunks=args.chunks,
           pyramid=not args.no_pyramid, subset=args.subset, format=args.format, shards=args.shards)


def _weight_map(args) -> None:
    from .prepare import prepare_targets
    prepare_targets(args.input, args.output, ndim=args.ndim, w0=args.w0, sigma=args.sigma, labels=args.labels,
                    separate_touching=not args.keep_touching)


def _train(args) -> None:
    from .train import TrainSettings, train
    config = _load_config(args.config)
    settings = TrainSettings.from_config(config.get("model", {}), config.get("train", {}), config.get("normalize"),
                                         config.get("weight_map"))
    train(train_images=args.images, train_weights=args.weights, val_images=args.val_images or [],
          val_weights=args.val_weights or [], out_dir=args.out, settings=settings, device=args.device)


def _predict(args) -> None:
    from .predict import predict_image
    slurm = _load_config(args.slurm) if args.slurm else None
    if slurm is not None and args.scheduler != "slurm":
        raise SystemExit("error: --slurm needs --scheduler slurm")
    summary = predict_image(args.model, args.input, args.output, block_shape=args.block, tile_shape=args.tile,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype, tta=args.tta,
                            planewise=args.planewise, scheduler=args.scheduler, slurm=slurm, precision=args.precision,
                            compile=args.compile)
    print(f"{args.output}: {summary['computed']} of {summary['blocks']} blocks computed, "
          f"{summary['reused']} reused from an interrupted run")


def _plan(args) -> None:
    from .plan import plan_prediction
    plan = plan_prediction(args.model, args.input, workers=args.workers, block_shape=args.block, tile_shape=args.tile,
                           batch_size=args.batch_size, device=args.device, dtype=args.dtype, tta=args.tta,
                           planewise=args.planewise, precision=args.precision, compile=args.compile)
    print(plan.text())


def _segment(args) -> None:
    from .segment import segment_image
    segment_image(args.input, args.output, threshold=args.threshold, min_size=args.min_size, method=args.method,
                  sigma=args.sigma, h=args.h, seed_threshold=args.seed_threshold,
                  min_relative_size=args.min_relative_size)


def _evaluate(args) -> None:
    from .evaluate import evaluate_stack
    evaluate_stack(image_path=args.image, probabilities_path=args.probabilities, segmentation_path=args.segmentation,
                   output_path=args.output, stack=args.stack or Path(args.image).name, role=args.role,
                   ground_truth=args.ground_truth)


def _export(args) -> None:
    from .export import export_bioimageio
    print(export_bioimageio(args.model, args.out, sample=args.sample, name=args.name,
                            authors=tuple(args.author or ("unet-pipeline",))))


def _report(args) -> None:
    from .report import write_report
    write_report(metrics=args.metrics, images=args.images, segmentations=args.segmentations, model_dir=args.model_dir,
                 output_path=args.output)


_DESCRIPTION = """\
One subcommand per pipeline stage, for running a stage by hand or outside Snakemake.
The nightly pipeline itself runs these stages as Snakemake rules (README: "Two commands").
Run 'unet-core COMMAND --help' for the options of one command."""

_EXIT_CODES = {"free": 0, "stale": 3, "held": 75}


def _snakemake_lock(args) -> int:
    from .snakemake_lock import lock_state
    state = lock_state(args.folder)
    print(f"{Path(args.folder).resolve()}: {state.describe()}")
    return _EXIT_CODES[state.status]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet-core", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_HelpFormatter))
    _stage_parsers(sub)
    _output_parsers(sub)
    p = sub.add_parser("snakemake-lock", help="is the folder's Snakemake lock held by a live run or stale? "
                       "(exit 0 free, 3 stale, 75 held; used by scripts/nightly.sh)")
    p.add_argument("folder", nargs="?", default=".", help="workflow folder (default: the current one)")
    p.set_defaults(func=_snakemake_lock)
    return parser


def _stage_parsers(sub) -> None:
    p = sub.add_parser("demo-data", help="write the synthetic demo stacks (TIFF) into OUTDIR")
    p.add_argument("outdir", help="folder for the TIFF stacks and their ground truth")
    p.add_argument("--seed", type=int, default=default("demo", "seed"), help="random seed of the synthetic data")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("ingest", help="TIFF stack -> OME-Zarr")
    p.add_argument("input", help="TIFF, OME-TIFF, ImageJ hyperstack or a folder of TIFF planes")
    p.add_argument("output", help="OME-Zarr image to write, e.g. results/ingest/STACK.ome.zarr")
    p.add_argument("--labels", help="instance ground truth TIFF of the same shape (without channels)")
    p.add_argument("--axes", help="axes override, e.g. 'tyx' or 'zcyx'")
    p.add_argument("--chunks", type=_ints, help="chunk shape, e.g. 1,512,512")
    p.add_argument("--subset", help="ingest only a range, e.g. z=0:20 (NGFF axis letters)")
    p.add_argument("--no-pyramid", action="store_true", help="write level 0 only (no viewing pyramid)")
    p.add_argument("--format", default=default("ingest", "format"), choices=choices("ingest", "format"),
                   help="ngff-0.4 (zarr v2) or ngff-0.5 (zarr v3, sharded)")
    p.add_argument("--shards", type=_ints, help="ngff-0.5: shard shape in NGFF order, multiples of the chunks "
                                                "(default: the blocks written at once)")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("weight-map", help="targets + paper weight maps from an ingested stack's ground truth")
    p.add_argument("input", help="ingested OME-Zarr image with labels/ground_truth")
    p.add_argument("output", help="weight-map group to write, e.g. results/weights/STACK.zarr")
    p.add_argument("--ndim", type=int, default=default("model", "ndim"), choices=choices("model", "ndim"),
                   help="2 (planes) or 3 (volumes); the model's dimensionality")
    p.add_argument("--w0", type=float, default=default("weight_map", "w0"), help="border weight w0 of the paper's eq. 2")
    p.add_argument("--sigma", type=float, default=default("weight_map", "sigma"),
                   help="border width sigma of eq. 2 in pixels")
    p.add_argument("--labels", default=default("weight_map", "labels"), choices=LABEL_KINDS,
                   help="instances (ids), binary (interior mask) or dense (ids with no background)")
    p.add_argument("--keep-touching", action="store_true",
                   help="instances: do not give touching instances a border (ablation)")
    p.set_defaults(func=_weight_map)

    p = sub.add_parser("train", help="train a U-Net")
    p.add_argument("--config", required=True,
                   help="YAML with 'model', 'train', 'normalize' and 'weight_map' sections (missing keys: defaults)")
    p.add_argument("--out", required=True, help="output folder, e.g. results/models/<name>/")
    p.add_argument("--images", nargs="+", required=True, help="ingested OME-Zarr training images")
    p.add_argument("--weights", nargs="+", help="weight-map groups (default: computed from the ground truth)")
    p.add_argument("--val-images", nargs="*", help="ingested OME-Zarr validation images")
    p.add_argument("--val-weights", nargs="*", help="weight-map groups of the validation images")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.set_defaults(func=_train)
    _predict_parsers(sub)
    _segment_parser(sub)


def _prediction_options(p) -> None:
    """The options predict and plan share (the config's predict section)."""
    p.add_argument("--model", required=True, help="model.pt written by train")
    p.add_argument("--tile", type=_ints, help="output tile shape (default: the fastest that fits the device)")
    p.add_argument("--block", type=_ints, help="block (= output chunk) shape, multiples of 2**depth")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=default("predict", "tta"),
                   help="average over flips/rotations (8x or 16x the work)")
    p.add_argument("--planewise", action=argparse.BooleanOptionalAction, default=default("predict", "planewise"),
                   help="allow a 2D model on a z stack, slice by slice")
    p.add_argument("--batch-size", type=int, default=default("predict", "batch_size"),
                   help="tiles per forward pass (default: as many as fit the memory budget on CUDA, one on a CPU)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--dtype", default=default("predict", "dtype"), choices=choices("predict", "dtype"),
                   help="stored probability type")
    p.add_argument("--precision", default=default("predict", "precision"), choices=choices("predict", "precision"),
                   help="arithmetic of the forward passes: auto = bf16 on a CUDA GPU that has it, else fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=default("predict", "compile"),
                   help="run the model through torch.compile (each tile shape compiles once)")


def _predict_parsers(sub) -> None:
    p = sub.add_parser("predict", help="OME-Zarr -> class probabilities (OME-Zarr)")
    p.add_argument("--input", required=True, help="ingested OME-Zarr image")
    p.add_argument("--output", required=True, help="probabilities OME-Zarr to write")
    _prediction_options(p)
    p.add_argument("--scheduler", default=default("predict", "scheduler"), choices=choices("predict", "scheduler"),
                   help="distributed: the Dask scheduler at DASK_SCHEDULER_ADDRESS; slurm: start Dask workers as "
                        "SLURM jobs for this run (dask-jobqueue), see --slurm")
    p.add_argument("--slurm", metavar="YAML", help="worker jobs of --scheduler slurm: a mapping of "
                   "unet_core.cluster.SlurmSettings fields (partition, gpus, cores, memory, minimum_workers, ...)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("plan", help="blocks, bytes and expected wall time of a prediction (calibrated here)")
    p.add_argument("--input", required=True, help="OME-Zarr image (only its metadata and a few blocks are read)")
    p.add_argument("--workers", type=int, default=1, help="workers (GPUs) the run will have")
    _prediction_options(p)
    p.set_defaults(func=_plan)


def _segment_parser(sub) -> None:
    p = sub.add_parser("segment", help="probabilities -> instance labels")
    p.add_argument("input", help="probabilities OME-Zarr written by predict")
    p.add_argument("output", help="labels OME-Zarr to write")
    p.add_argument("--method", default=default("segment", "method"), choices=choices("segment", "method"),
                   help="components (blockwise), interior_watershed (touching nuclei, blockwise) or watershed "
                        "(dense tissue)")
    p.add_argument("--threshold", type=float, default=default("segment", "threshold"),
                   help="foreground threshold (components, interior_watershed)")
    p.add_argument("--seed-threshold", type=float, default=default("segment", "seed_threshold"),
                   help="interior_watershed: probability above which a region seeds an object")
    p.add_argument("--min-size", type=int, default=default("segment", "min_size"), help="smallest kept object (px)")
    p.add_argument("--min-relative-size", type=float, default=default("segment", "min_relative_size"),
                   help="drop objects smaller than this fraction of the median training object (0 = off)")
    p.add_argument("--sigma", type=float, default=default("segment", "sigma"),
                   help="watershed, interior_watershed: smoothing of the map (px)")
    p.add_argument("--h", type=float, default=default("segment", "h"),
                   help="watershed, interior_watershed: depth of the extrema that seed objects")
    p.set_defaults(func=_segment)


def _output_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics and QC of one stack -> JSON")
    p.add_argument("--image", required=True, help="ingested OME-Zarr image (with labels/ground_truth if any)")
    p.add_argument("--probabilities", required=True, help="probabilities OME-Zarr written by predict")
    p.add_argument("--segmentation", required=True, help="labels OME-Zarr written by segment")
    p.add_argument("--output", required=True, help="metrics JSON to write")
    p.add_argument("--stack", help="stack name in the report (default: the image's file name)")
    p.add_argument("--role", default="predict", help="train, val or predict (default predict)")
    p.add_argument("--ground-truth", default=default("weight_map", "labels"), choices=LABEL_KINDS,
                   help="instances, binary (ISBI 2012) or dense (tissue)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("export", help="a trained model as a bioimage.io model package (ilastik, deepImageJ, "
                       "QuPath, napari, BiaPy)")
    p.add_argument("--model", required=True, help="model.pt written by train")
    p.add_argument("--format", default="bioimageio", choices=("bioimageio",), help="package format")
    p.add_argument("--out", required=True, help="package folder to write (its bioimageio.yaml is printed)")
    p.add_argument("--sample", help="an ingested OME-Zarr image: a crop becomes the test input and cover "
                                    "(default: smoothed noise)")
    p.add_argument("--name", help="the model's name in the package (default: 'U-Net <model folder>')")
    p.add_argument("--author", action="append", default=None, help="an author's name (repeatable; "
                                                                     "default: unet-pipeline)")
    p.set_defaults(func=_export)

    p = sub.add_parser("report", help="HTML QC report")
    p.add_argument("--metrics", nargs="+", required=True, help="metrics JSON files written by evaluate")
    p.add_argument("--images", nargs="+", required=True, help="the ingested images, in the same order")
    p.add_argument("--segmentations", nargs="+", required=True, help="the labels images, in the same order")
    p.add_argument("--model-dir", required=True, help="the model folder written by train")
    p.add_argument("--output", required=True, help="HTML file to write")
    p.set_defaults(func=_report)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .cluster import ClusterError
    from .train import TrainingInterrupted

    try:
        status = args.func(args)
    except TrainingInterrupted as stopped:
        print(f"unet-core {args.command}: {stopped}", file=sys.stderr)
        return 143
    except (ValueError, FileNotFoundError, ClusterError) as error:
        print(f"unet-core {args.command}: error: {error}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
