"""Operator norm of a dense matrix: exact (SVD) in float64, with a Gram-iteration fallback for huge matrices."""

from __future__ import annotations

import torch

from lipverify.norms.margin import NormResult, inflate

# Above this smaller dimension a full SVD is slow; Gram iteration still gives a guaranteed bound.
EXACT_MAX_DIM = 4096


def gram_iteration_upper(matrix: torch.Tensor, iters: int = 12) -> float:
    """Guaranteed upper bound on sigma_max(matrix) (Delattre et al. 2023).

    sigma_1(A)^(2^t) = sigma_1(G_t) <= ||G_t||_F with G_0 = A, G_{t+1} = G_t^H G_t. We rescale each
    step by the Frobenius norm to avoid overflow and track the scale in log space.
    """
    g = matrix.to(torch.float64) if not matrix.is_complex() else matrix.to(torch.complex128)
    log_scale = 0.0
    for t in range(iters):
        fro = torch.linalg.matrix_norm(g, ord="fro")
        if fro == 0:
            return 0.0
        log_scale = 2.0 * (log_scale + float(torch.log(fro)))  # scale carried to the next power
        g = g / fro
        g = g.mH @ g
    bound_log = (log_scale / 2 ** iters) + float(torch.log(torch.linalg.matrix_norm(g, ord="fro"))) / 2 ** iters
    return float(torch.exp(torch.tensor(bound_log, dtype=torch.float64)))


def power_iteration(matrix: torch.Tensor, iters: int = 100, seed: int = 0) -> float:
    """Lower estimate ||A v|| / ||v|| (never above the true norm)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = matrix.to(torch.float64)
    v = torch.randn(a.shape[1], generator=gen, dtype=torch.float64).to(a.device)
    for _ in range(iters):
        v = a.T @ (a @ v)
        n = torch.linalg.vector_norm(v)
        if n == 0:
            return 0.0
        v = v / n
    return float(torch.linalg.vector_norm(a @ v))


def dense_norm(weight: torch.Tensor, device: str = "cpu") -> NormResult:
    """Certified ||W||_2: exact SVD in float64 when affordable, else Gram iteration."""
    w = weight.detach().to(device=device, dtype=torch.float64)
    if w.numel() == 0:
        return NormResult(0.0, 0.0, "empty")
    dim = max(w.shape)
    if min(w.shape) <= EXACT_MAX_DIM:
        sigma = float(torch.linalg.svdvals(w)[0])
        return NormResult(upper=inflate(sigma, dim), lower=sigma * (1 - 1e-12), method="exact SVD")
    upper = gram_iteration_upper(w)
    return NormResult(upper=inflate(upper, dim), lower=power_iteration(w), method="Gram iteration")
