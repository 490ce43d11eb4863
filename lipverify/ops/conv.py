"""Convolutions (1-D and 2-D) with stride, asymmetric zero padding, dilation and groups."""

from __future__ import annotations

import torch

from lipverify.ops.base import LinearOp, NormResult
from lipverify.ops.conv_map import conv_apply


class Conv(LinearOp):
    """ONNX/torch convolution. ``pads`` is ONNX-style: (begin_0, begin_1, ..., end_0, end_1, ...)."""

    kind = "Conv"

    def __init__(self, weight, bias, stride, pads, dilation, groups):
        self.weight = weight  # (O, C // groups, *k)
        self.bias = bias
        self.stride = tuple(int(s) for s in stride)
        self.pads = tuple(int(p) for p in pads)
        self.dilation = tuple(int(d) for d in dilation)
        self.groups = int(groups)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return conv_apply(x, self.weight, self.stride, self.pads, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _add_channel_bias(self.apply(x), self.bias)

    def magnitude(self, m, x):
        y = conv_apply(m, self.weight.abs(), self.stride, self.pads, self.dilation, self.groups)
        return _add_channel_bias(y, None if self.bias is None else self.bias.abs())

    def terms(self, in_shape):
        return int(self.weight[0].numel()) + 2  # (C / groups) * prod(kernel) terms (see Dense.terms), the bias

    def factor(self, in_shape, device="cpu") -> NormResult:
        from lipverify.norms.conv import conv_norm  # lazily: the verifier never runs norm methods

        return conv_norm(self.weight, tuple(in_shape), self.stride, self.pads, self.dilation,
                         self.groups, device=device)

    def describe(self) -> str:
        o, c = self.weight.shape[:2]
        k = "×".join(str(s) for s in self.weight.shape[2:])
        extra = []
        if any(s != 1 for s in self.stride):
            extra.append(f"s{self.stride[0]}")
        if self.groups != 1:
            extra.append(f"g{self.groups}")
        if any(d != 1 for d in self.dilation):
            extra.append(f"d{self.dilation[0]}")
        return f"Conv {c * self.groups}→{o} k{k}" + (" " + " ".join(extra) if extra else "")


class ConvTranspose(LinearOp):
    """ONNX ConvTranspose (1-D/2-D): the unpadded transposed convolution, ``output_padding`` zeros
    appended at the end of each spatial axis, then ``pads`` (ONNX order: begins, then ends) cropped.

    Norm: the unpadded transposed conv is the adjoint of the Conv with the same weight, stride and
    dilation (no padding); appending zeros is an isometry and cropping a projection. When every
    end pad e >= output_padding p, the whole map is exactly the adjoint of the Conv with pads
    (begin, e - p) on this op's output grid, so its norm is that conv's norm (``adjoint_conv``);
    otherwise that conv on the grid shortened by p - e bounds it.
    """

    kind = "ConvTranspose"

    def __init__(self, weight, bias, stride, pads, dilation, groups, output_padding):
        self.weight = weight  # (C_in, C_out // groups, *k)
        self.bias = bias
        self.stride = tuple(int(s) for s in stride)
        self.pads = tuple(int(p) for p in pads)
        self.dilation = tuple(int(d) for d in dilation)
        self.groups = int(groups)
        self.output_padding = tuple(int(p) for p in output_padding)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        nd = self.weight.dim() - 2
        fn = torch.nn.functional.conv_transpose1d if nd == 1 else torch.nn.functional.conv_transpose2d
        y = fn(x, self.weight.to(x.dtype), stride=self.stride, dilation=self.dilation, groups=self.groups)
        pad: list[int] = []
        for i in reversed(range(nd)):
            pad += [0, self.output_padding[i]]
        y = torch.nn.functional.pad(y, pad)
        index = (slice(None), slice(None)) + tuple(
            slice(self.pads[i], y.shape[2 + i] - self.pads[nd + i]) for i in range(nd))
        return y[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _add_channel_bias(self.apply(x), self.bias)

    def magnitude(self, m, x):
        w, self.weight = self.weight, self.weight.abs()
        try:
            y = self.apply(m)
        finally:
            self.weight = w
        return _add_channel_bias(y, None if self.bias is None else self.bias.abs())

    def terms(self, in_shape):
        return int(self.weight.shape[0]) // self.groups * int(self.weight[0, 0].numel()) + 2

    def adjoint_conv(self, out_shape) -> tuple[Conv, tuple[int, ...]]:
        """(conv, its input shape) with ||conv|| >= ||this op|| (equal when every end pad >= output_padding)."""
        nd = self.weight.dim() - 2
        shape = list(out_shape)
        ends = []
        for i in range(nd):
            e, p = self.pads[nd + i], self.output_padding[i]
            ends.append(max(e - p, 0))
            shape[1 + i] -= max(p - e, 0)
        conv = Conv(self.weight, None, self.stride, tuple(self.pads[:nd]) + tuple(ends), self.dilation, self.groups)
        return conv, tuple(shape)

    def factor(self, in_shape, device="cpu") -> NormResult:
        out_shape = tuple(self.apply(torch.zeros((1,) + tuple(in_shape), dtype=torch.float64)).shape[1:])
        conv, shape = self.adjoint_conv(out_shape)
        return conv.factor(shape, device=device)

    def describe(self) -> str:
        c, o = self.weight.shape[0], self.weight.shape[1] * self.groups
        k = "×".join(str(s) for s in self.weight.shape[2:])
        return f"ConvTranspose {c}→{o} k{k}" + (f" s{self.stride[0]}" if any(s != 1 for s in self.stride) else "")


def _add_channel_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y + bias broadcast over the batch and spatial axes (channels on axis 1)."""
    return y if bias is None else y + bias.reshape((1, -1) + (1,) * (y.dim() - 2))
