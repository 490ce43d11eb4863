"""The exact linear map of an ONNX/torch ``Conv`` on one sample: its geometry, the map and its adjoint.

This is the model's semantics, not a bound: the extracted graph (``ops.conv``), the trusted verifier and
the norm methods (``norms.conv``) all apply a convolution through these functions, so it lives beside
the ops and the verifier never has to import a bound method to run one.

The operator acts on ``in_shape = (C, *n)``: zero-pad with ONNX-style ``pads = (begin_0, ..., end_0,
...)``, then cross-correlate with ``weight`` of shape ``(O, C // groups, *k)`` at the given stride and
dilation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one convolution acting on one sample."""

    channels: int  # C
    spatial: tuple[int, ...]  # n per dim
    out_channels: int  # O
    kernel: tuple[int, ...]  # k per dim
    stride: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    out_spatial: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def n_in(self) -> int:
        return self.channels * math.prod(self.spatial)

    @property
    def n_out(self) -> int:
        return self.out_channels * math.prod(self.out_spatial)

    @property
    def torch_pad(self) -> list[int]:
        """``F.pad`` order: last dim first, (begin, end) pairs."""
        pad: list[int] = []
        for i in reversed(range(self.ndim)):
            pad += [self.begin[i], self.end[i]]
        return pad


def _tuple(value, ndim: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (int(value),) * ndim
    value = tuple(int(v) for v in value)
    if len(value) == 1 and ndim > 1:
        value = value * ndim
    if len(value) != ndim:
        raise ValueError(f"{name} has {len(value)} entries, expected {ndim}")
    return value


def conv_geometry(weight: torch.Tensor, in_shape: Sequence[int], stride, pads, dilation,
                  groups: int) -> ConvGeometry:
    """Validate a convolution's parameters and compute its output shape."""
    in_shape = tuple(int(v) for v in in_shape)
    ndim = weight.dim() - 2
    if ndim < 1 or len(in_shape) != ndim + 1:
        raise ValueError(f"weight {tuple(weight.shape)} does not match input shape {in_shape}")
    groups = int(groups)
    out_channels, c_per_group = int(weight.shape[0]), int(weight.shape[1])
    channels = in_shape[0]
    if groups < 1 or channels != c_per_group * groups or out_channels % groups:
        raise ValueError(
            f"groups={groups} incompatible with {channels} input channels and weight {tuple(weight.shape)}")
    stride = _tuple(stride, ndim, "stride")
    dilation = _tuple(dilation, ndim, "dilation")
    pads = tuple(int(p) for p in (pads if not isinstance(pads, int) else [pads] * (2 * ndim)))
    if len(pads) == ndim:  # symmetric shorthand
        pads = pads + pads
    if len(pads) != 2 * ndim or min(pads) < 0:
        raise ValueError(f"pads must be 2*{ndim} non-negative ints (begins, then ends), got {pads}")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError("stride and dilation must be >= 1")
    kernel = tuple(int(k) for k in weight.shape[2:])
    begin, end = pads[:ndim], pads[ndim:]
    spatial = in_shape[1:]
    out = tuple((spatial[i] + begin[i] + end[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                for i in range(ndim))
    if min(out) < 1:
        raise ValueError(f"convolution produces an empty output {out} on input {in_shape}")
    return ConvGeometry(channels, spatial, out_channels, kernel, stride, begin, end, dilation,
                        groups, out)


# --------------------------------------------------------------------------------------------
# The operator and its adjoint
# --------------------------------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_apply(x: torch.Tensor, weight: torch.Tensor, stride, pads, dilation, groups) -> torch.Tensor:
    """Linear part (no bias) of the convolution on a batch ``x`` of shape ``[B, C, *spatial]``."""
    geo = conv_geometry(weight, x.shape[1:], stride, pads, dilation, groups)
    w = weight.to(device=x.device, dtype=x.dtype)
    return _CONV[geo.ndim](F.pad(x, geo.torch_pad), w, stride=geo.stride, dilation=geo.dilation,
                           groups=geo.groups)


def conv_adjoint(y: torch.Tensor, weight: torch.Tensor, in_shape, stride, pads, dilation,
                 groups) -> torch.Tensor:
    """Exact adjoint A^T of :func:`conv_apply` on a batch ``y`` of shape ``[B, O, *out]``.

    A transposed convolution lands on the padded grid (``output_padding`` restores the trailing
    positions the strided conv never reads, always < stride); cropping the pads is the adjoint of
    zero padding.
    """
    geo = conv_geometry(weight, in_shape, stride, pads, dilation, groups)
    if tuple(y.shape[1:]) != (geo.out_channels,) + geo.out_spatial:
        raise ValueError(f"adjoint input {tuple(y.shape)} does not match output shape "
                         f"{(geo.out_channels,) + geo.out_spatial}")
    w = weight.to(device=y.device, dtype=y.dtype)
    out_pad = []
    for i in range(geo.ndim):
        padded = geo.spatial[i] + geo.begin[i] + geo.end[i]
        reached = (geo.out_spatial[i] - 1) * geo.stride[i] + geo.dilation[i] * (geo.kernel[i] - 1) + 1
        out_pad.append(padded - reached)
    z = _CONV_T[geo.ndim](y, w, stride=geo.stride, dilation=geo.dilation, groups=geo.groups,
                          output_padding=tuple(out_pad))
    index = (slice(None), slice(None)) + tuple(
        slice(geo.begin[i], geo.begin[i] + geo.spatial[i]) for i in range(geo.ndim))
    return z[index]
