"""Elementwise activations with certified slope bounds [alpha, beta].

phi is slope-restricted in [alpha, beta] when alpha <= (phi(a) - phi(b)) / (a - b) <= beta. For a
differentiable phi that is [inf phi', sup phi']. Closed forms where they exist; otherwise a verified
1-D search (grid minimum/maximum of phi' widened by sup|phi''| * h / 2, which bounds how far phi' can
move between grid points). Every bound is rounded outward.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lipverify.norms.margin import NormResult
from lipverify.ops.base import Op

OUTWARD = 1e-12  # outward rounding of closed-form slope bounds (far above float64 error)


def verified_derivative_range(dphi: Callable[[np.ndarray], np.ndarray], d2_bound: float,
                              lo: float = -40.0, hi: float = 40.0, step: float = 1e-5) -> tuple[float, float]:
    """[min, max] of phi' over [lo, hi], widened by d2_bound * step / 2 (so it is a true enclosure).

    Callers must make sure the extremes of phi' lie inside [lo, hi] (true for the functions below:
    phi'' has its zeros within |x| < 3 and phi' is monotone towards its limits 0 and 1 outside).
    """
    xs = np.arange(lo, hi + step, step, dtype=np.float64)
    d = dphi(xs)
    slack = d2_bound * step / 2 + 1e-12
    return float(d.min() - slack), float(d.max() + slack)


def _gelu_erf_slopes() -> tuple[float, float]:
    # GELU'(x) = Phi(x) + x phi(x); GELU'' = phi(x)(2 - x^2) vanishes at ±sqrt 2 (the extremes);
    # GELU'(-x) = 1 - GELU'(x), so the maximum is 1 - minimum.
    r = math.sqrt(2.0)
    minimum = 0.5 * (1 + math.erf(-r / math.sqrt(2))) - r * math.exp(-1.0) / math.sqrt(2 * math.pi)
    return minimum - OUTWARD, 1.0 - minimum + OUTWARD


def _silu_derivative(x: np.ndarray) -> np.ndarray:
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def _gelu_tanh_derivative(x: np.ndarray) -> np.ndarray:
    c = math.sqrt(2.0 / math.pi)
    u = c * (x + 0.044715 * x**3)
    t = np.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2)


_SLOPE_CACHE: dict[str, tuple[float, float]] = {}


def _cached(name: str, compute: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    if name not in _SLOPE_CACHE:
        _SLOPE_CACHE[name] = compute()
    return _SLOPE_CACHE[name]


class Activation(Op):
    """Base: subclasses define ``forward`` and ``slopes``; the factor is max(|alpha|, |beta|)."""

    kind = "Activation"
    name = "activation"

    @property
    def slopes(self) -> tuple[float, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def factor(self, in_shape, device="cpu") -> NormResult:
        a, b = self.slopes
        value = max(abs(a), abs(b))
        return NormResult(upper=value, lower=None, method=f"slopes [{a:.4g}, {b:.4g}]")

    def describe(self):
        a, b = self.slopes
        return f"{self.name} [{a:.4g}, {b:.4g}]"


class ReLU(Activation):
    name = "ReLU"
    slopes = (0.0, 1.0)

    def forward(self, x):
        return torch.relu(x)


class LeakyReLU(Activation):
    name = "LeakyReLU"

    def __init__(self, negative_slope: float = 0.01):
        self.negative_slope = float(negative_slope)

    @property
    def slopes(self):
        return (min(self.negative_slope, 1.0), max(self.negative_slope, 1.0))

    def forward(self, x):
        return F.leaky_relu(x, self.negative_slope)


class Tanh(Activation):
    name = "Tanh"
    slopes = (0.0, 1.0)

    def forward(self, x):
        return torch.tanh(x)


class Sigmoid(Activation):
    name = "Sigmoid"
    slopes = (0.0, 0.25)

    def forward(self, x):
        return torch.sigmoid(x)


class ELU(Activation):
    name = "ELU"

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)

    @property
    def slopes(self):
        # phi'(x) = alpha e^x on x < 0 (between 0 and alpha), 1 on x > 0
        return (min(0.0, self.alpha), max(1.0, self.alpha))

    def forward(self, x):
        return F.elu(x, self.alpha)


class Softplus(Activation):
    """log(1 + exp(beta x)) / beta: derivative sigmoid(beta x) in (0, 1)."""

    name = "Softplus"
    slopes = (0.0, 1.0)

    def __init__(self, beta: float = 1.0):
        self.beta = float(beta)

    def forward(self, x):
        return F.softplus(x, beta=self.beta)


class GELU(Activation):
    name = "GELU"

    def __init__(self, approximate: str = "none"):
        self.approximate = approximate

    @property
    def slopes(self):
        if self.approximate == "tanh":
            # |d2| <= 1 on R (loose but safe for the widening term)
            return _cached("gelu_tanh", lambda: verified_derivative_range(_gelu_tanh_derivative, 1.0))
        return _gelu_erf_slopes()

    def forward(self, x):
        return F.gelu(x, approximate=self.approximate)


class SiLU(Activation):
    """x * sigmoid(x). SiLU'' = s(1-s)(2 + x(1-2s)) is bounded by 0.5 on R."""

    name = "SiLU"

    @property
    def slopes(self):
        return _cached("silu", lambda: verified_derivative_range(_silu_derivative, 0.5))

    def forward(self, x):
        return F.silu(x)


ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name.lower(): cls for cls in (ReLU, LeakyReLU, Tanh, Sigmoid, ELU, Softplus, GELU, SiLU)
}
