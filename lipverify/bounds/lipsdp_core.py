"""LipSDP-Neuron / LipSDP-Layer for dense chains: a fast barrier solver and an independent verifier.

Network: ``x_{k+1} = phi_k(W_k x_k)`` for hidden layers ``k = 0..l-1``, ``f(x) = W_l x_l``; weights
``W_k`` have shape (out, in); hidden layer ``k`` is slope-restricted in ``[alpha_k, beta_k]`` with
``alpha_k < beta_k`` (alpha may be negative, e.g. GELU). Biases never matter.

The LMI (Fazlyab et al. 2019), written with ``c = (alpha+beta)/2``, ``d = (beta-alpha)/2``: a
neuron ``x = phi(v)`` with multiplier ``t >= 0`` contributes the quadratic form
``2 t [d^2 dv^2 - (dx - c dv)^2]``  (= ``t * [dv;dx]^T [[-2ab, a+b],[a+b, -2]] [dv;dx]``), and
``L^2 <= rho`` is certified by ``A(rho, T) := -M(rho, T) >= 0`` where, over ``z = (x_0, .., x_l)``,

    z^T A z = rho |x_0|^2 - |W_l x_l|^2 + sum_k 2 sum_i t_{k,i} [(x_{k+1} - c_k W_k x_k)_i^2 - d_k^2 (W_k x_k)_i^2].

``A`` is block tridiagonal (blocks = layers):

    A[0,0]   = rho I + 2 a_0 b_0 W_0^T T_0 W_0
    A[k,k]   = 2 T_{k-1} + 2 a_k b_k W_k^T T_k W_k          (1 <= k <= l-1)
    A[l,l]   = 2 T_{l-1} - W_l^T W_l
    A[k,k+1] = -2 c_k W_k^T T_k                            (0 <= k <= l-1)

Loop transformation. ``phi = c id + d psi`` with ``psi`` slope-restricted in [-1, 1]; in the
coordinates ``(x_0, psi_0, .., psi_{l-1})`` the same quadratic form reads
``rho|x_0|^2 - |W_l x_l|^2 + sum_k 2 d_k^2 (psi_k^T T_k psi_k - v_k^T T_k v_k)`` with
``x_{k+1} = c_k W_k x_k + d_k psi_k``. The change of variables is lower block-triangular with
diagonal blocks ``I, d_0 I, ..``: the loop-transformed LMI is ``J^T A J`` (a congruence), so both
certify exactly the same (rho, T). But ``x_k`` then depends on *all* earlier ``psi_j`` (the ``c v``
term makes every layer a skip connection), so for ``l >= 2`` hidden layers with ``c != 0`` the
loop-transformed matrix is dense, not block tridiagonal. We therefore solve and certify with the
plain (tridiagonal) form, and provide the loop form (``lmi_matrix(..., form="loop")``) only as an
exactly equivalent dense matrix, used by tests and the cvxpy reference to show equality.

Fast path (``_lipsdp_fast``, torch, CPU or CUDA): a primal log-barrier interior-point method on
the multipliers with exact Newton steps (dense Hessian of -log det A over all neurons, assembled from
A^{-1}), the input block shrunk to rank(W_0) by a QR (exact congruence), and rho eliminated in closed
form from the eigenvalues of the input-block Schur complement. ~40-80 Newton steps reach a 1e-6
relative gap; plain gradient methods stall on deep nets because the optimum sits in a curved valley.

Soundness: whatever the solver returns is a candidate ``T``. ``repair`` computes the smallest rho
for that T by a direct formula and ``verify_lipsdp`` accepts it only if a float64 block Cholesky
of ``A(rho, T) - delta diag(s)`` succeeds, where ``s_i`` is a row scale with
``|A_ij| <= sqrt(s_i s_j)`` (s = rho / 2t plus the absolute W^T T W and W_l^T W_l diagonals) and
``delta = max(1e-9, 2 n^2 eps)``. Rounding in forming A is ``<= m eps sqrt(s_i s_j)`` entrywise and a
(backward-stable) Cholesky succeeds with backward error ``|E_ij| <= (n+1) eps sqrt(a_ii a_jj)``, so
``||diag(s)^-1/2 E diag(s)^-1/2||_2 <= n (n+1) eps < delta``: success proves ``A >= 0`` exactly.
A shift proportional to each row's own scale (not to ||A||) keeps tiny multipliers meaningful. The reported value is
``inflate(sqrt(rho_verified), n)`` (lipverify.norms.margin).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lipverify.norms.margin import EPS64, inflate

VERIFY_MARGIN_REL = 1e-9
_MU_FACTOR = 8.0  # barrier parameter growth per outer iteration


@dataclass
class LipSDPResult:
    value: float  # CERTIFIED L = sqrt(rho), inflated by the margin; only from a verified (rho, T)
    rho: float  # verified rho
    T: list = field(default_factory=list)  # per hidden layer multiplier diagonals (float64): the witness
    mode: str = "neuron"
    solver: str = "fast"
    check: str = ""  # which verification passed
    raw_value: float = float("nan")  # the solver's unverified sqrt(rho)
    raw_violation: float = float("nan")  # lambda_max of the raw solver's M (>0: raw answer infeasible)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# problem data. All dense linear algebra goes through torch (float64, CPU for verification):
# torch honours torch.set_num_threads, while numpy's threaded OpenBLAS was 100x slower on the
# shared 2-core machine (thread oversubscription).
# --------------------------------------------------------------------------------------------

def _tt(a):
    if isinstance(a, torch.Tensor):
        return a.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _prepare(weights, slopes):
    """float64 CPU torch weights + per-hidden-layer (alpha, beta); validates shapes and slopes."""
    ws = [_tt(w) for w in weights]
    if len(ws) < 2:
        raise ValueError("LipSDP needs at least one hidden layer (two weight matrices)")
    for k in range(len(ws)):
        if ws[k].ndim != 2 or (k > 0 and ws[k].shape[1] != ws[k - 1].shape[0]):
            raise ValueError(f"weight {k} has shape {tuple(ws[k].shape)}, expected (*, {ws[k - 1].shape[0]})")
        if not bool(torch.isfinite(ws[k]).all()):
            raise ValueError("non-finite weight")
    nh = len(ws) - 1
    if len(slopes) == 2 and np.isscalar(slopes[0]):
        slopes = [tuple(slopes)] * nh
    if len(slopes) != nh:
        raise ValueError(f"need {nh} slope pairs, got {len(slopes)}")
    sl = []
    for a, b in slopes:
        a, b = float(a), float(b)
        if not (np.isfinite(a) and np.isfinite(b)) or not a < b:
            raise ValueError(f"slope interval [{a}, {b}] must satisfy alpha < beta (fold linear layers first)")
        sl.append((a, b))
    return ws, sl


def _coeffs(sl):
    """(2 alpha beta, -(alpha + beta)) per hidden layer: A's coefficients (see module docstring)."""
    return [(2.0 * a * b, -(a + b)) for a, b in sl]


