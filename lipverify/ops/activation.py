"""Elementwise activations with certified slope bounds [alpha, beta].

phi is slope-restricted in [alpha, beta] when alpha <= (phi(a) - phi(b)) / (a - b) <= beta. For a
continuous, piecewise differentiable phi that is [inf phi', sup phi']. Closed forms where they
exist; otherwise a verified 1-D search (grid minimum/maximum of phi' widened by sup|phi''| * h / 2,
which bounds how far phi' can move between grid points). Every bound is rounded outward.

Decomposed activations (GELU written as Div/Erf/Add/Mul, ...) are recognised by exact templates
(``lipverify.graph.templates``); the constants read from the file become the parameters below, so
the forward pass here computes the file's function and the slopes are those of that function.
These classes are part of what the verifier trusts: keep each forward and its slopes obviously
right (``tests/test_activations.py`` checks every slope interval against difference quotients).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lipverify.ops.base import NormResult, Op

OUTWARD = 1e-12  # outward rounding of closed-form slope bounds (far above float64 error)


def verified_derivative_range(dphi: Callable[[np.ndarray], np.ndarray], d2_bound: float,
                              lo: float = -40.0, hi: float = 40.0, step: float = 1e-5) -> tuple[float, float]:
    """[min, max] of phi' over [lo, hi], widened by d2_bound * step / 2 (so it is a true enclosure).

    Callers must make sure the extremes of phi' lie inside [lo, hi] (true for the functions below:
    phi' is within 1e-15 of its limits outside [-40, 40], and those limits lie inside the range).
    """
    xs = np.arange(lo, hi + step, step, dtype=np.float64)
    d = dphi(xs)
    slack = d2_bound * step / 2 + 1e-12
    return float(d.min() - slack), float(d.max() + slack)


_GELU_MIN = 0.5 * (1 + math.erf(-1.0)) - math.sqrt(2.0) * math.exp(-1.0) / math.sqrt(2 * math.pi)


def _silu_derivative(x: np.ndarray) -> np.ndarray:
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 + x * (1.0 - s))


_SLOPE_CACHE: dict[tuple, tuple[float, float]] = {}


def _cached(key: tuple, compute: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    if key not in _SLOPE_CACHE:
        _SLOPE_CACHE[key] = compute()
    return _SLOPE_CACHE[key]


def _hull(*values: float) -> tuple[float, float]:
    return (min(values) - OUTWARD * (1 + max(abs(v) for v in values)),
            max(values) + OUTWARD * (1 + max(abs(v) for v in values)))


class Activation(Op):
    """Base: subclasses define ``forward`` and ``slopes``; the factor is max(|alpha|, |beta|)."""

    kind = "Activation"
    name = "activation"

    @property
    def slopes(self) -> tuple[float, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    breakpoints: tuple[float, ...] = ()  # where the slope jumps (the self-check probes near them)

    def factor(self, in_shape, device="cpu") -> NormResult:
        a, b = self.slopes
        value = max(abs(a), abs(b))
        return NormResult(upper=value, lower=None, method=f"slopes [{a:.4g}, {b:.4g}]")

    internal: float = 0.0  # magnitude of terms inside phi that cancel (alpha (e^x - 1) in ELU): rounding scale

    def terms(self, in_shape):
        return 32  # the steps of the formula (exp, log1p, erf, divisions), a few ulps each, generously

    def magnitude(self, m, x):
        a, b = self.slopes
        return max(abs(a), abs(b)) * m + self.forward(torch.zeros_like(x[:1])).abs() + self.internal

    def describe(self):
        a, b = self.slopes
        return f"{self.name} [{a:.4g}, {b:.4g}]"


class ReLU(Activation):
    name = "ReLU"
    breakpoints = (0.0,)
    slopes = (0.0, 1.0)

    def forward(self, x):
        return torch.relu(x)


class LeakyReLU(Activation):
    name = "LeakyReLU"
    breakpoints = (0.0,)

    def __init__(self, negative_slope: float = 0.01):
        self.negative_slope = float(negative_slope)

    @property
    def slopes(self):
        return (min(self.negative_slope, 1.0), max(self.negative_slope, 1.0))

    def forward(self, x):
        return torch.where(x >= 0, x, x * self.negative_slope)


class PReLU(Activation):
    """x for x >= 0, slope * x otherwise, with a constant slope tensor broadcast over the sample."""

    name = "PReLU"
    breakpoints = (0.0,)

    def __init__(self, slope: torch.Tensor):
        self.slope = slope  # broadcastable to the per-sample shape, no batch axis

    @property
    def slopes(self):
        s = self.slope.detach().to(torch.float64)
        return (min(float(s.min()), 1.0), max(float(s.max()), 1.0))

    def forward(self, x):
        return torch.where(x >= 0, x, x * self.slope)


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
    breakpoints = (0.0,)

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)

    @property
    def slopes(self):
        # phi'(x) = alpha e^x on x < 0 (between 0 and alpha), 1 on x > 0; continuous at 0
        return (min(0.0, self.alpha), max(1.0, self.alpha))

    @property
    def internal(self):
        return abs(self.alpha)

    def forward(self, x):
        return torch.where(x > 0, x, self.alpha * torch.expm1(torch.clamp(x, max=0.0)))


class CELU(Activation):
    """max(0, x) + min(0, alpha (exp(x / alpha) - 1)), alpha > 0: derivative in (0, 1]."""

    name = "CELU"
    slopes = (0.0, 1.0)

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)

    @property
    def internal(self):
        return abs(self.alpha)

    def forward(self, x):
        return torch.clamp(x, min=0) + torch.clamp(self.alpha * torch.expm1(torch.clamp(x, max=0) / self.alpha), max=0)


class SELU(Activation):
    """gamma x (x > 0), gamma alpha (e^x - 1) (x <= 0): derivative gamma, or gamma alpha e^x in (0, gamma alpha]."""

    name = "SELU"
    breakpoints = (0.0,)

    def __init__(self, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875):
        self.alpha, self.gamma = float(alpha), float(gamma)

    @property
    def slopes(self):
        return _hull(0.0, self.gamma, self.gamma * self.alpha)

    @property
    def internal(self):
        return abs(self.gamma * self.alpha)

    def forward(self, x):
        return self.gamma * torch.where(x > 0, x, self.alpha * torch.expm1(torch.clamp(x, max=0.0)))


class Softplus(Activation):
    """scale * log(1 + exp(beta x)): derivative scale * beta * sigmoid(beta x), between 0 and scale * beta.

    The smooth function. torch's softplus switches to the identity above ``threshold`` (a jump of
    log(1 + e^-t) / beta there); the extraction refuses thresholds whose jump exceeds the float32
    rounding of the output, and below that the two agree up to float32 rounding.
    """

    name = "Softplus"

    def __init__(self, beta: float = 1.0, scale: float | None = None):
        self.beta = float(beta)
        self.scale = 1.0 / self.beta if scale is None else float(scale)

    @property
    def slopes(self):
        return _hull(0.0, self.scale * self.beta)

    def forward(self, x):
        return self.scale * torch.logaddexp(torch.zeros_like(x), self.beta * x)


class GELU(Activation):
    """approximate="none": a x (b + erf(x / c)), GELU for (a, b, c) = (1/2, 1, sqrt 2).
    approximate="tanh": a x (b + tanh(k (x + p x^3))), (a, b, k, p) = (1/2, 1, sqrt(2/pi), 0.044715).

    Erf form: with u = x sqrt2 / c, phi'(x) = a (b - 1) + 2a GELU'(u), whatever c > 0 is, so the slopes are
    a (b - 1) + 2a [m, 1 - m], m = min GELU' = GELU'(-sqrt 2) (GELU'' = phi(u)(2 - u^2) vanishes at
    ±sqrt 2 and GELU'(-u) = 1 - GELU'(u)). Tanh form: a verified search with |phi''| <= 1.1 (the
    standard constants give |phi''| <= 0.8; parameters are only accepted within 1e-6 of them).
    """

    name = "GELU"

    def __init__(self, approximate: str = "none", params: tuple[float, ...] | None = None):
        self.approximate = approximate
        if params is None:
            params = (0.5, 1.0, math.sqrt(2.0)) if approximate != "tanh" else (
                0.5, 1.0, math.sqrt(2.0 / math.pi), 0.044715)
        self.params = tuple(float(p) for p in params)

    @property
    def slopes(self):
        if self.approximate == "tanh":
            return _cached(("gelu_tanh",) + self.params, self._tanh_slopes)
        a, b, _ = self.params
        return _hull(a * (b - 1) + 2 * a * _GELU_MIN, a * (b - 1) + 2 * a * (1 - _GELU_MIN))

    def _tanh_slopes(self):
        a, b, k, p = self.params

        def d(x):
            t = np.tanh(k * (x + p * x ** 3))
            return a * (b + t) + a * x * (1 - t * t) * k * (1 + 3 * p * x * x)

        return verified_derivative_range(d, 1.1)

    def forward(self, x):
        if self.approximate == "tanh":
            a, b, k, p = self.params
            return a * x * (b + torch.tanh(k * (x + p * x * x * x)))
        a, b, c = self.params
        return a * x * (b + torch.erf(x / c))


class SiLU(Activation):
    """a x sigmoid(beta x), a, beta > 0 (SiLU for a = beta = 1): phi'(x) = a SiLU'(beta x).
    SiLU'' = s(1-s)(2 + x(1-2s)) is bounded by 0.5 on R (the verified search's widening)."""

    name = "SiLU"

    def __init__(self, scale: float = 1.0, beta: float = 1.0):
        self.scale, self.beta = float(scale), float(beta)

    @property
    def slopes(self):
        lo, hi = _cached(("silu",), lambda: verified_derivative_range(_silu_derivative, 0.5))
        return (self.scale * lo, self.scale * hi)

    def forward(self, x):
        return self.scale * x * torch.sigmoid(self.beta * x)


def _mish_derivative(x: np.ndarray) -> np.ndarray:
    sp = np.logaddexp(0.0, x)
    t = np.tanh(sp)
    s = 1.0 / (1.0 + np.exp(-x))
    return t + x * (1 - t * t) * s


class Mish(Activation):
    """x tanh(softplus(x)). |Mish''| = |2(1-t^2)s + x s (1-t^2)(...)| <= 2 + 8 max(x e^-2x) + 2/e < 4 on R."""

    name = "Mish"

    @property
    def slopes(self):
        return _cached(("mish",), lambda: verified_derivative_range(_mish_derivative, 4.0))

    def forward(self, x):
        return x * torch.tanh(torch.logaddexp(torch.zeros_like(x), x))


class Softsign(Activation):
    """x / (c + |x|), c > 0: derivative c / (c + |x|)^2 in (0, 1/c]."""

    name = "Softsign"

    def __init__(self, c: float = 1.0):
        self.c = float(c)

    @property
    def slopes(self):
        return _hull(0.0, 1.0 / self.c)

    def forward(self, x):
        return x / (self.c + x.abs())


class Clip(Activation):
    """min(max(x, lo), hi) (ONNX Clip, ReLU6, Hardtanh): slopes [0, 1]."""

    name = "Clip"
    slopes = (0.0, 1.0)

    def __init__(self, lo: float = -math.inf, hi: float = math.inf):
        self.lo, self.hi = float(lo), float(hi)

    @property
    def breakpoints(self):
        return tuple(v for v in (self.lo, self.hi) if math.isfinite(v))

    def forward(self, x):
        # ONNX: min(max(x, lo), hi) (so lo > hi gives hi everywhere)
        return torch.clamp(torch.clamp(x, min=self.lo), max=self.hi)


class HardSigmoid(Activation):
    """max(0, min(1, alpha x + beta)): slopes between 0 and alpha."""

    name = "HardSigmoid"

    def __init__(self, alpha: float = 0.2, beta: float = 0.5):
        self.alpha, self.beta = float(alpha), float(beta)

    @property
    def slopes(self):
        return _hull(0.0, self.alpha)

    @property
    def breakpoints(self):
        return (-self.beta / self.alpha, (1 - self.beta) / self.alpha) if self.alpha else ()

    def forward(self, x):
        return torch.clamp(self.alpha * x + self.beta, 0.0, 1.0)


class HardSwish(Activation):
    """x max(0, min(1, x / 6 + 1/2)): derivative 0 (x < -3), (2x + 3) / 6 on (-3, 3), 1 (x > 3); continuous."""

    name = "HardSwish"
    breakpoints = (-3.0, 3.0)

    @property
    def slopes(self):
        return _hull(-0.5, 1.5)

    def forward(self, x):
        return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


class Abs(Activation):
    name = "Abs"
    breakpoints = (0.0,)
    slopes = (-1.0, 1.0)

    def forward(self, x):
        return x.abs()


ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name.lower(): cls for cls in (ReLU, LeakyReLU, Tanh, Sigmoid, ELU, Softplus, GELU, SiLU, Mish, Softsign,
                                      Clip, HardSigmoid, HardSwish, SELU, CELU, Abs)
}
