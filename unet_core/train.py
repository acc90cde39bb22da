"""Training loop: random mirrored tiles, paper augmentation, weighted loss, exact resume.

Axis order: samples are numpy ``(C, *spatial)`` images with ``(*spatial)`` targets and
weights; batches are torch ``(N, C, *spatial)``.

Every batch is a pure function of ``(seed, step)``: tile i of it is drawn from
``numpy.random.default_rng([seed, step, i])``. Batches can therefore be produced by any number
of parallel workers, in any order, and a run resumed at step k sees exactly the batches an
uninterrupted run would. Dropout draws from torch's global generator, whose state is part
of the checkpoint; the data loader gets its own generator so it never consumes it.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import platform
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from scipy import ndimage
from tqdm.auto import tqdm

from . import io
from .atomic import atomic_file, write_text
from .augment import AUGMENTATION_VERSION, augment_batch
from .checkpoint import read_or_set_aside, write_checkpoint
from .defaults import choices, section
from .loss import weighted_cross_entropy
from .model import UNet
from .normalize import Normalization, normalization_table
from .overlap_tile import memory_format as layout_of, predict_tiled
from .precision import autocast, needs_loss_scaling, training_precision
from .tiling import read_reflected
from .weights import cells_of, weight_map

__all__ = ["TrainSettings", "TrainingInterrupted", "train", "load_training_stack", "TileDataset", "weights_digest"]

CHECKPOINT = "checkpoint.pt"


class TrainingInterrupted(RuntimeError):
    """Raised after a checkpoint was written because SIGTERM/SIGUSR1 arrived (e.g. preemption)."""


_MODEL, _TRAIN, _WEIGHTS = section("model"), section("train"), section("weight_map")


@dataclass(frozen=True)
class TrainSettings:
    """Parameters of one training run: the config's ``model`` and ``train`` sections, and
    ``w0``/``sigma`` of its ``weight_map`` section (for weight maps computed at training).
    The defaults are the config schema's."""

    base_channels: int = _MODEL["base_channels"]
    depth: int = _MODEL["depth"]
    ndim: int = _MODEL["ndim"]
    dropout: float = _MODEL["dropout"]
    batch_norm: bool = _MODEL["batch_norm"]
    n_classes: int = _MODEL["n_classes"]
    tile: int = _TRAIN["tile"]
    batch_size: int = _TRAIN["batch_size"]
    steps: int = _TRAIN["steps"]
    learning_rate: float = _TRAIN["learning_rate"]
    optimizer: str = _TRAIN["optimizer"]
    momentum: float = _TRAIN["momentum"]
    schedule: str = _TRAIN["schedule"]
    grad_clip: float = _TRAIN["grad_clip"]
    seed: int = _TRAIN["seed"]
    elastic_sigma: float = _TRAIN["elastic_sigma"]
    elastic_grid: int = _TRAIN["elastic_grid"]
    flip_rotate: bool = _TRAIN["flip_rotate"]
    rotation: bool = _TRAIN["rotation"]
    gray_strength: float = _TRAIN["gray_strength"]
    w0: float = _WEIGHTS["w0"]
    sigma: float = _WEIGHTS["sigma"]
    validate_every: int = _TRAIN["validate_every"]
    log_every: int = _TRAIN["log_every"]
    checkpoint_every: int = _TRAIN["checkpoint_every"]
    num_workers: int = _TRAIN["num_workers"]
    deterministic: bool = _TRAIN["deterministic"]
    amp: bool = _TRAIN["amp"]
    # How raw intensities are normalised; recorded in the checkpoint, so prediction does the same.
    normalize: Normalization = Normalization()

    @classmethod
    def from_config(cls, model: dict, train: dict, normalize: dict | None = None,
                    weight_map: dict | None = None) -> TrainSettings:
        """Build from the validated config sections (of ``weight_map`` only w0 and sigma are
        read); unknown keys are an error."""
        names = set(cls.__dataclass_fields__) - {"normalize"}
        merged = {**model, **train}
        unknown = set(merged) - names
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; allowed: {sorted(names)}")
        merged.update({k: v for k, v in (weight_map or {}).items() if k in ("w0", "sigma")})
        settings = cls(**merged, normalize=Normalization.from_config(normalize))
        for key in ("optimizer", "schedule"):
            if getattr(settings, key) not in choices("train", key):
                raise ValueError(f"{key} must be one of {choices('train', key)}, got {getattr(settings, key)!r}")
        return settings


