"""LipSDP-Neuron / LipSDP-Layer for dense chains: problem data, repair, verification plumbing, entry point.

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

Fast path (``lipsdp_ipm.solve`` on ``lipsdp_blocks.Chain``, torch, CPU or CUDA): a predictor-corrector
barrier method with exact Newton steps assembled block by block (the input block shrunk to rank(W_0)
by a QR, an exact congruence), started from ``start_multipliers``; it stops at a relative duality
gap of ``tol`` (a dual bound from the DSDP-style projection), at an iteration limit, or when the
user's explicit time budget runs out, and says which in ``LipSDPResult.stop``.

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

from lipverify.bounds.lipsdp_blocks import reduce_input
from lipverify.norms.margin import inflate


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
    converged: bool = False  # the solver reached its stopping criterion (relative duality gap <= tol)
    stop: str = ""  # why the solver stopped, in words (criterion met, iteration limit, cut by the budget)
    gap: float = math.inf  # (verified rho - dual lower bound) / verified rho; inf when no dual bound
    dual_value: float | None = None  # sqrt of the dual bound: the LipSDP optimum L* lies in [dual_value, value]
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

def verify_lipsdp(weights, slopes, T, rho, magnitudes=None, product_depth=0):
    """(ok, detail): the trusted block-Cholesky check of ``lipverify.verifier.lipsdp`` on (rho, T).

    Also requires finite rho > 0 and T >= 0 elementwise (the S-procedure needs T >= 0).
    ``magnitudes``/``product_depth``: as derived by the verifier's ``dense_chain`` (merged weights)."""
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
    mags = None if magnitudes is None else [_tt(m) for m in magnitudes]
    return lmi_holds(ws, sl, T, rho, mags, product_depth)


# --------------------------------------------------------------------------------------------
# repair: smallest rho for a fixed T
# --------------------------------------------------------------------------------------------

def rho_for_T(weights, slopes, T, shift: float = 0.0, magnitudes=None):
    """Smallest rho with A(rho, T) - shift diag(s(rho)) >= 0 (floating point), or inf when no rho works.

    ``s`` are the verifier's row scales (``lipverify.verifier.lipsdp.row_scales``), so with its
    ``shift_rel`` this is the threshold the verifier tests, not just the one of A itself. Eliminate
    the hidden blocks backward: Sigma_l = A_ll, Sigma_k = A_kk - C_k Sigma_{k+1}^{-1} C_k^T (k >= 1) must
    be positive definite; then rho (1 - shift) >= lambda_max(W_0^T K W_0 + shift diag(s_0 - rho)) with
    K = (a+b)^2 T_0 Sigma_1^{-1} T_0 - 2ab T_0 (without a shift: on the row space of W_0, by a QR).
    """
    from lipverify.verifier.lipsdp import row_scales

    ws, sl = _prepare(weights, slopes)
    l = len(ws) - 1
    T = _T(T)
    if any(bool((t < 0).any()) or not bool(torch.isfinite(t).all()) for t in T):
        return math.inf
    D, C = _blocks(ws, sl, T, 1.0)
    mags = None if magnitudes is None else [_tt(m) for m in magnitudes]
    scl = row_scales(ws, sl, T, 0.0, mags) if shift else None
    if shift:
        D = [d if k == 0 else d - torch.diag(shift * scl[k]) for k, d in enumerate(D)]
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
    if shift:
        B = ws[0].T @ K @ ws[0] + torch.diag(shift * scl[0])
        lam = float(torch.linalg.eigvalsh((B + B.T) / 2)[-1]) / (1.0 - shift)
    else:
        Wr = reduce_input(ws[0])
        B = Wr.T @ K @ Wr
        lam = float(torch.linalg.eigvalsh((B + B.T) / 2)[-1])
    return max(lam, 0.0)


