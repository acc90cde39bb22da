"""Reading checkpoint files safely: ``torch.load(weights_only=True)`` with errors that name the file.

A checkpoint is untrusted input (it may come from another facility, a truncated copy or a full
disk). It is loaded with ``weights_only=True``, so a file that holds pickled code is refused
and never run; torch's own advice in that case (load it with ``weights_only=False``) is not
passed on. A truncated or otherwise unreadable file raises :class:`CheckpointError` naming the
file and what is wrong with it.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import torch

from .atomic import atomic_file
from .model import UNet

__all__ = ["CheckpointError", "read_checkpoint", "write_checkpoint", "read_or_set_aside", "load_model",
           "is_bioimageio_package", "BIOIMAGEIO_CONFIG_KEY"]

# The section of a bioimage.io package's config that unet_core.export writes and reads back.
BIOIMAGEIO_CONFIG_KEY = "unet_core"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, not a checkpoint, or refused as unsafe)."""


# torch's refusal starts with this, then advises loading with weights_only=False (which would run
# the file's code), then names the offending object on a line of its own.
_REFUSED = "Weights only load failed"
_ADVICE = ("weights_only", "Weights only", "Check the documentation", "Please file an issue")


def _reason(error: Exception) -> str:
    """What is wrong with the file, in one line, without torch's advice to load it unsafely."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith(_REFUSED):
        detail = next((line for line in lines[1:] if not any(a in line for a in _ADVICE)), "")
        # keep what the object is, not torch's advice to allowlist it (as unsafe as weights_only=False)
        detail = re.split(r"\s+was not an allowed global|\.\s+Please use", detail)[0]
        detail = detail.removeprefix("WeightsUnpickler error:").strip()[:200]
        return (f"it holds objects other than tensors and plain data{' (' + detail + ')' if detail else ''}; "
                f"checkpoints are only loaded with weights_only=True, so such a file is refused and never run")
    first = lines[0].split(". ")[0][:200] if lines else ""
    if any(a in first for a in _ADVICE):
        first = ""
    return f"truncated or not a torch checkpoint ({type(error).__name__}{': ' + first if first else ''})"


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """The contents of a checkpoint file (a dict), loaded with ``weights_only=True``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    CheckpointError
        The file is truncated, is not a torch checkpoint, holds objects that ``weights_only``
        refuses, or does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        contents = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises several types (RuntimeError, UnpicklingError, EOFError, ...)
        raise CheckpointError(f"{path}: cannot be read: {_reason(error)}") from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path}: not a unet_core checkpoint (holds a {type(contents).__name__}, "
                              f"expected a mapping)")
    return contents


def is_bioimageio_package(path: str | Path) -> bool:
    """A bioimage.io package's ``bioimageio.yaml``/``rdf.yaml`` (any ``.yaml``) or its ``.zip``."""
    return Path(path).suffix.lower() in (".yaml", ".yml", ".zip")


def _read_bioimageio(path: Path, device) -> dict:
    """The checkpoint contents of a bioimage.io package written by :mod:`unet_core.export`:
    validated by ``bioimageio.spec`` (which checks every file's sha256), the U-Net's weights
    from its state dict (``weights_only=True``), the settings from ``config.unet_core``."""
    import io as _bytes
    from bioimageio.spec import InvalidDescr, load_model_description

    if not path.exists():
        raise FileNotFoundError(f"bioimage.io package not found: {path}")
    try:
        descr = load_model_description(path, perform_io_checks=True)
    except Exception as error:  # noqa: BLE001 - an invalid package raises ValueError, a broken zip others
        raise CheckpointError(f"{path}: not a valid bioimage.io model package ({error})"[:800]) from None
    if isinstance(descr, InvalidDescr):
        raise CheckpointError(f"{path}: not a valid bioimage.io model package")
    ours = (descr.config.model_extra or {}).get(BIOIMAGEIO_CONFIG_KEY)
    weights = descr.weights.pytorch_state_dict
    if not isinstance(ours, dict) or "architecture" not in ours or weights is None:
        raise CheckpointError(f"{path}: a bioimage.io package that unet-core did not export (no "
                              f"config.{BIOIMAGEIO_CONFIG_KEY} with the architecture, or no pytorch_state_dict "
                              f"weights); run it with a bioimage.io consumer (bioimageio.core, ilastik, deepImageJ)")
    try:
        state = torch.load(_bytes.BytesIO(weights.get_reader().read()), map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - as in read_checkpoint
        raise CheckpointError(f"{path}: its weights cannot be read: {_reason(error)}") from None
    prefix = "unet."  # the package holds SameSizeUNet, whose U-Net is .unet
    return {**ours, "model": {k.removeprefix(prefix): v for k, v in state.items()}}


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    """Load a checkpoint written by :mod:`unet_core.train` (``torch.load(weights_only=True)``),
    or a bioimage.io package written by :mod:`unet_core.export` (its ``rdf.yaml``, folder or zip)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder: give a model.pt, or the bioimageio.yaml of a bioimage.io package")
    if is_bioimageio_package(path):
        checkpoint = _read_bioimageio(path, device)
    else:
        checkpoint = read_checkpoint(path, device)  # FileNotFoundError or CheckpointError, naming the file
    if "model" not in checkpoint or "architecture" not in checkpoint:
        raise ValueError(f"{path}: not a unet_core checkpoint (missing 'model'/'architecture')")
    model = UNet(**checkpoint["architecture"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def write_checkpoint(path: str | Path, contents: dict) -> Path:
    """``torch.save`` of ``contents`` (tensors and plain data) to ``path``, atomically
    (:func:`unet_core.atomic.atomic_file`: the bytes are those of a direct ``torch.save``)."""
    with atomic_file(path) as tmp:
        torch.save(contents, tmp)
    return Path(path)


def read_or_set_aside(path: str | Path, device: torch.device | str = "cpu") -> dict | None:
    """The contents of ``path``, or None when there is none or it cannot be read.

    A file that cannot be read (truncated by a full disk or a killed copy, or refused as
    unsafe) is set aside as ``<stem>.corrupt-<time><suffix>``, never deleted, with a warning
    naming both files, so that the caller starts afresh instead of failing the same way every
    night.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read_checkpoint(path, device)
    except CheckpointError as error:
        aside = path.with_name(f"{path.stem}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}{path.suffix}")
        path.replace(aside)
        warnings.warn(f"{error}; set aside as {aside}, training starts afresh", stacklevel=3)
        return None