@dataclass
class _Stack:
    name: str
    planes: list[np.ndarray]  # (C, *spatial) normalised float32
    targets: list[np.ndarray]
    weights: list[np.ndarray]
    sha256: str = ""
    # How the targets were made: the weight-map group's settings (labels, w0, sigma), or
    # computed at training from instance ground truth with the training settings' w0 and sigma.
    targets_from: dict = field(default_factory=dict)


def _weight_group(weights_path, image_path, expected):
    try:
        group = zarr.open_group(weights_path, mode="r")
        target, weight, axes = group["target"], group["weight"], group.attrs["axes"]
        settings = {k: group.attrs[k] for k in ("labels", "separate_touching", "w0", "sigma") if k in group.attrs}
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        raise ValueError(f"{weights_path}: not a weight-map group with 'target' and 'weight' ({error!r})") from error
    if tuple(target.shape) != expected or tuple(weight.shape) != expected:
        raise ValueError(f"{weights_path}: weight map shape {tuple(weight.shape)} does not match the image "
                         f"{image_path} {expected}")
    return target, weight, axes, settings


def load_training_stack(image_path: str | Path, weights_path: str | Path | None, ndim: int, *,
                        w0: float = _WEIGHTS["w0"], sigma: float = _WEIGHTS["sigma"],
                        normalization: Normalization = Normalization()) -> _Stack:
    """Load an annotated training stack in memory, normalised as ``normalization`` says.

    Annotated training sets are small (the paper trains on 30 images), so they are held in
    memory. Without ``weights_path`` (or when it does not exist) the targets and weight maps
    are computed here from the stack's ``labels/ground_truth``, never replaced by ones.
    """
    try:
        image = io.open_image(image_path)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"training stack {image_path}: {error}") from error
    expected = tuple(s for a, s in zip(image.axes, image.shape) if a != "c")
    spatial = "yx" if ndim == 2 else "zyx"
    if not set(spatial) <= set(image.axes):
        raise ValueError(f"training stack {image_path}: axes {image.axes!r} lack {spatial!r} for a {ndim}D model")
    if weights_path is not None and Path(weights_path).exists():
        target, weight, axes, targets_from = _weight_group(weights_path, image_path, expected)
        labels = None
    else:
        labels = io.read_labels(image_path)
        if labels is None:
            raise ValueError(f"training stack {image_path}: has no weight map and no ground truth to compute one")
        axes = labels.axes
        targets_from = {"labels": "instances", "w0": w0, "sigma": sigma, "computed": "at training"}
    loop_axes = [a for a in axes if a not in spatial]
    table = normalization_table(image, normalization, loop_axes)
    stack = _Stack(name=Path(image_path).name, planes=[], targets=[], weights=[],
                   sha256=image.attrs.get("unet_core", {}).get("provenance", {}).get("sha256", ""),
                   targets_from=targets_from)
    spacing = [image.scale.get(a, 1.0) for a in spatial] if ndim == 3 else None
    for position in itertools.product(*[range(expected[axes.index(a)]) for a in loop_axes]):
        where = dict(zip(loop_axes, position))
        plane = image.read(where, order=("c", *spatial)).astype(np.float32)
        stack.planes.append(table.apply(plane, where))
        if labels is None:
            index = tuple(where[a] if a in where else slice(None) for a in axes)
            stack.targets.append(np.asarray(target[index]).astype(np.int64))
            stack.weights.append(np.asarray(weight[index]).astype(np.float32))
        else:
            instances = cells_of(labels.read(where, order=tuple(spatial)).astype(np.int64), "instances")
            stack.targets.append((instances > 0).astype(np.int64))
            stack.weights.append(weight_map(instances, w0=w0, sigma=sigma, spacing=spacing))
    return stack


