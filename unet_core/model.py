"""The U-Net of Ronneberger, Fischer & Brox (2015), 2D and 3D, with valid convolutions.

Axis order: torch tensors are ``(N, C, *spatial)``; shapes passed to the size
arithmetic are spatial only, ``(Y, X)`` or ``(Z, Y, X)``.

References
----------
O. Ronneberger, P. Fischer, T. Brox. U-Net: Convolutional Networks for Biomedical
Image Segmentation. MICCAI 2015, arXiv:1505.04597.
Ö. Çiçek et al. 3D U-Net: Learning Dense Volumetric Segmentation from Sparse
Annotation. MICCAI 2016, arXiv:1606.06650.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["UNet", "SameSizeUNet", "valid_sizes"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_UPCONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}


def _conv_block(ndim: int, in_ch: int, out_ch: int, batch_norm: bool) -> nn.Sequential:
    """Two unpadded 3x3(x3) convolutions, each followed by ReLU (and optional BN)."""
    layers: list[nn.Module] = []
    for ch_in in (in_ch, out_ch):
        layers.append(_CONV[ndim](ch_in, out_ch, kernel_size=3, padding=0))
        if batch_norm:
            layers.append(_NORM[ndim](out_ch))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _center_crop(features: torch.Tensor, spatial: list[int]) -> torch.Tensor:
    """Crop the trailing spatial axes of ``features`` to ``spatial``, centred."""
    for axis in range(len(spatial)):
        have = features.shape[axis + 2]
        features = features.narrow(axis + 2, (have - spatial[axis]) // 2, spatial[axis])
    return features


def _output_size(size: int, depth: int) -> int | None:
    """Output length of one axis, or None if the size is not valid."""
    for _ in range(depth):
        size -= 4
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= 4
    if size <= 0:
        return None
    for _ in range(depth):
        size = 2 * size - 4
        if size <= 0:
            return None
    return size


def _input_size(out: int, depth: int) -> int | None:
    """Input length of one axis that yields ``out``, or None if ``out`` is not reachable."""
    size = out
    for _ in range(depth):
        if (size + 4) % 2:
            return None
        size = (size + 4) // 2
    size += 4
    for _ in range(depth):
        size = 2 * size + 4
    return size if _output_size(size, depth) == out else None


def valid_sizes(depth: int, *, kind: str = "input", near: int, count: int = 1) -> list[int]:
    """Valid input (or output) lengths of one axis nearest to ``near``.

    Returns up to ``count`` valid sizes at or below ``near`` and ``count`` above it,
    sorted ascending.
    """
    check = (lambda s: _output_size(s, depth)) if kind == "input" else (lambda s: _input_size(s, depth))
    below, above = [], []
    size = near
    while len(below) < count and size > 0:
        if check(size) is not None:
            below.append(size)
        size -= 1
    size = near + 1
    while len(above) < count:
        if check(size) is not None:
            above.append(size)
        size += 1
    return sorted(below) + above


class UNet(nn.Module):
    """The paper's U-Net with unpadded (valid) convolutions, 2D or 3D.

    Parameters
    ----------
    in_channels : int
        Channels of the input image.
    n_classes : int
        Output channels of the final 1x1 convolution (class logits).
    base_channels : int
        Feature channels of the first level; doubled after every pooling (64 in the paper).
    depth : int
        Number of 2x2 max-poolings (4 in the paper).
    ndim : int
        2 for the 2D U-Net, 3 for the 3D U-Net (Çiçek et al. 2016).
    dropout : float
        Dropout probability at the end of the contracting path (0 disables it).
    batch_norm : bool
        Batch normalisation after each convolution (not in the 2015 paper; used by 3D U-Net).

    Notes
    -----
    Contracting path: per level two unpadded 3x3 convolutions + ReLU, then 2x2 max-pool
    with stride 2; channels double at every level. Expanding path: 2x2 up-convolution that
    halves the channels, concatenation with the centre-cropped contracting feature map, two
    3x3 convolutions + ReLU. A final 1x1 convolution maps to ``n_classes``. Weights are
    initialised from N(0, 2/N), N = fan-in (He et al.), biases to zero, as in Section 3.
    The default model has 23 convolutional layers and 31,030,658 parameters and maps a
    572x572 input to 388x388.

    Examples
    --------
    >>> UNet().output_shape((572, 572))
    (388, 388)
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        base_channels: int = 64,
        depth: int = 4,
        ndim: int = 2,
        dropout: float = 0.5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
        for name, value in (("in_channels", in_channels), ("n_classes", n_classes),
                            ("base_channels", base_channels), ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.base_channels = base_channels
        self.depth = depth
        self.ndim = ndim
        self.dropout_p = float(dropout)
        self.batch_norm = batch_norm

        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        ch = in_channels
        for width in widths[:-1]:
            self.down.append(_conv_block(ndim, ch, width, batch_norm))
            ch = width
        self.pool = _POOL[ndim](kernel_size=2, stride=2)
        self.bottom = _conv_block(ndim, ch, widths[-1], batch_norm)
        self.dropout = _DROPOUT[ndim](dropout) if dropout > 0 else nn.Identity()
        self.upconvs = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(depth)):
            self.upconvs.append(_UPCONV[ndim](widths[level + 1], widths[level], kernel_size=2, stride=2))
            self.up.append(_conv_block(ndim, 2 * widths[level], widths[level], batch_norm))
        self.head = _CONV[ndim](widths[0], n_classes, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                # N(0, 2/N): N is the number of incoming nodes of one output unit.
                fan_in = module.in_channels * math.prod(module.kernel_size)
                if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                    # stride == kernel: each output unit sees one input position per channel.
                    fan_in = module.in_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
                nn.init.zeros_(module.bias)

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the architecture."""
        return {
            "in_channels": self.in_channels, "n_classes": self.n_classes,
            "base_channels": self.base_channels, "depth": self.depth, "ndim": self.ndim,
            "dropout": self.dropout_p, "batch_norm": self.batch_norm,
        }

    def _spatial(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.ndim:
            raise ValueError(f"expected a {self.ndim}D spatial shape, got {shape}")
        return shape

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial ``input_shape``.

        Raises ValueError naming the nearest valid input shapes when an axis would reach an
        odd size before a pooling (or vanish).
        """
        shape = self._spatial(input_shape)
        out = tuple(_output_size(s, self.depth) for s in shape)
        if any(o is None for o in out):
            nearest = [s if o is not None else tuple(valid_sizes(self.depth, near=s))
                       for s, o in zip(shape, out)]
            raise ValueError(
                f"input shape {shape} is not valid for a depth-{self.depth} U-Net with valid "
                f"convolutions: every axis must stay even before each of the {self.depth} "
                f"poolings; nearest valid sizes per axis: {nearest}"
            )
        return out  # type: ignore[return-value]

    def input_shape_for(self, output_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial input shape that yields exactly ``output_shape`` (inverse of output_shape)."""
        shape = self._spatial(output_shape)
        inp = tuple(_input_size(s, self.depth) for s in shape)
        if any(i is None for i in inp):
            nearest = [s if i is not None else tuple(valid_sizes(self.depth, kind="output", near=s))
                       for s, i in zip(shape, inp)]
            raise ValueError(
                f"output shape {shape} cannot be produced by a depth-{self.depth} U-Net with "
                f"valid convolutions; nearest valid output sizes per axis: {nearest}"
            )
        return inp  # type: ignore[return-value]

    def margin(self) -> int:
        """Context lost on each side of an axis: (input - output) / 2, the same for every size."""
        out = valid_sizes(self.depth, kind="output", near=1)[-1]
        return (_input_size(out, self.depth) - out) // 2  # type: ignore[operator]

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, {'*' * self.ndim}) "
                f"({self.ndim + 2} axes), got {tuple(x.shape)}"
            )
        self.output_shape(x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottom(x))
        level = len(skips)
        for upconv, block in zip(self.upconvs, self.up):
            level -= 1
            x = upconv(x)
            x = block(torch.cat([_center_crop(skips[level], list(x.shape[2:])), x], dim=1))
        return self.head(x)


class SameSizeUNet(nn.Module):
    """The U-Net as a network whose output has its input's size, for formats that run a model on
    tiles of their own (bioimage.io): the input is mirrored by the U-Net's margin on every side
    (``reflect``: the edge is not repeated, as :mod:`unet_core.tiling` mirrors the volume's
    border), the valid-convolution U-Net computes, and softmax gives class probabilities.

    Its output on an image equals overlap-tile prediction of that image; an output pixel within
    ``halo`` (= the margin) of a tile's edge sees mirrored context instead of the real one, so
    a tiled consumer discards it. The input sizes per axis are ``min_size + n * step``.
    Self-contained (torch only): a bioimage.io package ships this file as the architecture.
    The arguments are :class:`UNet`'s.

    Examples
    --------
    >>> net = SameSizeUNet(base_channels=4, depth=2)
    >>> (net.halo, net.min_size, net.step)
    (20, 44, 4)
    >>> tuple(net(torch.zeros(1, 1, 48, 52)).shape)
    (1, 2, 48, 52)
    """

    def __init__(self, **unet_arguments) -> None:
        super().__init__()
        self.unet = UNet(**unet_arguments)
        self.halo = int(self.unet.margin())
        self.step = 2 ** self.unet.depth
        # the smallest input whose padded size the U-Net takes and that is more than two halos wide
        self.min_size = valid_sizes(self.unet.depth, kind="input", near=4 * self.halo)[-1] - 2 * self.halo
        self.pad = [self.halo] * (2 * self.unet.ndim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = nn.functional.pad(x, self.pad, mode="reflect")
        return torch.softmax(self.unet(padded), dim=1)