def repair(weights, slopes, T, max_tries=40, magnitudes=None, product_depth=0):
    """Smallest rho (the verifier's threshold, bumped by 1e-12.. relative) that verify_lipsdp accepts; inf if none."""
    from lipverify.verifier.lipsdp import shift_rel

    rho = rho_for_T(weights, slopes, T, shift=shift_rel(sum(dims(weights)), product_depth), magnitudes=magnitudes)
    if not np.isfinite(rho):
        return math.inf
    base = max(rho, 1e-300)
    bump = 1e-12
    for _ in range(max_tries):
        cand = base * (1 + bump) + 1e-300
        if verify_lipsdp(weights, slopes, T, cand, magnitudes, product_depth)[0]:
            return cand
        bump *= 4
        if bump > 1e6:
            break
    return math.inf


def backward_start(ws, sl) -> list:
    """Strictly feasible layer-uniform multipliers by backward elimination (output side first).

    lambda_{l-1} = ||W_l||^2 makes the last block ||W_l||^2-definite; then each earlier lambda_{k-1} is
    chosen so that the Schur complement 2 lambda_{k-1} I + B_k is positive definite with some slack.
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
    return [np.full(ws[k].shape[0], lam[k]) for k in range(l)]


def start_multipliers(ws, sl, device="cpu") -> list:
    """The interior-point start: per layer, the geometric mean of the compositional (forward) and the
    backward-elimination multipliers, both strictly feasible and layer-uniform; measured to be more
    central than either (see lipsdp_ipm). Falls back to the arithmetic mean (feasible by convexity)
    and then to the backward start alone."""
    from lipverify.bounds.compositional_core import compositional
    from lipverify.bounds.lipsdp_blocks import Chain

    back = backward_start(ws, sl)
    try:
        forward, _ = compositional(ws, sl, device)
    except ValueError:
        return back
    chain = Chain(ws, sl, device)
    for mean in (lambda a, b: math.sqrt(a * b), lambda a, b: (a + b) / 2):
        T = [np.full(len(bk), mean(float(bk[0]), fk)) for bk, fk in zip(back, forward)]
        if math.isfinite(chain.rho_min([torch.as_tensor(t, device=chain.device) for t in T])):
            return T
    return back


def lipsdp(weights, slopes, mode="neuron", *, solver="fast", device="cpu", time_budget_s=None, tol=1e-6,
           max_steps=None, certify_on=None, warm_start=None, checkpoint_gap=0.0, verbose=False) -> LipSDPResult:
    """Certified LipSDP bound (Neuron or Layer multipliers) on the L2 Lipschitz constant of a dense chain.

    ``weights``: [W_0, .., W_l] (out, in); ``slopes``: one (alpha, beta) for all hidden layers or one
    per hidden layer. Output selection (one logit, a logit difference) is the caller's modified W_l.
    ``solver="fast"``: the structured interior-point method (lipsdp_ipm); ``"cvxpy"``/``"cvxpy-scs"``:
    the readable reference. ``time_budget_s`` is the user's explicit budget (the result then says
    that it was cut). ``certify_on``: the trusted verifier's ``DenseChain`` of the same network
    (weights re-derived independently, with magnitude bounds): repair and verification then target
    exactly what ``lipverify check`` will test. ``warm_start``: (T, tau), a strictly feasible point
    and its barrier parameter (e.g. a related problem's ``info["checkpoint"]``, recorded when the
    relative duality gap first fell below ``checkpoint_gap``). The returned ``value`` is always from a
    verified (rho, T).
    """
    if mode not in ("neuron", "layer"):
        raise ValueError(f"mode must be 'neuron' or 'layer', got {mode!r}")
    if solver.startswith("cvxpy"):
        from lipverify.bounds.lipsdp_cvxpy import lipsdp_cvxpy
        return lipsdp_cvxpy(weights, slopes, mode=mode)
    if solver != "fast":
        raise ValueError(f"unknown solver {solver!r}")
    return _lipsdp_structured(weights, slopes, mode, device, time_budget_s, tol, max_steps, certify_on,
                              warm_start, checkpoint_gap, verbose)


def _lipsdp_structured(weights, slopes, mode, device, time_budget_s, tol, max_steps, certify_on, warm_start,
                       checkpoint_gap, verbose):
    from lipverify.bounds.lipsdp_blocks import Chain
    from lipverify.bounds.lipsdp_ipm import MAX_NEWTON_STEPS, SolveReport, solve

    t0 = time.perf_counter()
    ws, sl = _prepare(weights, slopes)
    chain = Chain(ws, sl, device)
    deadline = None if time_budget_s is None else t0 + float(time_budget_s)
    kw = dict(tol=tol, max_steps=max_steps or MAX_NEWTON_STEPS, deadline=deadline, verbose=verbose,
              checkpoint_gap=checkpoint_gap)
    rep = None
    T_start = start_multipliers(ws, sl, device)
    if not chain.rho_min([torch.as_tensor(t, device=chain.device) for t in T_start]) > 0:
        # rho*(T) = 0: the network is constant (a zero layer); nothing to optimise
        rep = SolveReport(T=[torch.as_tensor(t) for t in T_start], rho=0.0, dual=0.0, converged=True,
                          stop="the network is constant (a zero layer): LipSDP optimum 0")
        T0 = T_start
    if rep is None and warm_start is not None:
        T0 = [np.asarray(t, dtype=np.float64) for t in warm_start[0]]
        if math.isfinite(chain.rho_min([torch.as_tensor(t, device=chain.device) for t in T0])):
            rep = solve(chain, mode, [torch.as_tensor(t) for t in T0], start_tau=float(warm_start[1]), **kw)
    if rep is None:
        T0 = T_start
        rep = solve(chain, mode, [torch.as_tensor(t) for t in T0], **kw)
    T = [t.detach().cpu().numpy().astype(np.float64) for t in rep.T]
    target = _Target.of(ws, sl, certify_on)
    rho = target.repair(T)
    stop = rep.stop
    if not np.isfinite(rho):  # cannot happen for a strictly feasible solver point; the start is always certifiable
        T, rho = T0, target.repair(T0)
        stop += "; its multipliers failed verification, the starting point's were certified instead"
        if not np.isfinite(rho):
            raise RuntimeError("no verified multiplier found (numerically degenerate weights?)")
    info = {"newton_steps": rep.newton_steps, "predictor_steps": rep.predictor_steps, "device": str(chain.device),
            "warm_start": warm_start is not None}
    if rep.checkpoint is not None:
        info["checkpoint"] = ([t.detach().cpu().numpy() for t in chain.split(rep.checkpoint[0])]
                              if mode == "neuron" else [np.full(n, float(v)) for n, v in
                                                        zip(chain.hidden, rep.checkpoint[0])], rep.checkpoint[1])
    return _finish(target, mode, T, rho, rep.rho, t0, converged=rep.converged, stop=stop, dual=rep.dual, info=info)


@dataclass
class _Target:
    """What repair and verification run on: the solver's own weights, or the verifier's chain."""

    ws: list
    sl: list
    magnitudes: list | None = None
    product_depth: int = 0

    @classmethod
    def of(cls, ws, sl, certify_on):
        if certify_on is None:
            return cls(ws, sl)
        return cls([_tt(w) for w in certify_on.weights], list(certify_on.slopes), certify_on.magnitudes,
                   certify_on.product_depth)

    def repair(self, T):
        return repair(self.ws, self.sl, T, magnitudes=self.magnitudes, product_depth=self.product_depth)

    def verify(self, T, rho):
        return verify_lipsdp(self.ws, self.sl, T, rho, self.magnitudes, self.product_depth)


def _finish(target, mode, T, rho, raw_rho, t0, *, converged, stop, dual=-math.inf, info=None, solver="fast"):
    ws, sl = target.ws, target.sl
    ok, msg = target.verify(T, rho)
    assert ok, msg  # repair only returns verified rho
    n = sum(dims(ws))
    viol = lmi_violation(ws, sl, T, raw_rho) if n <= 600 and np.isfinite(raw_rho) else float("nan")
    gap = max(rho - dual, 0.0) / rho if np.isfinite(dual) else math.inf
    return LipSDPResult(value=inflate(math.sqrt(rho), n), rho=rho, T=[np.asarray(t, np.float64) for t in T],
                        mode=mode, solver=solver, check=msg, raw_value=math.sqrt(max(raw_rho, 0.0)),
                        raw_violation=viol, seconds=time.perf_counter() - t0, converged=converged, stop=stop,
                        gap=gap, dual_value=math.sqrt(dual) if np.isfinite(dual) and dual > 0 else None,
                        info=info or {})


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
    return backward_start(ws, sl)
