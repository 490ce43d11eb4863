"""Convolutions (1-D and 2-D) with stride, asymmetric zero padding, dilation and groups."""

from __future__ import annotations

import torch

from lipverify.norms.conv import conv_apply, conv_norm
from lipverify.norms.margin import NormResult
from lipverify.ops.base import LinearOp


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
        y = self.apply(x)
        if self.bias is not None:
            y = y + self.bias.reshape((1, -1) + (1,) * (y.dim() - 2))
        return y

    def factor(self, in_shape, device="cpu") -> NormResult:
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