def dims(weights):
    return [int(weights[0].shape[1])] + [int(w.shape[0]) for w in weights[:-1]]


def _blocks(ws, sl, T, rho):
    """Diagonal blocks D[0..l] of A = -M (D[0] is None when it is exactly rho*I) and couplings C[k] = A[k,k+1]."""
    l = len(ws) - 1
    co = _coeffs(sl)
    D, C = [], []
    for k in range(l + 1):
        n = ws[k].shape[1]
        if k == 0:
            blk = None if co[0][0] == 0.0 else rho * torch.eye(n, dtype=torch.float64)
        else:
            blk = torch.diag(2.0 * T[k - 1])
        if k < l and co[k][0] != 0.0:
            q = co[k][0] * (ws[k].T * T[k]) @ ws[k]
            blk = q if blk is None else blk + q
        if k == l:
            blk = blk - ws[l].T @ ws[l]
        D.append(blk)
        if k < l:
            C.append(co[k][1] * (ws[k].T * T[k]))
    return D, C


def _T(T):
    return [_tt(t).reshape(-1) for t in T]


def lmi_matrix(weights, slopes, T, rho, form="plain"):
    """Dense M(rho, T) as numpy (the LMI is M <= 0). ``form="loop"``: the loop-transformed J^T M J.

    For tests, the cvxpy reference and small nets only (dense, size = sum of layer widths).
    """
    ws, sl = _prepare(weights, slopes)
    D, C = _blocks(ws, sl, _T(T), float(rho))
    ns = dims(ws)
    off = np.concatenate([[0], np.cumsum(ns)]).astype(int)
    A = torch.zeros(int(off[-1]), int(off[-1]), dtype=torch.float64)
    for k, blk in enumerate(D):
        s = slice(off[k], off[k + 1])
        A[s, s] = float(rho) * torch.eye(ns[0], dtype=torch.float64) if blk is None else blk
    for k, c in enumerate(C):
        A[off[k]:off[k + 1], off[k + 1]:off[k + 2]] = c
        A[off[k + 1]:off[k + 2], off[k]:off[k + 1]] = c.T
    M = (-A).numpy()
    if form == "plain":
        return M
    if form != "loop":
        raise ValueError(form)
    J = loop_jacobian(ws, sl)
    return J.T @ M @ J