class TileDataset(torch.utils.data.Dataset):
    """Item ``step`` is the augmented batch of that step, a pure function of ``(seed, step)``.

    Tiles have a valid input size, are mirrored (numpy ``reflect``) at stack borders and
    their targets/weights are cropped to the output size.
    """

    def __init__(self, stacks: list[_Stack], model: UNet, settings: TrainSettings) -> None:
        self.items = [(s, i) for s, stack in enumerate(stacks) for i in range(len(stack.planes))]
        self.stacks = stacks
        self.settings = settings
        self.out = (settings.tile,) * settings.ndim
        self.inp = model.input_shape_for(self.out)
        self.margin = model.margin()

    def __len__(self) -> int:
        return self.settings.steps

    def read(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A random tile (image, target, weight) at the input size, mirrored at stack borders."""
        stack_index, plane_index = self.items[int(rng.integers(len(self.items)))]
        stack = self.stacks[stack_index]
        plane = stack.planes[plane_index]
        origin = [int(rng.integers(0, max(s - o, 0) + 1)) for s, o in zip(plane.shape[1:], self.out)]
        start = [o - self.margin for o in origin]
        stop = [a + i for a, i in zip(start, self.inp)]
        return (read_reflected(plane, start, stop), read_reflected(stack.targets[plane_index], start, stop),
                read_reflected(stack.weights[plane_index], start, stop))

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The augmented batch of ``step``: each tile from its own generator, so the batch is the
        same whichever process draws it; augmented together in one resampling per array."""
        rngs = [np.random.default_rng([self.settings.seed, int(step), i]) for i in range(self.settings.batch_size)]
        images, targets, weights = (np.stack(parts) for parts in zip(*(self.read(rng) for rng in rngs)))
        s = self.settings
        crop = tuple(slice(self.margin, self.margin + o) for o in self.out)
        return augment_batch(images, targets, weights, rngs=rngs, elastic_sigma=s.elastic_sigma,
                             elastic_grid=s.elastic_grid, flip_rotate=s.flip_rotate, rotation=s.rotation,
                             gray_strength=s.gray_strength, crop=crop)


def _validate(model: UNet, stacks: list[_Stack], device: torch.device) -> dict:
    """Held-out loss and foreground IoU, whole planes predicted by overlap-tile."""
    losses, intersection, union = [], 0, 0
    was_training = model.training
    for stack in stacks:
        for plane, target, weight in zip(stack.planes, stack.targets, stack.weights):
            probs = predict_tiled(model, plane, device=device)
            p = torch.from_numpy(probs).clamp_min(1e-7)
            nll = torch.nn.functional.nll_loss(p.log()[None], torch.from_numpy(target)[None], reduction="none")
            losses.append(float((nll[0] * torch.from_numpy(weight)).mean()))
            pred, truth = probs[1] > 0.5, target > 0
            intersection += int((pred & truth).sum())
            union += int((pred | truth).sum())
    model.train(was_training)
    return {"val_loss": float(np.mean(losses)), "val_iou": intersection / union if union else 1.0}


def _build(settings: TrainSettings, in_channels: int, device: torch.device):
    model = UNet(in_channels=in_channels, n_classes=settings.n_classes, base_channels=settings.base_channels,
                 depth=settings.depth, ndim=settings.ndim, dropout=settings.dropout,
                 batch_norm=settings.batch_norm).to(device)
    memory_format = layout_of(settings.ndim)
    model = model.to(memory_format=memory_format)
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=settings.momentum)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    if settings.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate,
                                                        total_steps=settings.steps, pct_start=0.15)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return model, optimizer, scheduler, memory_format


