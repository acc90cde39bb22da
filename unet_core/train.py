"""Training loop: random mirrored tiles, paper augmentation, weighted loss, checkpoints.

Axis order: samples are numpy ``(C, *spatial)`` images with ``(*spatial)`` targets and
weights; batches are torch ``(N, C, *spatial)``.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from . import io
from .augment import augment_sample
from .loss import weighted_cross_entropy
from .model import UNet
from .predict import predict_tiled
from .tiling import read_reflected

__all__ = ["TrainSettings", "train", "load_training_stack"]


@dataclass(frozen=True)
class TrainSettings:
    """Parameters of one training run (the ``model`` and ``train`` sections of the config)."""

    base_channels: int = 16
    depth: int = 3
    ndim: int = 2
    dropout: float = 0.2
    batch_norm: bool = False
    n_classes: int = 2
    tile: int = 92
    batch_size: int = 4
    steps: int = 300
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.99
    seed: int = 0
    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    flip_rotate: bool = True
    gray_strength: float = 0.1
    validate_every: int = 100
    log_every: int = 10

    @classmethod
    def from_config(cls, model: dict, train: dict) -> TrainSettings:
        """Build from the validated config sections; unknown keys are an error."""
        names = {f for f in cls.__dataclass_fields__}
        merged = {**model, **train}
        unknown = set(merged) - names
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; allowed: {sorted(names)}")
        settings = cls(**merged)
        if settings.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {settings.optimizer!r}")
        return settings


@dataclass
class _Stack:
    name: str
    planes: list[np.ndarray]  # (C, *spatial) normalised float32
    targets: list[np.ndarray]
    weights: list[np.ndarray]
    sha256: str = ""
    extra: dict = field(default_factory=dict)


def load_training_stack(image_path: str | Path, weights_path: str | Path, ndim: int) -> _Stack:
    """Load a (small, annotated) training stack in memory, normalised by its own statistics."""
    image = io.open_image(image_path)
    try:
        group = zarr.open_group(weights_path, mode="r")
        target, weight = group["target"], group["weight"]
        axes = group.attrs["axes"]
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        raise ValueError(f"{weights_path}: not a weight-map group with 'target' and 'weight' ({error!r})") from error
    expected = tuple(s for a, s in zip(image.axes, image.shape) if a != "c")
    if tuple(target.shape) != expected or tuple(weight.shape) != expected:
        raise ValueError(f"{weights_path}: weight map shape {tuple(weight.shape)} does not match the image "
                         f"{image_path} {expected}")
    spatial = "yx" if ndim == 2 else "zyx"
    mean, std = io.intensity_statistics(image)
    mean = np.asarray(mean, np.float32).reshape(-1, *[1] * ndim)
    std = np.asarray(std, np.float32).reshape(-1, *[1] * ndim)
    loop_axes = [a for a in axes if a not in spatial]
    import itertools
    stack = _Stack(name=Path(image_path).name, planes=[], targets=[], weights=[],
                   sha256=image.attrs.get("unet_core", {}).get("provenance", {}).get("sha256", ""))
    for position in itertools.product(*[range(target.shape[axes.index(a)]) for a in loop_axes]):
        where = dict(zip(loop_axes, position))
        index = tuple(where[a] if a in where else slice(None) for a in axes)
        plane = image.read(where, order=("c", *spatial)).astype(np.float32)
        stack.planes.append((plane - mean) / std)
        stack.targets.append(np.asarray(target[index]).astype(np.int64))
        stack.weights.append(np.asarray(weight[index]).astype(np.float32))
    return stack


class _Sampler:
    """Random tiles of a valid input size, mirrored at stack borders, targets cropped."""

    def __init__(self, stacks: list[_Stack], model: UNet, settings: TrainSettings, rng: np.random.Generator):
        self.items = [(s, i) for s in stacks for i in range(len(s.planes))]
        self.model = model
        self.settings = settings
        self.rng = rng
        self.out = (settings.tile,) * settings.ndim
        self.inp = model.input_shape_for(self.out)
        self.margin = model.margin()

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stack, index = self.items[int(self.rng.integers(len(self.items)))]
        plane = stack.planes[index]
        spatial = plane.shape[1:]
        origin = [int(self.rng.integers(0, max(s - o, 0) + 1)) for s, o in zip(spatial, self.out)]
        start = [o - self.margin for o in origin]
        stop = [a + i for a, i in zip(start, self.inp)]
        image = read_reflected(plane, start, stop)
        target = read_reflected(stack.targets[index], start, stop)
        weight = read_reflected(stack.weights[index], start, stop)
        s = self.settings
        image, target, weight = augment_sample(image, target, weight, rng=self.rng, elastic_sigma=s.elastic_sigma,
                                               elastic_grid=s.elastic_grid, flip_rotate=s.flip_rotate,
                                               gray_strength=s.gray_strength)
        crop = tuple(slice(self.margin, self.margin + o) for o in self.out)
        return image, target[crop], weight[crop]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        samples = [self.sample() for _ in range(size)]
        return tuple(torch.from_numpy(np.stack(parts)) for parts in zip(*samples))  # type: ignore[return-value]


def _validate(model: UNet, stacks: list[_Stack], device: torch.device) -> dict:
    """Held-out loss and foreground IoU, whole planes predicted by overlap-tile."""
    if not stacks:
        return {}
    losses, intersection, union = [], 0, 0
    was_training = model.training
    for stack in stacks:
        for plane, target, weight in zip(stack.planes, stack.targets, stack.weights):
            probs = predict_tiled(model, plane, device=device)
            p = torch.from_numpy(probs).clamp_min(1e-7)
            nll = torch.nn.functional.nll_loss(p.log()[None], torch.from_numpy(target)[None], reduction="none")
            losses.append(float((nll[0] * torch.from_numpy(weight)).mean()))
            pred = probs[1] > 0.5
            truth = target > 0
            intersection += int((pred & truth).sum())
            union += int((pred | truth).sum())
    model.train(was_training)
    return {"val_loss": float(np.mean(losses)), "val_iou": intersection / union if union else 1.0}


def train(*, train_images: list[str], train_weights: list[str], val_images: list[str] = (),
          val_weights: list[str] = (), out_dir: str | Path, settings: TrainSettings,
          device: str | None = None) -> Path:
    """Train a U-Net on ingested stacks and their weight maps; write model.pt, log and card.

    Outputs in ``out_dir``: ``model.pt`` (state dict + architecture, loadable with
    ``torch.load(weights_only=True)``), ``training_log.tsv`` and ``model_card.json``.
    """
    if len(train_images) != len(train_weights) or not train_images:
        raise ValueError(f"need one weight map per training image and at least one image, got "
                         f"{len(train_images)} images and {len(train_weights)} weight maps")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    stacks = [load_training_stack(i, w, settings.ndim) for i, w in zip(train_images, train_weights)]
    val_stacks = [load_training_stack(i, w, settings.ndim) for i, w in zip(val_images, val_weights)]
    in_channels = stacks[0].planes[0].shape[0]
    model = UNet(in_channels=in_channels, n_classes=settings.n_classes, base_channels=settings.base_channels,
                 depth=settings.depth, ndim=settings.ndim, dropout=settings.dropout,
                 batch_norm=settings.batch_norm).to(device)
    memory_format = torch.channels_last if settings.ndim == 2 else torch.channels_last_3d
    model = model.to(memory_format=memory_format)
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=settings.momentum)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate,
                                                    total_steps=settings.steps, pct_start=0.15)
    sampler = _Sampler(stacks, model, settings, rng)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_rows: list[dict] = []
    started = time.perf_counter()
    model.train()
    progress = tqdm(range(1, settings.steps + 1), desc="train", unit="step")
    running = []
    for step in progress:
        image, target, weight = sampler.batch(settings.batch_size)
        image = image.to(device).contiguous(memory_format=memory_format)
        logits = model(image)
        loss = weighted_cross_entropy(logits, target.to(device), weight.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        if step % settings.log_every == 0 or step == settings.steps:
            row = {"step": step, "loss": float(np.mean(running)), "lr": scheduler.get_last_lr()[0],
                   "seconds": round(time.perf_counter() - started, 2)}
            running = []
            if val_stacks and (step % settings.validate_every == 0 or step == settings.steps):
                model.eval()
                row.update(_validate(model, val_stacks, device))
                model.train()
            log_rows.append(row)
            progress.set_postfix(loss=f"{row['loss']:.4f}")
    model.eval()
    _write_log(out_dir / "training_log.tsv", log_rows)
    checkpoint = {"model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  "architecture": model.config(), "normalization": "zscore-per-stack",
                  "tile": settings.tile, "step": settings.steps}
    torch.save(checkpoint, out_dir / "model.pt")
    card = {
        "architecture": model.config(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": asdict(settings),
        "training_data": [{"stack": s.name, "sha256": s.sha256} for s in stacks],
        "validation_data": [{"stack": s.name, "sha256": s.sha256} for s in val_stacks],
        "final_metrics": {k: v for k, v in log_rows[-1].items() if k.startswith("val_") or k == "loss"},
        "training_seconds": round(time.perf_counter() - started, 1),
        "device": str(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=2))
    return out_dir


def _write_log(path: Path, rows: list[dict]) -> None:
    columns = sorted({k for row in rows for k in row}, key=lambda k: ["step", "loss", "lr", "seconds"].index(k)
                     if k in ("step", "loss", "lr", "seconds") else 10)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", restval="")
        writer.writeheader()
        writer.writerows(rows)