def loop_jacobian(weights, slopes):
    """J with (x_0, x_1, .., x_l) = J (x_0, psi_0, .., psi_{l-1}), x_{k+1} = c_k W_k x_k + d_k psi_k."""
    ws, sl = _prepare(weights, slopes)
    ns = dims(ws)
    off = np.concatenate([[0], np.cumsum(ns)]).astype(int)
    J = torch.zeros(int(off[-1]), int(off[-1]), dtype=torch.float64)
    J[:ns[0], :ns[0]] = torch.eye(ns[0], dtype=torch.float64)
    for k in range(len(ws) - 1):
        a, b = sl[k]
        c, d = (a + b) / 2, (b - a) / 2
        rows = slice(off[k + 1], off[k + 2])
        J[rows] = c * ws[k] @ J[off[k]:off[k + 1]]
        J[rows, off[k + 1]:off[k + 2]] += d * torch.eye(ns[k + 1], dtype=torch.float64)
    return J.numpy()


def lmi_violation(weights, slopes, T, rho):
    """lambda_max(M(rho, T)) by a dense float64 eigensolver (> 0: the LMI is violated). Reporting only."""
    M = torch.as_tensor(lmi_matrix(weights, slopes, T, rho))
    return float(torch.linalg.eigvalsh((M + M.T) / 2)[-1])


def _chol(a):
    L, info = torch.linalg.cholesky_ex((a + a.T) / 2)
    return None if int(info) != 0 else L


def _trsm(L, B):
    return torch.linalg.solve_triangular(L, B, upper=False)


# --------------------------------------------------------------------------------------------
# verification (no solver involved)
# --------------------------------------------------------------------------------------------

def verify_lipsdp(weights, slopes, T, rho):
    """(ok, detail): the trusted block-Cholesky check of ``lipverify.verifier.lipsdp`` on (rho, T).

    Also requires finite rho > 0 and T >= 0 elementwise (the S-procedure needs T >= 0)."""
    from lipverify.verifier.lipsdp import lmi_holds

    try:
        ws, sl = _prepare(weights, slopes)
    except ValueError as e:
        return False, f"bad input: {e}"
    rho = float(rho)
    if not (np.isfinite(rho) and rho > 0):
        return False, "rho must be finite and > 0"
    if len(T) != len(ws) - 1:
        return False, f"need {len(ws) - 1} multiplier vectors, got {len(T)}"
    T = _T(T)
    ns = dims(ws)
    for k, t in enumerate(T):
        if t.shape[0] != ns[k + 1]:
            return False, f"T[{k}] has {t.shape[0]} entries, layer has {ns[k + 1]}"
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            return False, f"T[{k}] must be finite and >= 0"
    return lmi_holds(ws, sl, T, rho)


# --------------------------------------------------------------------------------------------
# repair: smallest rho for a fixed T
# --------------------------------------------------------------------------------------------

def _reduce_input(W0):
    """R^T with W0 = R^T Q^T (QR of W0^T) when W0 is wide: same nonzero spectrum of W0^T K W0."""
    if W0.shape[1] > W0.shape[0]:
        return torch.linalg.qr(W0.T, mode="r")[1].T
    return W0


