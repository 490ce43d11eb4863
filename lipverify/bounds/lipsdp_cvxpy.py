"""Readable LipSDP reference through cvxpy + SCS (small nets; what a Python user would write).

It builds the LMI exactly as in the paper, M(rho, T) <= 0 over the stacked (x_0, .., x_l), and
hands it to SCS. SCS is a first-order solver: at eps 1e-3 its answer is routinely *infeasible*
(lambda_max(M) > 0). So, as everywhere in lipverify, the solver output is only a candidate T:
``raw_violation`` reports lambda_max of M at the solver's (rho, T), and ``value`` comes from
``repair`` + ``verify_lipsdp`` (lipsdp_core) on that T. ``form="loop"`` builds the loop-transformed
(congruent, dense) version of the same LMI instead; it certifies the same value.
"""

from __future__ import annotations

import math
import time

import numpy as np

from lipverify.bounds.lipsdp_core import (LipSDPResult, _prepare, backward_start, dims, inflate, lmi_violation,
                                          loop_jacobian, repair, verify_lipsdp)


def _lmi_expr(ws, sl, t_vars, rho, form):
    """cvxpy expression of M(rho, T) (affine in rho, T)."""
    import cvxpy as cp
    ns = dims(ws)
    l = len(ws) - 1
    n = sum(ns)
    off = np.concatenate([[0], np.cumsum(ns)]).astype(int)
    # M = -rho E0 + sum_k [A_k; B_k]^T Q_k(T_k) [A_k; B_k] + E_l^T W_l^T W_l E_l
    M = 0
    E0 = np.zeros((ns[0], n))
    E0[:, :ns[0]] = np.eye(ns[0])
    M = M - rho * (E0.T @ E0)
    for k in range(l):
        a, b = sl[k]
        Ak = np.zeros((ns[k + 1], n))  # v_k = W_k x_k
        Ak[:, off[k]:off[k + 1]] = ws[k]
        Bk = np.zeros((ns[k + 1], n))  # x_{k+1}
        Bk[:, off[k + 1]:off[k + 2]] = np.eye(ns[k + 1])
        Tk = cp.diag(t_vars[k])
        M = M + (-2 * a * b) * (Ak.T @ Tk @ Ak) + (a + b) * (Ak.T @ Tk @ Bk + Bk.T @ Tk @ Ak) - 2 * (Bk.T @ Tk @ Bk)
    El = np.zeros((ws[l].shape[0], n))
    El[:, off[l]:off[l + 1]] = ws[l]
    M = M + El.T @ El
    if form == "loop":
        J = loop_jacobian(ws, sl)
        M = J.T @ M @ J
    return M


def lipsdp_cvxpy(weights, slopes, mode="neuron", *, eps=1e-3, form="plain", max_iters=100000, verbose=False):
    """LipSDP via cvxpy + SCS, then repair + verification of the returned T."""
    import cvxpy as cp
    t0 = time.perf_counter()
    ws, sl = _prepare(weights, slopes)
    ws = [w.numpy() for w in ws]
    l = len(ws) - 1
    ns = dims(ws)
    rho = cp.Variable()
    if mode == "neuron":
        tv = [cp.Variable(ns[k + 1], nonneg=True) for k in range(l)]
        t_exprs = tv
    elif mode == "layer":
        lv = cp.Variable(l, nonneg=True)
        t_exprs = [lv[k] * np.ones(ns[k + 1]) for k in range(l)]
    else:
        raise ValueError(mode)
    M = _lmi_expr(ws, sl, t_exprs, rho, form)
    prob = cp.Problem(cp.Minimize(rho), [(M + M.T) / 2 << 0])
    prob.solve(solver=cp.SCS, eps=eps, max_iters=max_iters, verbose=verbose)
    if rho.value is None:
        raise RuntimeError(f"SCS returned no solution (status {prob.status})")
    T = [np.maximum(np.asarray(e.value, dtype=np.float64).reshape(-1), 0.0) for e in t_exprs]
    raw_rho = float(rho.value)
    n = sum(ns)
    rho_v = repair(ws, sl, T)
    how = "repair of SCS T"
    if not np.isfinite(rho_v):
        # SCS's T admits no rho at all: mix in a strictly feasible layer-wise T (convexity of the LMI)
        Tf = backward_start(_prepare(ws, sl)[0], sl)
        for theta in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0):
            Tm = [(1 - theta) * a + theta * b for a, b in zip(T, Tf)]
            rho_v = repair(ws, sl, Tm)
            if np.isfinite(rho_v):
                T, how = Tm, f"repair of SCS T mixed {theta:g} with a feasible layer-wise T"
                break
    ok, msg = verify_lipsdp(ws, sl, T, rho_v)
    if not ok:  # unreachable unless every fallback failed
        raise RuntimeError(f"could not verify any multiplier from SCS: {msg}")
    seconds = time.perf_counter() - t0  # solve + repair + verification (the reporting eigensolve below excluded)
    T_raw = [np.maximum(np.asarray(e.value, dtype=np.float64).reshape(-1), 0.0) for e in t_exprs]
    raw_violation = lmi_violation(ws, sl, T_raw, raw_rho) if n <= 4000 else float("nan")
    return LipSDPResult(value=inflate(math.sqrt(rho_v), n), rho=rho_v, T=T, mode=mode, solver="cvxpy-scs",
                        check=f"{msg}; {how}", raw_value=math.sqrt(max(raw_rho, 0.0)),
                        raw_violation=raw_violation, seconds=seconds, converged=prob.status == "optimal",
                        stop=f"SCS status {prob.status} at eps {eps:g}",
                        info={"status": prob.status, "eps": eps, "form": form})
