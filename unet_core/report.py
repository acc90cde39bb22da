"""Self-contained HTML QC report: batch table, overlays, training curves, provenance.

Everything that came from files or users (stack names, metadata, config) is escaped by
Jinja2's autoescape; images are inlined as base64 PNG.
"""

from __future__ import annotations

import base64
import csv
import datetime
import io as _io
import json
import os
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

from . import io  # noqa: E402

__all__ = ["write_report", "qc_flags"]

_UNCERTAIN_LIMIT = 0.15


def _png(figure) -> str:
    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _stack_figure(image_path: Path, segmentation_path: Path, metrics: dict) -> str:
    image = io.open_image(image_path)
    labels = io.open_image(segmentation_path)
    loop_axes = [a for a in labels.axes if a not in "yx"]
    where = {a: labels.shape[labels.axes.index(a)] // 2 for a in loop_axes}
    raw = image.read({**where, **({"c": 0} if "c" in image.axes else {})}, order=("y", "x")).astype(np.float32)
    seg = labels.read(where, order=("y", "x"))
    low, high = np.percentile(raw, [1, 99.5])
    raw = np.clip((raw - low) / max(high - low, 1e-6), 0, 1)
    overlay = np.stack([raw] * 3, axis=-1)
    overlay[find_boundaries(seg, mode="inner")] = (1.0, 0.2, 0.1)
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    axes[0].imshow(raw, cmap="gray")
    axes[0].set_title(f"raw ({', '.join(f'{a}={i}' for a, i in where.items())})")
    axes[1].imshow(overlay)
    axes[1].set_title("predicted cell boundaries")
    histogram = metrics["qc"]["probability_histogram"]
    axes[2].bar(np.linspace(0.025, 0.975, len(histogram)), histogram, width=0.05, color="#4a7ab5")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("foreground probability")
    axes[2].set_title("probability histogram")
    for ax in axes[:2]:
        ax.axis("off")
    return _png(figure)


def _training_figure(log_path: Path) -> str | None:
    if not log_path.exists():
        return None
    with open(log_path) as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    steps = [int(r["step"]) for r in rows]
    axes[0].plot(steps, [float(r["loss"]) for r in rows], label="training loss")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        axes[0].plot(*zip(*val), "o-", label="validation loss")
        axes[1].plot(*zip(*[(int(r["step"]), float(r["val_iou"])) for r in rows if r.get("val_iou")]), "o-")
        axes[1].set_ylabel("validation foreground IoU")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("step")
    axes[0].legend()
    return _png(figure)


def qc_flags(results: list[dict]) -> list[list[str]]:
    """QC flags per stack: many uncertain pixels, no objects, object count outlier in the batch."""
    counts = np.array([r["qc"]["mean_objects_per_plane"] for r in results], float)
    median = np.median(counts) if len(counts) else 0.0
    mad = np.median(np.abs(counts - median)) if len(counts) else 0.0
    flags = []
    for result, count in zip(results, counts):
        stack_flags = []
        if result["qc"]["uncertain_fraction"] > _UNCERTAIN_LIMIT:
            stack_flags.append(f"uncertain pixels {result['qc']['uncertain_fraction']:.0%}")
        if count == 0:
            stack_flags.append("no objects found")
        elif len(counts) >= 3 and mad > 0 and abs(count - median) / (1.4826 * mad) > 3.5:
            stack_flags.append("object count outlier in batch")
        flags.append(stack_flags)
    return flags


def write_report(*, metrics: list[str | Path], images: list[str | Path], segmentations: list[str | Path],
                 model_dir: str | Path, output_path: str | Path, config: dict | None = None,
                 title: str = "unet-pipeline") -> Path:
    """Render the HTML QC report for all evaluated stacks (lists are aligned per stack)."""
    results = [json.loads(Path(p).read_text()) for p in metrics]
    for result, flags, image, segmentation in zip(results, qc_flags(results), images, segmentations):
        result["flags"] = flags
        result["figure"] = _stack_figure(Path(image), Path(segmentation), result)
    model_dir = Path(model_dir)
    card_path = model_dir / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    held_out = [r["metrics"]["foreground_iou"] for r in results if r.get("metrics") and r["role"] != "train"]
    provenance = {
        "python": platform.python_version(), "platform": platform.platform(),
        "config": config or {}, "commit": os.environ.get("UNET_PIPELINE_COMMIT", "unknown"),
    }
    environment = Environment(loader=PackageLoader("unet_core", "templates"),
                              autoescape=select_autoescape(["html", "j2"]))
    html = environment.get_template("report.html.j2").render(
        title=title, generated=datetime.datetime.now().isoformat(timespec="seconds"), stacks=results,
        model_name=model_dir.name, training_plot=_training_figure(model_dir / "training_log.tsv"),
        model_card=json.dumps(card, indent=2), mean_iou=float(np.mean(held_out)) if held_out else None,
        provenance=json.dumps(provenance, indent=2, default=str),
    )
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.partial-{os.getpid()}")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, output_path)
    return output_path