def rho_for_T(weights, slopes, T, _W0r=None):
    """Smallest rho with A(rho, T) >= 0 (floating point), or inf when no rho works.

    Eliminate the hidden blocks backward: Sigma_l = A_ll, Sigma_k = A_kk - C_k Sigma_{k+1}^{-1} C_k^T
    (k >= 1) must be positive definite; then rho_min = lambda_max(W_0^T K W_0) with
    K = (a+b)^2 T_0 Sigma_1^{-1} T_0 - 2ab T_0, computed on the row space of W_0 (QR) to keep it small.
    """
    ws, sl = _prepare(weights, slopes)
    l = len(ws) - 1
    T = _T(T)
    if any(bool((t < 0).any()) or not bool(torch.isfinite(t).all()) for t in T):
        return math.inf
    D, C = _blocks(ws, sl, T, 1.0)
    Sig = D[l]
    for k in range(l - 1, 0, -1):
        Lk = _chol(Sig)
        if Lk is None:
            return math.inf
        Y = _trsm(Lk, C[k].T)
        Sig = D[k] - Y.T @ Y
    L1 = _chol(Sig)
    if L1 is None:
        return math.inf
    co = _coeffs(sl)[0]
    Z = _trsm(L1, torch.diag(T[0]))  # L1^{-1} T_0
    K = co[1] ** 2 * (Z.T @ Z) - co[0] * torch.diag(T[0])
    Wr = _reduce_input(ws[0]) if _W0r is None else _W0r
    B = Wr.T @ K @ Wr
    lam = torch.linalg.eigvalsh((B + B.T) / 2)[-1]
    return max(float(lam), 0.0)


def repair(weights, slopes, T, max_tries=40, _W0r=None):
    """Smallest rho (the exact one, bumped by 1e-12.. relative) that verify_lipsdp accepts; inf if none."""
    rho = rho_for_T(weights, slopes, T, _W0r)
    if not np.isfinite(rho):
        return math.inf
    base = max(rho, 1e-300)
    bump = 1e-12
    for _ in range(max_tries):
        cand = base * (1 + bump) + 1e-300
        if verify_lipsdp(weights, slopes, T, cand)[0]:
            return cand
        bump *= 4
        if bump > 1e6:
            break
    return math.inf


class _Problem:
    """Reduced problem in torch. Input block reduced to rank(W_0) dims by a QR (exact congruence)."""

    def __init__(self, ws, sl, mode, device):
        self.dev = torch.device(device)
        self.mode = mode
        self.W0r = _reduce_input(ws[0])  # exact congruence: the input block shrinks to rank(W_0) dims
        self.W = [w.to(self.dev) for w in [self.W0r] + list(ws[1:])]
        self.l = len(ws) - 1
        self.ns = [self.W[0].shape[1]] + [w.shape[0] for w in self.W[:-1]]
        self.off = np.concatenate([[0], np.cumsum(self.ns)]).astype(int)
        self.n = int(self.off[-1])
        self.N = int(sum(self.ns[1:]))
        co = _coeffs(sl)
        hid = [self.ns[k + 1] for k in range(self.l)]
        per_neuron = lambda j: torch.cat([torch.full((h,), co[k][j], dtype=torch.float64, device=self.dev)
                                          for k, h in enumerate(hid)])
        self.g11, self.g12 = per_neuron(0), per_neuron(1)  # entries of G = [[2ab, -(a+b)], [-(a+b), 2]]
        self.g22 = torch.full((self.N,), 2.0, dtype=torch.float64, device=self.dev)
        self.co = co
        self.layer_of = np.concatenate([[k] * h for k, h in enumerate(hid)])
        Wl = self.W[self.l]
        self.A_const = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.dev)
        s = slice(self.off[self.l], self.off[self.l + 1])
        self.A_const[s, s] = -Wl.T @ Wl
        self.E = torch.zeros(self.N, self.l, dtype=torch.float64, device=self.dev)  # neuron -> layer
        self.E[torch.arange(self.N), torch.as_tensor(self.layer_of, device=self.dev)] = 1.0

    def split(self, t):
        return [t[self.off[k + 1] - self.off[1]:self.off[k + 2] - self.off[1]] for k in range(self.l)]

    def A(self, rho, t):
        A = self.A_const.clone()
        o = self.off
        idx = torch.arange(o[0], o[1], device=self.dev)
        A[idx, idx] += rho
        A[o[1]:, o[1]:] += torch.diag(2.0 * t)
        for k, tk in enumerate(self.split(t)):
            Wk = self.W[k]
            a, c = self.co[k]
            s0, s1 = slice(o[k], o[k + 1]), slice(o[k + 1], o[k + 2])
            if a != 0.0:
                A[s0, s0] += a * (Wk.T * tk) @ Wk
            blk = c * (Wk.T * tk)
            A[s0, s1] += blk
            A[s1, s0] += blk.T
        return A

    def derivatives(self, S):
        """Gradient and Hessian of -log det A w.r.t. (rho, t), given S = A^{-1}."""
        o, N = self.off, self.N
        Ya = torch.cat([self.W[k] @ S[o[k]:o[k + 1], :] for k in range(self.l)], 0)  # rows a_i^T S
        Yb = S[o[1]:, :]
        Paa = torch.cat([Ya[:, o[k]:o[k + 1]] @ self.W[k].T for k in range(self.l)], 1)
        Pab = Ya[:, o[1]:]
        Pbb = Yb[:, o[1]:]
        g11, g12, g22 = self.g11, self.g12, self.g22
        grad_t = -(g11 * torch.diagonal(Paa) + 2 * g12 * torch.diagonal(Pab) + g22 * torch.diagonal(Pbb))
        P = {(0, 0): Paa, (0, 1): Pab, (1, 0): Pab.T, (1, 1): Pbb}
        G = {(0, 0): g11, (0, 1): g12, (1, 0): g12, (1, 1): g22}
        # H_ij = tr(G^i P_ij G^j P_ij^T) = sum_ps X_ps * P_ps, X_ps = sum_qr G_pq[i] P_qr G_rs[j]
        H = torch.zeros(N, N, dtype=torch.float64, device=self.dev)
        for p in (0, 1):
            for s in (0, 1):
                X = sum(G[p, q][:, None] * P[q, r] * G[r, s][None, :] for q in (0, 1) for r in (0, 1))
                H += X * P[p, s]
        S00 = S[o[0]:o[1], o[0]:o[1]]
        grad_rho = -torch.trace(S00)
        h_rr = (S00 * S00).sum()
        Ya0, Yb0 = Ya[:, o[0]:o[1]], Yb[:, o[0]:o[1]]
        h_rt = g11 * (Ya0 * Ya0).sum(1) + 2 * g12 * (Ya0 * Yb0).sum(1) + g22 * (Yb0 * Yb0).sum(1)
        return grad_rho, grad_t, h_rr, h_rt, H


