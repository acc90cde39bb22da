"""bioimage.io model packages (spec 0.5) of a trained U-Net: ``unet-core export --format bioimageio``.

A package is what ilastik, deepImageJ, QuPath, napari and BiaPy open: ``bioimageio.yaml`` and the
files it names. Ours holds

- the network as :class:`unet_core.model.SameSizeUNet`: the input mirrored by the U-Net's
  margin, the valid-convolution U-Net, softmax. Inputs are ``min + n * step`` pixels per axis
  (``step = 2**depth``), the output has the input's size, and its ``halo`` (the margin) is what
  a consumer that tiles discards from each tile: the overlap-tile strategy of the paper;
- its weights twice: TorchScript (runs without any code of ours) and a state dict with the
  architecture as a source file (``unet_core/model.py``, torch only);
- the normalisation as bioimage.io preprocessing of each channel over the spatial axes of the
  tensor a consumer passes: ``zero_mean_unit_variance`` (z-score) or ``scale_range`` (the
  model's percentiles). bioimage.io adds ``eps = 1e-6`` to the divisor; that is the only
  difference to ours (relative 1e-6 of a standard deviation). A model normalised per stack is
  normalised per tensor there: the same for a tensor that is the whole stack;
- a test input (a crop of ``sample``, or smoothed noise) and, as its test output, the
  probabilities of :func:`unet_core.overlap_tile.predict_tiled`, with a reproducibility
  tolerance of 1e-4: ``bioimageio test`` (:func:`bioimageio.core.test_model`) checks that the
  package reproduces our prediction;
- documentation from the model card (training data, settings, final metrics), a cover, the MIT
  licence and the paper's citation; and under ``config.unet_core`` what
  :func:`unet_core.checkpoint.load_model` needs to predict with the package as with ``model.pt``.

Nothing is downloaded: the package is built and validated offline (no author ``github_user``
and no URLs, whose validation would query the network).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from . import io
from .atomic import atomic_directory
from .checkpoint import BIOIMAGEIO_CONFIG_KEY, load_model
from .model import SameSizeUNet, UNet
from .normalize import Normalization, NormalizationTable, image_statistics
from .overlap_tile import predict_tiled

__all__ = ["export_bioimageio", "TEST_TOLERANCE", "PACKAGE_FILE"]

PACKAGE_FILE = "bioimageio.yaml"
# Absolute tolerance of the package's test output (probabilities in [0, 1]).
TEST_TOLERANCE = 1e-4
_EPS = 1e-6  # bioimage.io's normalisation eps (bioimageio.core uses 1e-6 whatever the file says)
# The test input's edge: the largest valid size up to this (2D) or this (3D), the sample allowing.
_TEST_EDGE = {2: 256, 3: 96}
_CITATION = ("Ronneberger, O., Fischer, P., Brox, T. U-Net: Convolutional Networks for Biomedical Image "
             "Segmentation. MICCAI 2015, LNCS 9351, 234-241.")
_DOI = "10.1007/978-3-319-24574-4_28"


def export_bioimageio(model_path: str | Path, out_dir: str | Path, *, sample: str | Path | None = None,
                      name: str | None = None, authors: tuple[str, ...] = ("unet-pipeline",)) -> Path:
    """Write the bioimage.io package of ``model_path`` (``model.pt`` of ``train``) into ``out_dir``.

    ``sample``: an ingested OME-Zarr image like those the model was made for; a centred crop of
    it (one plane of a 2D model, up to 256 px; up to 96 px per axis for a 3D model) becomes the
    test input and the cover. Without it the test input is smoothed noise. ``name`` defaults to
    'U-Net <model folder name>'. The folder is published atomically; returns its ``bioimageio.yaml``.
    """
    from bioimageio.spec import save_bioimageio_package_as_folder

    model_path, out_dir = Path(model_path), Path(out_dir)
    model, checkpoint = load_model(model_path, "cpu")
    normalization = Normalization.from_checkpoint(checkpoint.get("normalization"))
    net = SameSizeUNet(**model.config())
    net.unet.load_state_dict(model.state_dict())
    net.eval()
    raw = _test_input(sample, net) if sample is not None else _noise_input(net)
    offset, divisor = image_statistics(raw.reshape(raw.shape[0], -1), normalization)
    normalized = NormalizationTable(normalization, (), (), (offset,), (divisor,)).apply(raw, {})
    expected = predict_tiled(model, normalized, device="cpu")
    card = _read_card(model_path.with_name("model_card.json"))
    name = name or f"U-Net {model_path.parent.name}".strip()
    with tempfile.TemporaryDirectory(prefix="bioimageio-") as staging:
        files = _write_files(Path(staging), net, model, raw, expected, card, normalization, name, sample)
        descr = _description(net, model, normalization, checkpoint, files, name, authors, model_path, card)
        with atomic_directory(out_dir) as tmp:
            save_bioimageio_package_as_folder(descr, output_path=tmp)
            # the name the spec recommends (rdf.yaml, which the library writes, is the older one)
            (tmp / "rdf.yaml").rename(tmp / PACKAGE_FILE)
    return out_dir / PACKAGE_FILE


def _test_input(sample: str | Path, net: SameSizeUNet) -> np.ndarray:
    """A centred crop ``(C, *spatial)`` float32 of ``sample`` in valid sizes (a 2D model: the
    middle plane of the first time point)."""
    image = io.open_image(sample)
    unet = net.unet
    spatial = "yx" if unet.ndim == 2 else "zyx"
    missing = set(spatial) - set(image.axes)
    if missing:
        raise ValueError(f"{sample}: axes {image.axes!r} lack {''.join(sorted(missing))} for a {unet.ndim}D model")
    channels = image.shape[image.axes.index("c")] if "c" in image.axes else 1
    if channels != unet.in_channels:
        raise ValueError(f"{sample}: {channels} channel(s), the model takes {unet.in_channels}")
    where = {a: image.shape[image.axes.index(a)] // 2 if a == "z" else 0 for a in image.axes if a not in spatial + "c"}
    region = {}
    for axis in spatial:
        extent = image.shape[image.axes.index(axis)]
        size = _valid_size(net, min(extent, _TEST_EDGE[unet.ndim]))
        if size is None:
            raise ValueError(f"{sample}: {axis} is {extent} px, the package's smallest input is {net.min_size} px")
        start = (extent - size) // 2
        region[axis] = slice(start, start + size)
    index = tuple(where[a] if a in where else region.get(a, slice(None)) for a in image.axes)
    block = np.asarray(image.array[index], np.float32)
    kept = [a for a in image.axes if a not in where]
    if "c" not in kept:
        block, kept = block[None], ["c", *kept]
    return np.ascontiguousarray(np.transpose(block, [kept.index(a) for a in "c" + spatial]))


def _noise_input(net: SameSizeUNet) -> np.ndarray:
    """Smoothed noise in 0..255 (fixed seed), for a package exported without a sample."""
    size = _valid_size(net, max(net.min_size, 128 if net.unet.ndim == 2 else net.min_size))
    shape = (net.unet.in_channels, *[size] * net.unet.ndim)
    noise = ndimage.gaussian_filter(np.random.default_rng(0).random(shape), (0, *[3.0] * net.unet.ndim))
    return (255 * (noise - noise.min()) / max(noise.max() - noise.min(), 1e-12)).astype(np.float32)


def _valid_size(net: SameSizeUNet, limit: int) -> int | None:
    """The largest input size ``min + n * step`` up to ``limit``, or None."""
    if limit < net.min_size:
        return None
    return net.min_size + (limit - net.min_size) // net.step * net.step


def _read_card(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_files(folder: Path, net: SameSizeUNet, model: UNet, raw: np.ndarray, expected: np.ndarray, card: dict,
                 normalization: Normalization, name: str, sample) -> dict[str, Path]:
    files = {"weights": folder / "weights.pt", "torchscript": folder / "weights_torchscript.pt",
             "architecture": folder / "model.py", "test_input": folder / "test_input.npy",
             "test_output": folder / "test_output.npy", "documentation": folder / "README.md",
             "cover": folder / "cover.png"}
    torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, files["weights"])
    torch.jit.script(net).save(str(files["torchscript"]))
    files["architecture"].write_bytes((Path(__file__).parent / "model.py").read_bytes())
    np.save(files["test_input"], raw[None])
    np.save(files["test_output"], expected[None].astype(np.float32))
    files["documentation"].write_text(_documentation(name, model, net, normalization, card, sample), encoding="utf-8")
    _write_cover(files["cover"], raw, expected)
    return files


def _write_cover(path: Path, raw: np.ndarray, expected: np.ndarray) -> None:
    """The test input beside the foreground probability (middle plane of a 3D model), 2:1."""
    import matplotlib.pyplot as plt

    def plane(a):
        a = a[a.shape[0] // 2] if a.ndim == 3 else a
        low, high = np.percentile(a, [1, 99.8])
        return np.clip((a - low) / max(high - low, 1e-12), 0, 1)

    picture = np.concatenate([plane(raw[0]), plane(expected[-1])], axis=1)
    plt.imsave(path, picture, cmap="gray", vmin=0, vmax=1)


def _documentation(name: str, model: UNet, net: SameSizeUNet, normalization: Normalization, card: dict,
                   sample) -> str:
    """README.md of the package: what the model is, how it was trained, how to run it."""
    data = card.get("training_data", [])
    metrics = card.get("final_metrics", {})
    lines = [
        f"# {name}", "",
        f"A {model.ndim}D U-Net (Ronneberger et al. 2015, valid convolutions) trained and exported by",
        "unet-pipeline (`unet-core export --format bioimageio`).", "",
        "## Model", "",
        f"- depth {model.depth}, {model.base_channels} features at the first level, {model.in_channels} input "
        f"channel(s), {model.n_classes} classes (softmax probabilities; class {model.n_classes - 1} is the "
        f"object interior)",
        f"- inputs of {net.min_size} + n * {net.step} pixels per axis; the output has the input's size. The "
        f"network mirrors its input by {net.halo} px (the U-Net's context), so an output pixel within "
        f"{net.halo} px of a tile's edge sees mirrored instead of real context: tile with an overlap "
        f"(`halo`) of {net.halo} px, as the paper's overlap-tile strategy does",
        f"- normalisation: {normalization.describe()} in training; here per channel over the spatial axes "
        f"of the tensor passed (bioimage.io adds eps = 1e-6 to the divisor)", "",
        "## Training", "",
        f"- {len(data)} training stack(s): " + (", ".join(f"`{d.get('stack')}`" for d in data) or "not recorded"),
        f"- settings: `{json.dumps(card.get('settings', {}), sort_keys=True, default=str)}`",
        f"- final metrics: `{json.dumps(metrics, sort_keys=True, default=str)}`",
        f"- training took {card.get('training_seconds', '?')} s on {card.get('device', '?')}", "",
        "## Validation", "",
        f"The test input is {'a crop of the stack ' + repr(Path(str(sample)).name) if sample else 'smoothed noise'};"
        f" the test output is unet-pipeline's overlap-tile prediction of it, reproduced by the package within "
        f"{TEST_TOLERANCE:g} (`bioimageio test bioimageio.yaml`). Held-out quality is in the run's QC report.", "",
        "## Citation", "", _CITATION + f" doi:{_DOI}", "",
    ]
    return "\n".join(lines)


def _description(net: SameSizeUNet, model: UNet, normalization: Normalization, checkpoint: dict,
                 files: dict[str, Path], name: str, authors: tuple[str, ...], model_path: Path, card: dict):
    from bioimageio.spec.model import v0_5 as spec

    axes = [spec.AxisId(a) for a in ("yx" if model.ndim == 2 else "zyx")]
    classes = ["background", "foreground"] if model.n_classes == 2 else [f"class{k}" for k in range(model.n_classes)]
    raw_id, out_id = spec.TensorId("raw"), spec.TensorId("probabilities")
    if normalization.method == "zscore":
        step = spec.ZeroMeanUnitVarianceDescr(kwargs=spec.ZeroMeanUnitVarianceKwargs(axes=axes, eps=_EPS))
    else:
        step = spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(
            axes=axes, min_percentile=normalization.low, max_percentile=normalization.high, eps=_EPS))
    inputs = spec.InputTensorDescr(
        id=raw_id, description="raw intensities (any scale: normalised by the preprocessing)",
        axes=[spec.BatchAxis(),
              spec.ChannelAxis(channel_names=[spec.Identifier(f"channel{c}") for c in range(model.in_channels)]),
              *[spec.SpaceInputAxis(id=a, size=spec.ParameterizedSize(min=net.min_size, step=net.step)) for a in axes]],
        test_tensor=spec.FileDescr(source=files["test_input"]), data=spec.IntervalOrRatioDataDescr(type="float32"),
        pad=spec.ReflectPadding(mode="reflect"), preprocessing=[step])
    outputs = spec.OutputTensorDescr(
        id=out_id, description="class probabilities (softmax)",
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in classes]),
              *[spec.SpaceOutputAxisWithHalo(id=a, size=spec.SizeReference(tensor_id=raw_id, axis_id=a),
                                             halo=net.halo) for a in axes]],
        test_tensor=spec.FileDescr(source=files["test_output"]),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))
    version = spec.Version(torch.__version__.split("+")[0])
    weights = spec.WeightsDescr(
        pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
            source=files["weights"], pytorch_version=version,
            architecture=spec.ArchitectureFromFileDescr(source=files["architecture"],
                                                        callable=spec.Identifier("SameSizeUNet"),
                                                        kwargs=model.config())),
        torchscript=spec.TorchscriptWeightsDescr(source=files["torchscript"], pytorch_version=version,
                                                 parent="pytorch_state_dict"))
    ours = {"architecture": model.config(), "normalization": normalization.as_dict(),
            "source_model": {"file": model_path.name, "sha256": io.sha256_file(model_path)},
            **{k: checkpoint[k] for k in ("training_objects", "tile", "step") if k in checkpoint}}
    try:
        return spec.ModelDescr(
            name=name, description=f"{model.ndim}D U-Net (Ronneberger et al. 2015) for segmentation, trained "
                                   f"with unet-pipeline on {len(card.get('training_data', [])) or 'unrecorded'} "
                                   f"stack(s)",
            authors=[spec.Author(name=author) for author in authors],
            cite=[spec.CiteEntry(text=_CITATION, doi=spec.Doi(_DOI))],
            license=spec.LicenseId("MIT"), documentation=spec.FileDescr(source=files["documentation"]),
            covers=[spec.FileDescr(source=files["cover"])],
            tags=["unet", "segmentation", f"{model.ndim}d", "pytorch", "unet-pipeline"],
            inputs=[inputs], outputs=[outputs], weights=weights,
            config={BIOIMAGEIO_CONFIG_KEY: json.loads(json.dumps(ours, default=str)),
                    "bioimageio": {"architecture_type": "U-Net", "reproducibility_tolerance": [
                        {"absolute_tolerance": TEST_TOLERANCE, "relative_tolerance": 0.0,
                         "mismatched_elements_per_million": 0}]}})
    except ValueError as error:  # pydantic's ValidationError, e.g. a name the spec does not allow
        reason = re.sub(r"\s+", " ", str(error))[:600]
        raise ValueError(f"{model_path}: the bioimage.io description is not valid: {reason}") from None
