"""The pixel-wise weighted softmax cross-entropy of the U-Net paper (eq. 1).

Axis order: logits ``(N, C, *spatial)``, target and weight ``(N, *spatial)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["weighted_cross_entropy"]


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``w(x) * -log p_{l(x)}(x)`` with a pixel-wise softmax.

    Parameters
    ----------
    logits : Tensor (N, C, *spatial)
        Unnormalised class scores a_k(x).
    target : Tensor (N, *spatial), integer
        True class l(x) of every pixel, in ``[0, C)``.
    weight : Tensor (N, *spatial), float
        The weight map w(x) (see :func:`unet_core.weight_map`).

    Returns
    -------
    Scalar tensor: ``sum_x w(x) * CE(x) / number of pixels``.

    Notes
    -----
    Eq. 1 of Ronneberger et al. (2015), E = sum_x w(x) log p_{l(x)}(x) with
    p_k = exp(a_k) / sum_k' exp(a_k'), negated to a loss. It is normalised by the pixel count
    (not by sum w) so that the weight map changes the balance between pixels but a uniform
    map w = 1 gives exactly the plain mean cross-entropy, and the loss scale does not jump
    with the number of borders in a tile.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (N, C, *spatial), got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    for name, tensor in (("target", target), ("weight", weight)):
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{name} must have shape (N, *spatial) = {expected} to match logits "
                f"{tuple(logits.shape)}, got {tuple(tensor.shape)}"
            )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a float tensor, got dtype {weight.dtype}")
    per_pixel = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return (per_pixel * weight.float()).mean()
