"""Pooling: average pooling (a linear map), max pooling (1-Lipschitz per window), global means.

Both pools are written as "sum over a sliding window" on an explicitly padded input, so ONNX's
asymmetric pads, ceil_mode, dilations and count_include_pad all reduce to one code path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lipverify.ops.base import LinearOp, NormResult, Op


def _torch_pads(onnx_pads: tuple[int, ...]) -> tuple[int, ...]:
    """ONNX (b0, b1, .., e0, e1, ..) -> torch F.pad order (last axis first: b_last, e_last, ...)."""
    n = len(onnx_pads) // 2
    out: list[int] = []
    for axis in reversed(range(n)):
        out += [onnx_pads[axis], onnx_pads[axis + n]]
    return tuple(out)


class _Window:
    """Geometry shared by the pools: kernel, strides, pads (ONNX order), dilations, ceil_mode."""

    def __init__(self, kernel, stride, pads, dilation, ceil_mode):
        self.kernel = tuple(int(k) for k in kernel)
        self.stride = tuple(int(s) for s in stride)
        self.pads = tuple(int(p) for p in pads)
        self.dilation = tuple(int(d) for d in dilation)
        self.ceil_mode = bool(ceil_mode)

    def padded_pads(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Pads (ONNX order) extended at the end so that ceil_mode windows fit in the padded input."""
        n = len(spatial)
        begins, ends = list(self.pads[:n]), list(self.pads[n:])
        if self.ceil_mode:
            for d in range(n):
                eff = (self.kernel[d] - 1) * self.dilation[d] + 1
                total = spatial[d] + begins[d] + ends[d]
                out = math.ceil((total - eff) / self.stride[d]) + 1
                # torch/ONNX rule: the last window must start inside the input or left padding
                if (out - 1) * self.stride[d] >= spatial[d] + begins[d]:
                    out -= 1
                need = (out - 1) * self.stride[d] + eff
                ends[d] += max(0, need - total)
        return tuple(begins + ends)

    def window_sum(self, x: torch.Tensor, pads: tuple[int, ...]) -> torch.Tensor:
        """Sum of each window (depthwise conv with a kernel of ones) on a zero-padded input."""
        channels = x.shape[1]
        ones = torch.ones((channels, 1) + self.kernel, dtype=x.dtype, device=x.device)
        xp = F.pad(x, _torch_pads(pads))
        conv = F.conv1d if len(self.kernel) == 1 else F.conv2d
        return conv(xp, ones, stride=self.stride, dilation=self.dilation, groups=channels)


class AvgPool(LinearOp):
    """ONNX AveragePool: y = diag(1/count) · (window sums). ||y|| ≤ max(1/count) · ||window-sum map||."""

    kind = "AvgPool"

    def __init__(self, kernel, stride, pads, dilation=None, ceil_mode=False, count_include_pad=False):
        dilation = dilation or (1,) * len(kernel)
        self.window = _Window(kernel, stride, pads, dilation, ceil_mode)
        self.count_include_pad = bool(count_include_pad)

    def _counts(self, spatial, dtype, device):
        pads = self.window.padded_pads(spatial)
        n = len(spatial)
        ones = torch.ones((1, 1) + tuple(spatial), dtype=dtype, device=device)
        if self.count_include_pad:
            # declared pads count as elements, ceil_mode overflow does not
            ones = F.pad(ones, _torch_pads(self.window.pads), value=1.0)
            extra = tuple([0] * n + [p - q for p, q in zip(pads[n:], self.window.pads[n:])])
            return self.window.window_sum(ones, extra)
        return self.window.window_sum(ones, pads)

    def apply(self, x):
        spatial = tuple(x.shape[2:])
        sums = self.window.window_sum(x, self.window.padded_pads(spatial))
        return sums / self._counts(spatial, x.dtype, x.device)

    def terms(self, in_shape):
        return math.prod(self.window.kernel) + 2  # the window's sum (see Dense.terms), the division

    def factor(self, in_shape, device="cpu") -> NormResult:
        # lazily: the verifier runs ops but never their norm methods
        from lipverify.norms.conv import conv_norm
        from lipverify.norms.margin import inflate

        spatial = tuple(in_shape[1:])
        counts = self._counts(spatial, torch.float64, device)
        inv_max = float((1.0 / counts).max())
        inv_min = float((1.0 / counts).min())
        ones = torch.ones((1, 1) + self.window.kernel, dtype=torch.float64)
        sum_norm = conv_norm(ones, (1,) + spatial, self.window.stride,
                             self.window.padded_pads(spatial), self.window.dilation, 1, device=device)
        exact = inv_max == inv_min
        return NormResult(upper=inflate(inv_max * sum_norm.upper, 2),
                          lower=inv_min * sum_norm.lower,
                          method=("exact " if exact else "bound ") + f"(window sums: {sum_norm.method})")

    def describe(self):
        return f"AvgPool k{'×'.join(map(str, self.window.kernel))} s{self.window.stride[0]}"


