"""Dense maps: Gemm, MatMul with a constant, Linear; and per-element scalings and shifts."""

from __future__ import annotations

import torch

from lipverify.ops.base import LinearOp, NormResult, Op


class Dense(LinearOp):
    """y = x W^T (+ b), acting on the last axis of each sample (so ``(..., in) -> (..., out)``).

    On a per-sample shape (..., in) the map is I ⊗ W, whose operator norm is ||W||_2.
    """

    kind = "Dense"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight  # (out, in)
        self.bias = bias  # (out,) or None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply(x)
        return y if self.bias is None else y + self.bias

    def factor(self, in_shape, device="cpu") -> NormResult:
        from lipverify.norms.dense import dense_norm  # lazily: the verifier never runs norm methods

        return dense_norm(self.weight, device=device)

    def magnitude(self, m, x):
        y = m @ self.weight.abs().T
        return y if self.bias is None else y + self.bias.abs()

    def terms(self, in_shape):
        return int(self.weight.shape[1]) + 2  # n products and sums: gamma_n = n eps/2, twice over; the bias

    def describe(self) -> str:
        return f"Dense {self.weight.shape[1]}→{self.weight.shape[0]}"


class LeftMatMul(LinearOp):
    """y = A x for a constant matrix A acting on the second-to-last axis of each sample
    ((..., n, k) -> (..., m, k); ONNX MatMul with the constant on the left). The map is A ⊗ I: norm ||A||_2."""

    kind = "LeftMatMul"

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix  # (m, n)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.matrix.to(x.dtype), x)

    def factor(self, in_shape, device="cpu") -> NormResult:
        from lipverify.norms.dense import dense_norm  # lazily: the verifier never runs norm methods

        return dense_norm(self.matrix, device=device)

    def magnitude(self, m, x):
        return torch.matmul(self.matrix.abs().to(m.dtype), m)

    def terms(self, in_shape):
        return int(self.matrix.shape[1]) + 2

    def describe(self) -> str:
        return f"LeftMatMul {self.matrix.shape[1]}→{self.matrix.shape[0]}"


class Scale(LinearOp):
    """Elementwise multiplication by a constant tensor broadcast over the per-sample shape.

    Comes from BatchNorm's scale, input normalization (x / σ), Mul/Div/Neg by constants.
    A diagonal map: its norm is max |scale| exactly.
    """

    kind = "Scale"

    def __init__(self, scale: torch.Tensor):
        self.scale = scale  # broadcastable to the per-sample shape (no batch axis)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def magnitude(self, m, x):
        return m * self.scale.abs()

    def factor(self, in_shape, device="cpu") -> NormResult:
        value = float(self.scale.abs().max()) if self.scale.numel() else 0.0
        # exact up to the float64 rounding of the stored constant: inflate by a few ulps
        return NormResult(upper=value * (1 + 1e-15) , lower=value, method="exact (max |scale|)")

    def describe(self) -> str:
        return f"Scale {tuple(self.scale.shape)}"


class Shift(Op):
    """x + c for a constant c (bias Add, BatchNorm's offset, input mean subtraction). Factor 1."""

    kind = "Shift"

    def __init__(self, shift: torch.Tensor, terms_magnitude: torch.Tensor | None = None):
        self.shift = shift
        # a constant the file computes from several terms (BatchNorm's beta - mean * scale, in float32) is
        # rounded at the scale of those terms, which can be far above |shift| when they cancel
        self.terms_magnitude = terms_magnitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift

    def magnitude(self, m, x):
        return m + (self.shift.abs() if self.terms_magnitude is None else self.terms_magnitude)

    def factor(self, in_shape, device="cpu") -> NormResult:
        return NormResult(upper=1.0, lower=1.0, method="exact (translation)")
