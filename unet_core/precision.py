"""The arithmetic of forward passes: fp32, or bf16/fp16 autocast, for prediction and training.

fp32 is the reference: prediction in fp32 equals whole-image prediction, and a CPU training in
fp32 is bitwise reproducible. bf16 keeps fp32's exponent range with an 8-bit mantissa (no loss
scaling needed); fp16 has a 10-bit mantissa but a narrow range (training needs loss scaling).
Under autocast, convolutions and matrix products run in the low precision; softmax, the loss
and the weights stay float32.
"""

from __future__ import annotations

import contextlib

import torch

from .defaults import choices

__all__ = ["PRECISIONS", "resolve_precision", "training_precision", "autocast", "needs_loss_scaling"]

PRECISIONS = choices("predict", "precision")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU with native bf16 (compute capability 8.0, Ampere, or later)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device``: ``auto`` is bf16 on a CUDA GPU that
    supports it and fp32 otherwise (on a CPU bf16 is fast only with AVX512-BF16 or AMX, and fp32
    keeps prediction exact).

    >>> resolve_precision("auto", "cpu"), resolve_precision("bf16", "cpu")
    ('fp32', 'bf16')
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if _cuda_bf16(torch.device(device)) else "fp32"


def training_precision(amp: bool, device: torch.device | str) -> str:
    """The forward-pass precision of training with ``train.amp``: on CUDA bf16 where the GPU
    supports it, else fp16 (with loss scaling, :func:`needs_loss_scaling`); fp32 without ``amp``
    and on a CPU, where a run stays bitwise reproducible.

    >>> training_precision(True, "cpu"), training_precision(False, "cuda")
    ('fp32', 'fp32')
    """
    device = torch.device(device)
    if not amp or device.type != "cuda":
        return "fp32"
    return "bf16" if _cuda_bf16(device) else "fp16"


def needs_loss_scaling(precision: str) -> bool:
    """fp16 gradients underflow without loss scaling (``torch.amp.GradScaler``); bf16 and fp32 do not."""
    return precision == "fp16"


def autocast(precision: str, device: torch.device | str):
    """The context of a forward pass in ``precision`` on ``device`` (``fp32``: none;
    ``bf16``/``fp16``: autocast; ``auto``: :func:`resolve_precision`).

    fp32 on CUDA turns TF32 off for cuDNN in this process: torch lets cuDNN run float32
    convolutions with TF32's 10-bit mantissa on Ampere and later GPUs by default, which would
    make the exact reference no more precise than fp16 (about 1e-3 instead of 1e-6).
    """
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        if torch.device(device).type == "cuda":
            torch.backends.cudnn.allow_tf32 = False  # the legacy switch keeps its readers working
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])