class MaxPool(Op):
    """ONNX MaxPool. |max a − max b| ≤ ||a − b||_window, so ||Δy||² ≤ (max windows per input) ||Δx||²."""

    kind = "MaxPool"

    def __init__(self, kernel, stride, pads, dilation=None, ceil_mode=False):
        dilation = dilation or (1,) * len(kernel)
        self.window = _Window(kernel, stride, pads, dilation, ceil_mode)

    def forward(self, x):
        spatial = tuple(x.shape[2:])
        xp = F.pad(x, _torch_pads(self.window.padded_pads(spatial)), value=float("-inf"))
        pool = F.max_pool1d if len(spatial) == 1 else F.max_pool2d
        return pool(xp, self.window.kernel, self.window.stride, 0, self.window.dilation)

    def factor(self, in_shape, device="cpu") -> NormResult:
        from lipverify.norms.margin import inflate  # lazily: the verifier never runs norm methods

        spatial = tuple(in_shape[1:])
        # how many windows contain each input position = adjoint of the window-sum map applied to ones
        x = torch.zeros((1, 1) + spatial, dtype=torch.float64, requires_grad=True)
        sums = self.window.window_sum(x, self.window.padded_pads(spatial))
        (counts,) = torch.autograd.grad(sums.sum(), x)
        worst = float(counts.max())
        value = math.sqrt(worst)
        return NormResult(upper=inflate(value, 2), lower=1.0 if worst >= 1 else 0.0,
                          method=f"sqrt(max windows per input = {worst:.0f})")

    def describe(self):
        return f"MaxPool k{'×'.join(map(str, self.window.kernel))} s{self.window.stride[0]}"


class Reduce(LinearOp):
    """Mean (GlobalAveragePool, ReduceMean) or sum over per-sample ``axes``; exact norm."""

    kind = "Reduce"

    def __init__(self, axes: tuple[int, ...], keepdims: bool, mean: bool = True):
        self.axes = tuple(sorted(int(a) for a in axes))  # per-sample axes (batch excluded)
        self.keepdims = bool(keepdims)
        self.mean = bool(mean)

    def apply(self, x):
        dims = tuple(a + 1 for a in self.axes)
        out = x.sum(dim=dims, keepdim=self.keepdims)
        if self.mean:
            out = out / math.prod(x.shape[d] for d in dims)
        return out

    def terms(self, in_shape):
        return math.prod(int(in_shape[a]) for a in self.axes) + 2

    def factor(self, in_shape, device="cpu") -> NormResult:
        from lipverify.norms.margin import inflate  # lazily: the verifier never runs norm methods

        n = math.prod(in_shape[a] for a in self.axes)
        # mean of n entries: the row (1/n,...,1/n) has norm 1/sqrt(n); a sum has sqrt(n)
        value = 1.0 / math.sqrt(n) if self.mean else math.sqrt(n)
        return NormResult(upper=inflate(value, 2), lower=value * (1 - 1e-15), method="exact")

    def describe(self):
        return ("Mean" if self.mean else "Sum") + f" over axes {self.axes}"
