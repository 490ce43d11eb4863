"""Compositional (layer-by-layer) LipSDP certificate in closed form, sound for ANY slopes.

ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024) eliminates the LipSDP matrix block by block from
the input side with one scalar multiplier per layer chosen in closed form. Its published
recurrence only uses the mean slope (alpha + beta)/2 and drops the alpha beta W^T T W term, which
is unsound when alpha < 0 (GELU, SiLU). Derived here from the exact Schur recursion instead:

With T_k = lambda_k I and rho = 1 (everything is homogeneous, rho is rescaled at the end), the
forward Schur complements of A(1, T) are Sigma_k = P_k + p_k lambda_k W_k^T W_k (p = 2 alpha beta)
and P_{k+1} = 2 lambda_k I - s_k^2 lambda_k^2 W_k Sigma_k^{-1} W_k^T (s = alpha + beta), P_0 = I.
By the push-through identity W Sigma^{-1} W^T = B (I + p lambda B)^{-1} with B = W P^{-1} W^T,
so P_{k+1} = h(B), h(mu) = 2 lambda - s^2 lambda^2 mu / (1 + p lambda mu), decreasing in mu;
Sigma_k > 0 iff 1 + p lambda mu_max > 0. The lambda maximising lambda_min(P_{k+1}) = h(mu_max) is
lambda = u / mu_max with u = 1 / (2 d (|c| + d)), c = (alpha + beta)/2, d = (beta - alpha)/2 (the
loop transformation's centre and radius: phi = c id + d psi, psi slope-restricted in [-1, 1]);
then 1 + p u = |c| / d > 0 for every slope interval with c != 0, and
lambda_min(P_{k+1}) = 1 / ((|c| + d)^2 mu_max) = lambda_min(P_k)-ish / (K^2 ||W_k||^2) with
K = max(|alpha|, |beta|), so the bound never exceeds the product of norms. For ReLU (c = d = 1/2)
this is ECLipsE-Fast's choice lambda = 1 / mu_max. Finally A(c, c T) >= 0 iff
c P_l >= W_l^T W_l, i.e. L^2 <= c = ||W_l P_l^{-1/2}||^2.

The result is a LipSDP-Layer-feasible (rho, T): certified by the same float64 block-Cholesky proof
(``lipverify.verifier.compositional``), and the warm start of the LipSDP solvers.
"""

from __future__ import annotations

import math

import torch

from lipverify.bounds.lipsdp_blocks import F64, reduce_input


def slope_u(alpha: float, beta: float) -> float:
    """lambda * mu_max for the slope interval [alpha, beta] (see the module docstring)."""
    c, d = (alpha + beta) / 2.0, (beta - alpha) / 2.0
    if abs(c) <= 1e-12 * d:  # c = 0: the optimum sits on Sigma's boundary; stay halfway inside
        return 0.25 / (d * d)
    return 1.0 / (2.0 * d * (abs(c) + d))


def compositional(weights, slopes, device="cpu", cache: dict | None = None) -> tuple[list[float], float]:
    """(t, rho): multipliers T_k = t_k I and rho with A(rho, T) >= 0 up to rounding (rho = rho*(T)).

    ``weights`` [W_0..W_l] (out, in), ``slopes`` one (alpha, beta) per hidden layer. The forward pass
    over the hidden layers does not involve W_l: with a ``cache`` (keyed by the hidden layers) every
    last layer (e.g. the C(C-1)/2 logit differences of pairwise radii) reuses it and costs one
    triangular solve. Raises ValueError when a Schur complement is not positive definite in floating
    point (degenerate weights, e.g. a zero layer)."""
    key = _hidden_key(weights, slopes)
    if cache is not None and key in cache:
        lambdas, L = cache[key]
    else:
        lambdas, L = _forward(weights, slopes, device)
        if cache is not None:
            cache[key] = (lambdas, L)
    Wl = torch.as_tensor(weights[-1]).to(device=L.device, dtype=F64)
    Y = torch.linalg.solve_triangular(L, Wl.T, upper=False)  # L^{-1} W_l^T: ||W_l L^{-T}||^2
    rho = float(torch.linalg.matrix_norm(Y, 2)) ** 2
    if rho == 0.0:  # W_l = 0: a constant map; (c, c lambda) certifies c for any c > 0, take a tiny one
        rho = 1e-200
    return [rho * lam for lam in lambdas], rho


def _hidden_key(weights, slopes) -> str:
    import hashlib

    h = hashlib.sha1(repr([tuple(s) for s in slopes]).encode())
    for w in weights[:-1]:
        h.update(torch.as_tensor(w).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _forward(weights, slopes, device):
    """The recursion over the hidden layers: lambdas (at rho = 1) and the Cholesky factor of P_l."""
    dev = torch.device(device)
    ws = [torch.as_tensor(w).to(device=dev, dtype=F64) for w in weights[:-1]]
    ws[0] = reduce_input(ws[0])
    l = len(ws)
    P = torch.eye(ws[0].shape[1], dtype=F64, device=dev)
    lambdas = []
    for k in range(l):
        a, b = slopes[k]
        p, s = 2.0 * a * b, a + b
        W = ws[k]
        L = _chol(P, k)
        X = torch.linalg.solve_triangular(L, W.T, upper=False)  # L^{-1} W^T
        B = X.T @ X  # W P^{-1} W^T
        B = (B + B.T) / 2
        mu = float(torch.linalg.eigvalsh(B)[-1])
        if not math.isfinite(mu):
            raise ValueError(f"layer {k} overflows (mu = {mu})")
        # a zero layer (mu = 0) makes everything after it constant: any lambda > 0 keeps P positive
        lam = slope_u(a, b) / mu if mu > 0 else 1.0
        n = B.shape[0]
        eye = torch.eye(n, dtype=F64, device=dev)
        if p != 0.0:
            # W Sigma^{-1} W^T = B (I + p lam B)^{-1} (they commute: symmetric result)
            G = torch.linalg.solve(eye + p * lam * B, B)
            G = (G + G.T) / 2
        else:
            G = B
        P = 2.0 * lam * eye - (s * lam) ** 2 * G
        lambdas.append(lam)
    return lambdas, _chol(P, l)


def _chol(P, k):
    L, info = torch.linalg.cholesky_ex((P + P.T) / 2)
    if int(info) != 0:
        raise ValueError(f"the Schur complement at layer {k} is not positive definite in floating point")
    return L
