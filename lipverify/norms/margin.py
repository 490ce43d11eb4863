"""The rounding margin added to every certified number.

Norms are computed in float64 from the stored weights (float32 weights convert to float64
exactly). A backward-stable SVD/eigensolver/Cholesky on an n-dimensional problem errs by at most
a small multiple of n * eps64 relative to the norm. We inflate each certified factor by
``REL_MARGIN_PER_DIM * n * eps64`` (at least ``MIN_REL_MARGIN``), which covers that with a
factor of 1000 to spare. The margin is part of the certificate, not hidden in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS64 = float(np.finfo(np.float64).eps)
REL_MARGIN_PER_DIM = 1000.0
MIN_REL_MARGIN = 1e-10


def relative_margin(dim: int) -> float:
    """Relative inflation applied to a float64 norm computed on a problem of size ``dim``."""
    return max(MIN_REL_MARGIN, REL_MARGIN_PER_DIM * max(int(dim), 1) * EPS64)


def inflate(value: float, dim: int) -> float:
    """Round a computed upper bound outward by the documented margin."""
    value = float(value)
    return value * (1.0 + relative_margin(dim)) + 1e-300


@dataclass
class NormResult:
    """A certified upper bound on an operator norm with a lower estimate beside it."""

    upper: float  # certified (already inflated by the margin)
    lower: float  # a true lower bound / estimate (e.g. power iteration), never above the true norm
    method: str  # how ``upper`` was obtained, e.g. "exact SVD", "FFT symbol bound"

    @property
    def gap(self) -> float:
        return self.upper / self.lower if self.lower > 0 else float("inf")
