"""Rigorous positive-semidefiniteness and norm checks by Cholesky factorization in float64.

``proves_psd(h, error)`` is True only if every symmetric (Hermitian) H with ||H - h||_2 <= error is
positive semidefinite. Why: a Cholesky factorization that runs to completion on a floating-point
matrix A returns R with R^T R = A + dA, |dA| <= gamma_{k+1} |R^T||R| (Higham, Accuracy and
Stability, Thm 10.3), so ||dA||_2 <= gamma_{k+1} ||R||_F^2 = gamma_{k+1} trace(A + dA). We factor
A = fl(h - s I) with a shift s that covers ``error``, that backward error and the rounding of the
shift itself; success gives h - s I + dA >= 0 and so H >= 0.

``norm_at_most(A, c)`` proves ||A||_2 <= c from H = c^2 I - A^T A (the smaller Gram side), adding
the error of forming the Gram matrix in float64: |fl(A^T A) - A^T A| <= gamma_p |A|^T |A|
entrywise, and || |A|^T |A| ||_2 = || |A| ||_2^2 <= min(||A||_F^2, ||A||_1 ||A||_inf).
Both work on batches (every matrix must pass) and on complex matrices (constants doubled twice).
"""

from __future__ import annotations

import math

import torch

from lipverify.verifier.numbers import EPS

SAFETY = 1.05  # on top of the worst-case constants (covers their own rounding)


def gamma(n: int, complex_: bool = False) -> float:
    """gamma_n = n u / (1 - n u), u = EPS / 2 (times 4 for complex arithmetic)."""
    nu = n * EPS / 2 * (4.0 if complex_ else 1.0)
    return nu / (1 - nu) if nu < 0.5 else math.inf


def proves_psd(h: torch.Tensor, error=0.0) -> bool:
    """True only if every Hermitian H with ||H - h||_2 <= error is PSD. ``error`` may be a tensor
    with the batch shape of ``h``."""
    k = h.shape[-1]
    cplx = h.is_complex()
    err = torch.as_tensor(error, dtype=torch.float64, device=h.device)
    asym = (h - h.mH).abs().amax((-2, -1)) * k  # ||h - sym(h)||_2 <= k max|entry|; sym rounding likewise
    hs = (h + h.mH) / 2
    diag = torch.diagonal(hs, dim1=-2, dim2=-1).real
    g = gamma(k + 1, cplx)
    err = err + asym + EPS * k * hs.abs().amax((-2, -1))
    shift = SAFETY * (err + g * diag.clamp_min(0).sum(-1) * (1 + 2 * g) + 2 * EPS * diag.abs().amax(-1)) + 1e-300
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    _, info = torch.linalg.cholesky_ex(hs - shift[..., None, None] * eye)
    return bool((info == 0).all())


def gram_error(a: torch.Tensor, inner: int) -> torch.Tensor:
    """Bound on ||fl(A^H A) - A^H A||_2 per matrix, for the inner dimension ``inner`` of the product."""
    absa = a.abs()
    fro2 = (absa * absa).sum((-2, -1))
    one_inf = absa.sum(-2).amax(-1) * absa.sum(-1).amax(-1)
    return gamma(inner, a.is_complex()) * torch.minimum(fro2, one_inf) * SAFETY


def norm_at_most(matrix: torch.Tensor, bound) -> bool:
    """True only if ||A||_2 <= bound for A (or every matrix of a batch); real or complex."""
    if isinstance(bound, bool):
        return False
    bound = float(bound)
    if not (math.isfinite(bound) and bound >= 0):
        return False
    a = matrix.to(torch.complex128 if matrix.is_complex() else torch.float64)
    if a.numel() == 0:
        return True
    if not bool(torch.isfinite(a).all()):
        return False
    if bound == 0.0:  # a zero bound holds only for the zero map
        return not bool(a.any())
    # scale A and the bound by the same power of two (exact) so that squares neither overflow nor underflow
    top = float(a.abs().max())
    if top == 0.0:
        return True
    k = -math.frexp(max(top, bound))[1]
    a, bound = a * math.ldexp(1.0, k), math.ldexp(bound, k)
    if bound * bound == 0.0 or not math.isfinite(bound * bound):
        return False  # the bound is negligible against the matrix (or the matrix against the bound)
    rows, cols = a.shape[-2], a.shape[-1]
    gram, inner = (a @ a.mH, cols) if rows <= cols else (a.mH @ a, rows)
    c2 = bound * bound * (1 - 2 * EPS)  # below the exact square
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    h = c2 * eye - gram
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).real.abs().amax(-1)
    error = gram_error(a, inner) + EPS * (c2 + diag)  # forming the Gram matrix and the diagonal of h
    return proves_psd(h, error)