def _initial_point(ws, sl, mode=None):
    """Strictly feasible layer-uniform start by backward elimination (ECLipsE-like, scalar per layer).

    lambda_{l-1} = ||W_l||^2 makes the last block ||W_l||^2-definite; then each earlier lambda_{k-1} is
    chosen so that the Schur complement 2 lambda_{k-1} I + B_k is positive definite with some slack,
    and rho makes the input block PSD (times 2 for slack). Any strictly feasible point works.
    """
    l = len(ws) - 1
    co = _coeffs(sl)
    lam = [0.0] * l
    Wl = ws[l]
    lam[l - 1] = max(float(torch.linalg.matrix_norm(Wl, 2)) ** 2, 1e-12)
    Sig = 2 * lam[l - 1] * torch.eye(Wl.shape[1], dtype=torch.float64) - Wl.T @ Wl
    for k in range(l - 1, 0, -1):
        Wk = ws[k]
        a, c = co[k]
        Y = _trsm(_chol(Sig), (c * lam[k]) * Wk)  # L^{-1} C_k^T
        B = a * lam[k] * Wk.T @ Wk - Y.T @ Y
        ev = torch.linalg.eigvalsh((B + B.T) / 2)
        floor = 1e-3 * max(abs(float(ev[0])), abs(float(ev[-1])), lam[k]) + 1e-300
        lam[k - 1] = max(-float(ev[0]), 0.0) + floor  # 2 lam I + B >= (lam + floor) I
        Sig = 2 * lam[k - 1] * torch.eye(Wk.shape[1], dtype=torch.float64) + B
    T = [np.full(ws[k].shape[0], lam[k]) for k in range(l)]
    return T