class _StopRequest:
    """Turns SIGTERM/SIGUSR1 into a flag checked between steps (SLURM preemption)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: no handler, no graceful stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _upload(batch, device: torch.device, memory_format: torch.memory_format):
    """(image, target, weight) of a batch on ``device``; from the loader's pinned batches on CUDA
    the copies run asynchronously."""
    image, target, weight = (tensor.to(device, non_blocking=True) for tensor in batch)
    return image.contiguous(memory_format=memory_format), target, weight


def _save_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, step, identity, log_rows) -> None:
    state = {
        "model": model.state_dict(), "architecture": model.config(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "step": step, "identity": json.dumps(identity),
        "torch_rng": torch.get_rng_state(), "log": json.dumps(log_rows),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if scaler.is_enabled():  # fp16: the loss scale it has calibrated (a resume must not restart at 2**16)
        state["scaler"] = scaler.state_dict()
    write_checkpoint(path, state)


def _restore(state: dict, *, model, optimizer, scheduler, scaler) -> None:
    """Put back what :func:`_save_checkpoint` wrote, random number generators included."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def train(*, train_images: list[str], train_weights: list[str | None] | None = None, val_images: list[str] = (),
          val_weights: list[str | None] | None = None, out_dir: str | Path, settings: TrainSettings,
          device: str | None = None) -> Path:
    """Train a U-Net on ingested stacks; resume from ``out_dir/checkpoint.pt`` when present.

    Outputs in ``out_dir``: ``checkpoint.pt`` (full training state, written every
    ``checkpoint_every`` steps and on SIGTERM/SIGUSR1), ``model.pt`` (state dict +
    architecture), ``model.torchscript.pt`` (runs without this package),
    ``training_log.tsv`` and ``model_card.json``. All load with ``weights_only=True``.
    """
    train_weights = list(train_weights) if train_weights is not None else [None] * len(train_images)
    val_weights = list(val_weights) if val_weights is not None else [None] * len(val_images)
    if len(train_images) != len(train_weights) or not train_images:
        raise ValueError(f"need one weight map (or None) per training image and at least one image, got "
                         f"{len(train_images)} images and {len(train_weights)} weight maps")
    if len(val_images) != len(val_weights):
        raise ValueError(f"got {len(val_images)} validation images but {len(val_weights)} weight maps")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(settings.deterministic or previous)
    try:
        return _train(train_images, train_weights, val_images, val_weights, Path(out_dir), settings, device)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(train_images, train_weights, val_images, val_weights, out_dir: Path, settings: TrainSettings,
           device: torch.device) -> Path:
    torch.manual_seed(settings.seed)
    load = dict(ndim=settings.ndim, w0=settings.w0, sigma=settings.sigma, normalization=settings.normalize)
    stacks = [load_training_stack(i, w, **load) for i, w in zip(train_images, train_weights)]
    val_stacks = [load_training_stack(i, w, **load) for i, w in zip(val_images, val_weights)]
    channels = {s.planes[0].shape[0] for s in stacks + val_stacks}
    if len(channels) != 1:
        raise ValueError(f"training and validation stacks have different channel counts {sorted(channels)}")
    model, optimizer, scheduler, memory_format = _build(settings, channels.pop(), device)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT
    start_step, log_rows = 0, []
    identity = {"settings": asdict(settings), "data": [s.sha256 for s in stacks], "val": [s.sha256 for s in val_stacks],
                "augmentation": AUGMENTATION_VERSION}
    precision = training_precision(settings.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_loss_scaling(precision))
    state_kwargs = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    state = read_or_set_aside(checkpoint_path, device)
    if state is not None:
        if json.loads(state.get("identity", "{}")) != identity:
            # Another configuration, other data or another augmentation: a new training, not a resume.
            stale = checkpoint_path.with_name("checkpoint.previous.pt")
            checkpoint_path.replace(stale)
            warnings.warn(f"{checkpoint_path} was written for other settings, data or augmentation code; "
                          f"starting afresh (kept as {stale.name})", stacklevel=2)
        else:
            _restore(state, **state_kwargs)
            start_step, log_rows = int(state["step"]), json.loads(state["log"])
            print(f"train: resuming from {checkpoint_path} at step {start_step} of {settings.steps}", file=sys.stderr)
    dataset = TileDataset(stacks, model, settings)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(start_step, settings.steps)), batch_size=None,
        num_workers=settings.num_workers, generator=torch.Generator().manual_seed(settings.seed),
        persistent_workers=False, prefetch_factor=4 if settings.num_workers else None, pin_memory=device.type == "cuda",
    )
    started = time.perf_counter()
    running: list[torch.Tensor] = []
    model.train()
    with _StopRequest() as stop, tqdm(total=settings.steps, initial=start_step, desc="train", unit="step") as bar:
        for step, batch in enumerate(loader, start=start_step + 1):
            image, target, weight = _upload(batch, device, memory_format)
            with autocast(precision, device):
                logits = model(image)
            loss = weighted_cross_entropy(logits, target, weight)  # in float32
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if settings.grad_clip > 0:
                # One bad batch at the peak learning rate can otherwise throw the weights off for
                # good (an ISBI cpu-preset run: loss 0.54 -> 0.99 at step 500, 0.60 at the end
                # against 0.39); the gradient norm is about 1 here (median 0.8-1.0, max 2-4).
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running.append(loss.detach())  # read at the next log line: no wait for the GPU on every step
            bar.update(1)
            if step % settings.log_every == 0 or step == settings.steps:
                row = {"step": step, "loss": float(np.mean([r.item() for r in running])),
                       "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - started, 2)}
                running = []
                if val_stacks and (step % settings.validate_every == 0 or step == settings.steps):
                    row.update(_validate(model, val_stacks, device))
                log_rows.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                _save_checkpoint(checkpoint_path, step=step, log_rows=log_rows, identity=identity, **state_kwargs)
            if stop.signal is not None:
                _save_checkpoint(checkpoint_path, step=step, log_rows=log_rows, identity=identity, **state_kwargs)
                raise TrainingInterrupted(f"stopped by signal {stop.signal} after step {step}; "
                                          f"rerun the same command to resume from {checkpoint_path}")
    model.eval()
    _write_outputs(out_dir, model, settings, stacks, val_stacks, log_rows, time.perf_counter() - started, device)
    return out_dir


def _write_outputs(out_dir, model, settings, stacks, val_stacks, log_rows, seconds, device) -> None:
    _write_log(out_dir / "training_log.tsv", log_rows)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_checkpoint(out_dir / "model.pt", {
        "model": weights, "architecture": model.config(), "normalization": settings.normalize.as_dict(),
        "tile": settings.tile, "step": settings.steps, "training_objects": _object_sizes(stacks)})
    exported = _export_torchscript(model, out_dir / "model.torchscript.pt")
    card = {
        "architecture": model.config(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": asdict(settings),
        "normalization": {**settings.normalize.as_dict(), "description": settings.normalize.describe()},
        "training_objects": _object_sizes(stacks),
        "training_data": [{"stack": s.name, "sha256": s.sha256, "targets": s.targets_from} for s in stacks],
        "validation_data": [{"stack": s.name, "sha256": s.sha256, "targets": s.targets_from} for s in val_stacks],
        "final_metrics": {k: v for k, v in log_rows[-1].items() if k.startswith("val_") or k == "loss"},
        "training_seconds": round(seconds, 1),
        "device": str(device),
        "precision": training_precision(settings.amp, device),  # of the forward passes (train.amp)
        "exported": exported,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "reproducibility": {
            "seed": settings.seed, "deterministic_algorithms": settings.deterministic,
            "threads": torch.get_num_threads(), "weights_sha256": weights_digest(weights),
            "how": "Every batch is a pure function of (seed, step) and the initialisation of the seed, so the "
                   "same seed, data (sha256 above), versions, device and thread count give the same weights "
                   "again: bitwise on a CPU, within float noise on a GPU unless deterministic_algorithms. "
                   "bench/quality.py --repeat retrains and compares.",
        },
    }
    write_text(out_dir / "model_card.json", json.dumps(card, indent=2))


def _object_sizes(stacks: list[_Stack]) -> dict:
    """Median size (pixels or voxels) of the objects of the training targets: their 4-/6-connected
    interior components. Segmentation can drop objects much smaller than this
    (``segment.min_relative_size``), a filter that follows the data instead of a fixed size."""
    sizes = []
    for stack in stacks:
        for target in stack.targets:
            components, count = ndimage.label(target > 0, structure=ndimage.generate_binary_structure(target.ndim, 1))
            sizes.extend(np.bincount(components.ravel(), minlength=count + 1)[1:].tolist())
    return {"objects": len(sizes), "median_size": float(np.median(sizes)) if sizes else 0.0}


def weights_digest(state: dict) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes and bytes, in order): equal digests
    mean bitwise-equal weights, whatever file container holds them."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _export_torchscript(model: UNet, path: Path) -> str | None:
    """TorchScript export that runs without unet_core; None (and no file) where it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(model.cpu().to(memory_format=torch.contiguous_format))
            with atomic_file(path) as tmp:
                scripted.save(str(tmp))
        return path.name
    except Exception:  # scripting support varies across torch versions
        path.unlink(missing_ok=True)
        return None


def _write_log(path: Path, rows: list[dict]) -> None:
    order = ["step", "loss", "lr", "seconds"]
    columns = sorted({k for row in rows for k in row}, key=lambda k: order.index(k) if k in order else len(order))
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", restval="")
        writer.writeheader()
        writer.writerows(rows)
