"""The rounding margin added to every certified number.

Norms are computed in float64 from the stored weights (float32 weights convert to float64
exactly). A backward-stable SVD/eigensolver/Cholesky on an n-dimensional problem errs by at most
a small multiple of n * eps64 relative to the norm. We inflate each certified factor by
``max(REL_MARGIN_PER_DIM * n, REL_MARGIN_PER_DIM2 * n^2) * eps64`` (at least ``MIN_REL_MARGIN``), which
covers that with a factor of 1000 to spare and leaves room for the verifier's rigorous re-check. The margin is part of the certificate, not hidden in it.
"""

from __future__ import annotations

import numpy as np

from lipverify.ops.base import NormResult  # noqa: F401  (the result type of every norm; defined with the ops)

EPS64 = float(np.finfo(np.float64).eps)
REL_MARGIN_PER_DIM = 1000.0
MIN_REL_MARGIN = 1e-10


REL_MARGIN_PER_DIM2 = 2.0  # the verifier's rigorous Cholesky shift grows like dim^2 eps (~dim^2 eps / 4 measured)


def relative_margin(dim: int) -> float:
    """Relative inflation applied to a float64 norm computed on a problem of size ``dim``: it covers the
    computation's own error and leaves room for the verifier's rigorous check (lipverify.verifier.linalg),
    whose shift for an n x n Gram matrix is about n^2 eps / 4 relative."""
    n = max(int(dim), 1)
    return max(MIN_REL_MARGIN, REL_MARGIN_PER_DIM * n * EPS64, REL_MARGIN_PER_DIM2 * n * n * EPS64)


def inflate(value: float, dim: int) -> float:
    """Round a computed upper bound outward by the documented margin."""
    value = float(value)
    return value * (1.0 + relative_margin(dim)) + 1e-300