def lipsdp(weights, slopes, mode="neuron", *, solver="fast", device="cpu", time_budget_s=None, tol=1e-6,
           verbose=False) -> LipSDPResult:
    """Certified LipSDP bound (Neuron or Layer multipliers) on the L2 Lipschitz constant of a dense chain.

    ``weights``: [W_0, .., W_l] (out, in); ``slopes``: one (alpha, beta) for all hidden layers or one
    per hidden layer. Output selection (one logit, a logit difference) is the caller's modified W_l.
    ``solver="fast"``: barrier IPM (below); ``"cvxpy"``/``"cvxpy-scs"``: the readable reference.
    The returned ``value`` is always from a verified (rho, T) (see module docstring).
    """
    if mode not in ("neuron", "layer"):
        raise ValueError(f"mode must be 'neuron' or 'layer', got {mode!r}")
    if solver.startswith("cvxpy"):
        from lipverify.bounds.lipsdp_cvxpy import lipsdp_cvxpy
        return lipsdp_cvxpy(weights, slopes, mode=mode)
    if solver != "fast":
        raise ValueError(f"unknown solver {solver!r}")
    return _lipsdp_fast(weights, slopes, mode, device, time_budget_s, tol, verbose)


def _finish(ws, sl, mode, T, raw_rho, t0, extra=None, solver="fast"):
    rho = repair(ws, sl, T)
    if not np.isfinite(rho):
        raise RuntimeError("no verified multiplier found")
    ok, msg = verify_lipsdp(ws, sl, T, rho)
    assert ok, msg  # repair only returns verified rho
    n = sum(dims(ws))
    viol = lmi_violation(ws, sl, T, raw_rho) if n <= 600 and np.isfinite(raw_rho) else float("nan")
    return LipSDPResult(value=inflate(math.sqrt(rho), n), rho=rho, T=[np.asarray(t, np.float64) for t in T],
                        mode=mode, solver=solver, check=msg, raw_value=math.sqrt(max(raw_rho, 0.0)),
                        raw_violation=viol, seconds=time.perf_counter() - t0, info=extra or {})


