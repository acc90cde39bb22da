"""The ``unet-core`` command: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .weights import LABEL_KINDS

__all__ = ["main"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


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
           pyramid=not args.no_pyramid, subset=args.subset)


def _weight_map(args) -> None:
    from .prepare import prepare_targets
    prepare_targets(args.input, args.output, ndim=args.ndim, w0=args.w0, sigma=args.sigma, labels=args.labels,
                    separate_touching=not args.keep_touching)


def _train(args) -> None:
    from .train import TrainSettings, train
    config = _load_config(args.config)
    settings = TrainSettings.from_config(config.get("model", {}), config.get("train", {}), config.get("normalize"))
    train(train_images=args.images, train_weights=args.weights, val_images=args.val_images or [],
          val_weights=args.val_weights or [], out_dir=args.out, settings=settings, device=args.device)


def _predict(args) -> None:
    from .predict import predict_image
    slurm = _load_config(args.slurm) if args.slurm else None
    if slurm is not None and args.scheduler != "slurm":
        raise SystemExit("error: --slurm needs --scheduler slurm")
    summary = predict_image(args.model, args.input, args.output, block_shape=args.block, tile_shape=args.tile,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype, tta=args.tta,
                            planewise=args.planewise, scheduler=args.scheduler, slurm=slurm)
    print(f"{args.output}: {summary['computed']} of {summary['blocks']} blocks computed, "
          f"{summary['reused']} reused from an interrupted run")


def _plan(args) -> None:
    from .plan import plan_prediction
    plan = plan_prediction(args.model, args.input, workers=args.workers, block_shape=args.block, tile_shape=args.tile,
                           batch_size=args.batch_size, device=args.device, dtype=args.dtype, tta=args.tta,
                           planewise=not args.no_planewise)
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data (default 0)")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("ingest", help="TIFF stack -> OME-Zarr")
    p.add_argument("input", help="TIFF, OME-TIFF, ImageJ hyperstack or a folder of TIFF planes")
    p.add_argument("output", help="OME-Zarr image to write, e.g. results/ingest/STACK.ome.zarr")
    p.add_argument("--labels", help="instance ground truth TIFF of the same shape (without channels)")
    p.add_argument("--axes", help="axes override, e.g. 'tyx' or 'zcyx'")
    p.add_argument("--chunks", type=_ints, help="chunk shape, e.g. 1,512,512")
    p.add_argument("--subset", help="ingest only a range, e.g. z=0:20 (NGFF axis letters)")
    p.add_argument("--no-pyramid", action="store_true", help="write level 0 only (no viewing pyramid)")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("weight-map", help="targets + paper weight maps from an ingested stack's ground truth")
    p.add_argument("input", help="ingested OME-Zarr image with labels/ground_truth")
    p.add_argument("output", help="weight-map group to write, e.g. results/weights/STACK.zarr")
    p.add_argument("--ndim", type=int, default=2, help="2 (planes) or 3 (volumes); the model's dimensionality")
    p.add_argument("--w0", type=float, default=10.0, help="border weight w0 of the paper's eq. 2 (default 10)")
    p.add_argument("--sigma", type=float, default=5.0, help="border width sigma of eq. 2 in pixels (default 5)")
    p.add_argument("--labels", default="instances", choices=LABEL_KINDS,
                   help="instances (ids), binary (interior mask) or dense (ids with no background)")
    p.add_argument("--keep-touching", action="store_true",
                   help="instances: do not give touching instances a border (ablation)")
    p.set_defaults(func=_weight_map)

    p = sub.add_parser("train", help="train a U-Net")
    p.add_argument("--config", required=True, help="YAML with 'model', 'train' and 'normalize' sections")
    p.add_argument("--out", required=True, help="output folder, e.g. results/models/<name>/")
    p.add_argument("--images", nargs="+", required=True, help="ingested OME-Zarr training images")
    p.add_argument("--weights", nargs="+", help="weight-map groups (default: computed from the ground truth)")
    p.add_argument("--val-images", nargs="*", help="ingested OME-Zarr validation images")
    p.add_argument("--val-weights", nargs="*", help="weight-map groups of the validation images")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.set_defaults(func=_train)

    p = sub.add_parser("predict", help="OME-Zarr -> class probabilities (OME-Zarr)")
    p.add_argument("--model", required=True, help="model.pt written by train")
    p.add_argument("--input", required=True, help="ingested OME-Zarr image")
    p.add_argument("--output", required=True, help="probabilities OME-Zarr to write")
    p.add_argument("--tile", type=_ints, help="output tile shape")
    p.add_argument("--block", type=_ints, help="block (= output chunk) shape, multiples of 2**depth")
    p.add_argument("--tta", action="store_true", help="average over flips/rotations")
    p.add_argument("--planewise", action="store_true", help="allow a 2D model on a z stack, slice by slice")
    p.add_argument("--scheduler", default="threads",
                   choices=["synchronous", "threads", "processes", "distributed", "slurm"],
                   help="slurm: start Dask workers as SLURM jobs for this run (dask-jobqueue), see --slurm")
    p.add_argument("--slurm", metavar="YAML", help="worker jobs of --scheduler slurm: a mapping of "
                   "unet_core.cluster.SlurmSettings fields (partition, gpus, cores, memory, minimum_workers, ...)")
    p.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass (default 1)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "uint8"],
                   help="stored probability type (default float16)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("plan", help="blocks, bytes and expected wall time of a prediction (calibrated here)")
    p.add_argument("--input", required=True, help="OME-Zarr image (only its metadata and a few blocks are read)")
    p.add_argument("--model", required=True, help="model.pt written by train")
    p.add_argument("--workers", type=int, default=1, help="workers (GPUs) the run will have")
    p.add_argument("--tile", type=_ints, help="output tile shape")
    p.add_argument("--block", type=_ints, help="block (= output chunk) shape, multiples of 2**depth")
    p.add_argument("--tta", action="store_true", help="plan for test-time augmentation (8x or 16x the work)")
    p.add_argument("--no-planewise", action="store_true", help="refuse a 2D model on a z stack")
    p.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass (default 1)")
    p.add_argument("--device", help="device to calibrate on (default: CUDA when available)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "uint8"],
                   help="stored probability type (default float16)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("segment", help="probabilities -> instance labels")
    p.add_argument("input", help="probabilities OME-Zarr written by predict")
    p.add_argument("output", help="labels OME-Zarr to write")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground threshold (components, interior_watershed)")
    p.add_argument("--min-size", type=int, default=0, help="smallest kept object (px)")
    p.add_argument("--method", default="components", choices=["components", "interior_watershed", "watershed"],
                   help="components (blockwise), interior_watershed (touching nuclei, blockwise) or watershed "
                        "(dense tissue)")
    p.add_argument("--seed-threshold", type=float, default=0.8,
                   help="interior_watershed: probability above which a region seeds an object")
    p.add_argument("--min-relative-size", type=float, default=0.0,
                   help="drop objects smaller than this fraction of the median training object (0 = off)")
    p.add_argument("--sigma", type=float, default=1.0, help="watershed: smoothing of the boundary map (px)")
    p.add_argument("--h", type=float, default=0.1, help="watershed: depth of the minima that seed cells")
    p.set_defaults(func=_segment)


def _output_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics and QC of one stack -> JSON")
    p.add_argument("--image", required=True, help="ingested OME-Zarr image (with labels/ground_truth if any)")
    p.add_argument("--probabilities", required=True, help="probabilities OME-Zarr written by predict")
    p.add_argument("--segmentation", required=True, help="labels OME-Zarr written by segment")
    p.add_argument("--output", required=True, help="metrics JSON to write")
    p.add_argument("--stack", help="stack name in the report (default: the image's file name)")
    p.add_argument("--role", default="predict", help="train, val or predict (default predict)")
    p.add_argument("--ground-truth", default="instances", choices=LABEL_KINDS,
                   help="instances, binary (ISBI 2012) or dense (tissue)")
    p.set_defaults(func=_evaluate)

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