def _lipsdp_fast(weights, slopes, mode, device, time_budget_s, tol, verbose):
    """Primal barrier method with rho eliminated exactly ("valley following").

    Minimise ``g_tau(T) = min_rho [tau rho - log det A(rho, T)] - sum log t`` for increasing tau.
    With ``A = [[rho I - F0, C], [C^T, R]]``, ``log det A = log det R + sum_j log(rho - f_j)`` where
    ``f_j`` are the eigenvalues of ``F(T) = C R^{-1} C^T - A00(rho=0)`` (input block reduced by QR),
    so the optimal rho solves ``sum_j 1/(rho - f_j) = tau`` (1-D, monotone Newton). Eliminating
    rho matters: Newton on (rho, T) jointly creeps along the wall rho ~ rho(T) with tiny steps.
    Newton directions use the exact Hessian of -log det A (dense, all neurons) with rho eliminated
    by a Schur complement; line search on g_tau; tau *= 8 until the gap bound nu/tau is below
    ``tol * rho``. Every outer iteration's T is repaired + verified; the best verified one is kept.
    """
    t0 = time.perf_counter()
    ws, sl = _prepare(weights, slopes)
    T0 = _initial_point(ws, sl, mode)
    pb = _Problem(ws, sl, mode, device)
    best = (repair(ws, sl, T0, _W0r=pb.W0r), T0)
    if not np.isfinite(best[0]):
        raise RuntimeError("could not build a feasible starting point (numerically degenerate weights?)")
    dev = pb.dev
    layer = mode == "layer"
    m0 = pb.ns[0]
    E = pb.E if layer else None
    theta = torch.as_tensor([T0[k][0] for k in range(pb.l)] if layer else np.concatenate(T0),
                            dtype=torch.float64, device=dev)
    to_t = (lambda th: E @ th) if layer else (lambda th: th)
    nu = m0 + (pb.n - m0) + theta.numel()
    tau = nu / best[0]
    mu_factor = _MU_FACTOR
    newton_steps = 0
    history = []

    def reduced(th):
        """(g_tau(th), rho*) or (inf, None)."""
        if not bool((th > 0).all()):
            return math.inf, None
        A = pb.A(0.0, to_t(th))
        R = A[m0:, m0:]
        LR, info = torch.linalg.cholesky_ex(R)
        if int(info) != 0:
            return math.inf, None
        X = torch.linalg.solve_triangular(LR, A[m0:, :m0], upper=False)
        F = X.T @ X - A[:m0, :m0]
        f = torch.linalg.eigvalsh((F + F.T) / 2)
        fmax = f[-1]
        gaps = fmax - f
        u = 0.5 / tau
        for _ in range(100):  # monotone Newton from the left on h(u) = sum 1/(u + gaps) - tau
            r = 1.0 / (u + gaps)
            h = float(r.sum()) - tau
            if h <= 1e-12 * tau:
                break
            u = u + h / float((r * r).sum())
        rho = float(fmax) + u
        val = tau * rho - float(torch.log(u + gaps).sum()) - 2 * float(torch.log(torch.diagonal(LR)).sum()) \
            - float(torch.log(th).sum())
        return val, rho

    out_of_time = lambda: time_budget_s is not None and time.perf_counter() - t0 > time_budget_s
    f, rho = reduced(theta)
    for outer in range(80):
        for inner in range(80):
            A = pb.A(rho, to_t(theta))
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:  # rho* sits numerically on the boundary; nudge it
                rho = rho * (1 + 1e-12) + 1e-300
                continue
            S = torch.cholesky_inverse(L)
            gr, gt, hrr, hrt, H = pb.derivatives(S)
            if layer:
                gt, hrt, H = E.T @ gt, E.T @ hrt, E.T @ H @ E
            g = gt - 1.0 / theta
            Hs = H + torch.diag(1.0 / theta ** 2) - torch.outer(hrt, hrt) / hrr  # rho eliminated
            sc = torch.sqrt(torch.clamp(torch.diagonal(Hs), min=1e-300))
            Lh, info = torch.linalg.cholesky_ex(Hs / sc[:, None] / sc[None, :])
            if int(info) != 0:
                Lh = torch.linalg.cholesky(Hs / sc[:, None] / sc[None, :] +
                                           1e-12 * torch.eye(len(sc), dtype=torch.float64, device=dev))
            step = -torch.cholesky_solve((g / sc)[:, None], Lh)[:, 0] / sc
            dec2 = float(-(g * step).sum())
            newton_steps += 1
            if dec2 / 2 < 1e-6:
                break
            s = 1.0
            # stay inside t > 0 with a fraction-to-boundary rule, then backtrack on g_tau
            neg = step < 0
            if bool(neg.any()):
                s = min(1.0, 0.99 * float((-theta[neg] / step[neg]).min()))
            while s > 1e-14:
                f2, rho2 = reduced(theta + s * step)
                if f2 <= f - 0.25 * s * dec2:
                    break
                s *= 0.5
            else:
                break
            theta, f, rho = theta + s * step, f2, rho2
            if verbose:
                print(f"    {inner} dec2 {dec2:.3e} step {s:.3g} rho {rho:.9g}")
            if out_of_time():
                break
        Tcur = [np.full(pb.ns[k + 1], float(theta[k])) for k in range(pb.l)] if layer else \
            pb.split(theta.detach().cpu().numpy())
        rcur = repair(ws, sl, Tcur, _W0r=pb.W0r)
        history.append((outer, tau, rho, rcur, newton_steps))
        if verbose:
            print(f"outer {outer} tau {tau:.3e} rho {rho:.10g} verified {rcur:.10g} steps {newton_steps}")
        if rcur < best[0]:
            best = (rcur, Tcur)
        if nu / tau < tol * best[0] or out_of_time():
            break
        tau *= mu_factor
        f, rho = reduced(theta)
    return _finish(ws, sl, mode, best[1], rho, t0,
                   {"newton_steps": newton_steps, "outer": len(history), "device": str(dev)})


def lipsdp_batch(hidden_weights, slopes, last_layers, mode="neuron", **kw) -> list:
    """One certified LipSDP bound per last layer (e.g. the 45 rows (e_i - e_j)^T W_l for radii).

    ``hidden_weights`` = [W_0, .., W_{l-1}]; ``last_layers``: iterable of (p, n_l) arrays (or (n_l,)
    rows). Each output selection has its own optimal multipliers, so this solves one SDP per entry
    (sequentially; each is independently repaired and verified).
    """
    out = []
    for Wl in last_layers:
        Wl = np.atleast_2d(np.asarray(Wl.detach().cpu().numpy() if isinstance(Wl, torch.Tensor) else Wl,
                                      dtype=np.float64))
        out.append(lipsdp(list(hidden_weights) + [Wl], slopes, mode, **kw))
    return out


def initial_T(weights, slopes) -> list:
    """A strictly feasible layer-uniform multiplier (closed-form backward elimination): a cheap
    certificate start for callers (fine-tuning); certify it with ``repair`` + ``verify_lipsdp``."""
    ws, sl = _prepare(weights, slopes)
    return _initial_point(ws, sl)
