"""Structured barrier interior-point solver for LipSDP-Neuron / -Layer (a candidate generator).

Follows the central path of ``F_tau(rho, t) = tau rho - log det A(rho, t) - sum log t`` (t: the
multipliers; one per layer in Layer mode) with EXACT Newton steps whose Hessian is assembled from
the block-tridiagonal structure (``lipsdp_blocks.Chain.hessian``: O(l^2 n^3), never the dense
matrix of the network). Three ingredients, each chosen by measurement (Newton steps to a 1e-6
relative duality gap on random 784-50x4-10 / 784-100x5-10 and the trained VNN-COMP 784-256x2-10 /
784-256x4-10 nets; see docs/architecture.md):

* predictor-corrector path following. At an approximately centred point the path is modelled as
  x(tau) = x* + c / tau; its tangent delta = tau dx/dtau = -tau H^{-1} e (e = d rho) points at the
  model's optimum. We step alpha = 0.9 x (longest step keeping A > 0, by Lanczos on the factored
  pencil) along delta and set tau <- tau / (1 - alpha). A plain "tau *= 10, then Newton" overshoots
  ~9x, and the damped corrector then creeps along the wall rho = rho*(T) for hundreds of steps.
* rho in closed form ("valley"): after every step rho is reset to the exact minimiser of F_tau for
  the current t, from the eigenvalues f_j of the input-block Schur complement
  (log det A = log det R + sum log(rho - f_j), so sum 1 / (rho - f_j) = tau). The Newton direction
  itself comes from the joint (rho, t) system (eliminating rho inside the Newton system cancels
  catastrophically on ill-conditioned trained weights). Without the valley reset the corrector
  creeps on trained nets (vnn 256x4: no centring in 300 steps; with it: 70 steps in all).
* the start: the per-layer geometric mean of two strictly feasible layer-uniform multipliers,
  the compositional (forward, input side first) one and the backward-elimination one; it is more
  central than either (steps 18/24/39/52 against 27/41/70/70 and 32/58/156/70).

Variables are scaled by their current values in the Newton system (the barrier's 1/t^2 becomes the
identity), which keeps the system well balanced when multipliers span many orders of magnitude.

Duality gap. At a centred point the Newton step dx for the current tau yields, as in DSDP, the dual
candidate Z = (S - S dA S) / tau (S = A^{-1}, dA the linear part of A along dx): by the Newton
equation tr(E_0 Z) = 1 and tr(A_j Z) = -(1 - dx_j / x_j) / (tau x_j), and Z >= 0 iff A(x - dx) >= 0.
When feasible it proves rho* >= d = rho - [n_A - sum_j dx_j tr(A_j S) + sum_j (1 - dx_j / x_j)] / tau
(weak duality: 0 <= tr(Z A) = rho + sum t_j tr(A_j Z) - tr(K Z)). The solver stops when
(rho - d) <= tol * rho: that relative gap, not an iteration count, is what "converged" means.
Everything here produces candidates; certificates come from ``lipsdp_core.repair`` + the verifier.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from lipverify.bounds.lipsdp_blocks import F64, Chain

MAX_NEWTON_STEPS = 300
MAX_NUDGES = 60  # consecutive pushes of rho off a numerically singular wall before the solve stops
CENTERED = 1.0  # Newton decrement^2 at which a point counts as centred (then: predictor step)
ARMIJO = 0.25
TO_BOUNDARY = 0.99  # fraction of the step to t = 0
PREDICT_FRACTION = 0.9  # of the longest predictor step keeping A > 0
MAX_TAU_JUMP = 1e3
START_GAP = 0.5  # initial tau aims at a duality gap of this fraction of rho*(T0)


@dataclass
class SolveReport:
    T: list  # per hidden layer multiplier vectors (torch, float64)
    rho: float  # the solver's (unverified) rho at T
    dual: float  # best dual lower bound on the LipSDP optimum (-inf when none was feasible)
    converged: bool
    stop: str  # why the solver stopped, in words
    newton_steps: int = 0
    predictor_steps: int = 0
    history: list = field(default_factory=list)  # (step, tau, rho, dual)
    checkpoint: tuple | None = None  # (theta, tau) at the first centred point with gap <= CHECKPOINT_GAP


def solve(chain: Chain, mode: str, T0: list, *, tol: float = 1e-6, max_steps: int = MAX_NEWTON_STEPS,
          deadline: float | None = None, verbose: bool = False, start_tau: float | None = None,
          checkpoint_gap: float = 0.0) -> SolveReport:
    """Path following from strictly feasible multipliers T0 (layer-uniform or per neuron).

    ``deadline``: a ``time.perf_counter()`` value derived from the user's explicit time budget
    (never chosen here); None runs to ``tol`` or ``max_steps``."""
    layer = mode == "layer"
    dev = chain.device
    if layer:
        theta = torch.as_tensor([float(T0[k].reshape(-1)[0]) for k in range(chain.l)], dtype=F64, device=dev)
        to_T = lambda th: [torch.full((chain.hidden[k],), float(th[k]), dtype=F64, device=dev)  # noqa: E731
                           for k in range(chain.l)]
    else:
        theta = torch.cat([torch.as_tensor(t, dtype=F64).reshape(-1) for t in T0]).to(dev)
        to_T = chain.split
    nvar = theta.numel()
    nu = chain.ns[0] + chain.N + nvar  # barrier parameter: log det A plus the multipliers' log barrier

    def valley(th, tau):
        """(min over rho of F_tau(rho, th), that rho), or (inf, None) outside the domain."""
        if not bool((th > 0).all()):
            return math.inf, None
        r = chain.input_schur(to_T(th))
        if r is None:
            return math.inf, None
        logdet_R, f = r
        gaps = f[-1] - f
        u = 0.5 / tau  # h(u) = sum 1/(u + gaps) - tau: convex decreasing, h(0.5/tau) > 0; Newton from the left
        for _ in range(200):
            q = 1.0 / (u + gaps)
            h = float(q.sum()) - tau
            if h <= 1e-13 * tau:
                break
            u = u + h / float((q * q).sum())
        value = tau * (float(f[-1]) + u) - logdet_R - float(torch.log(u + gaps).sum()) - float(torch.log(th).sum())
        return value, float(f[-1]) + u

    def feasible(xv):
        return bool((xv > 0).all()) and chain.factor(float(xv[0]), to_T(xv[1:]), need_F=False) is not None

    tau = start_tau if start_tau is not None else nu / (START_GAP * chain.rho_min(to_T(theta)))
    fval, rho = valley(theta, tau)
    checkpoint = None
    if rho is None:
        raise ValueError("the starting multipliers are not strictly feasible")
    best_dual = -math.inf
    steps = predictors = 0
    history = []
    stop, converged = "", False
    e = torch.zeros(nvar + 1, dtype=F64, device=dev)
    nudges = 0
    while True:
        x = torch.cat([torch.tensor([rho], dtype=F64, device=dev), theta])
        fac = chain.factor(rho, to_T(theta))
        if fac is None:  # rho sits numerically on the wall: nudge it inside, by growing steps
            nudges += 1
            if nudges > MAX_NUDGES:  # numerically degenerate (e.g. slopes [0.999999, 1]): stop here;
                stop = "the barrier matrix stayed numerically singular (degenerate problem)"  # repair decides
                break
            rho = rho * (1 + 1e-12 * 2.0 ** nudges) + 1e-300
            continue
        nudges = 0
        Sd, So = chain.selected_inverse(fac)
        g_rho, g_t = chain.gradient(Sd, So)
        if layer:  # chain rule through t = E theta
            g_t = torch.stack([seg.sum() for seg in chain.split(g_t)])
        gap = (rho - best_dual) / rho
        history.append((steps, tau, rho, best_dual))
        if verbose:
            print(f"  step {steps:3d} tau {tau:.3e} rho {rho:.10g} dual {best_dual:.10g} gap {gap:.2e}")
        if steps >= max_steps:
            stop = f"iteration limit ({max_steps} Newton steps) reached at relative duality gap {gap:.1e}"
            break
        if deadline is not None and time.perf_counter() > deadline:
            stop = f"cut by the time budget after {steps} Newton steps, at relative duality gap {gap:.1e}"
            break
        h_rr, h_rt, H = chain.hessian(fac, Sd, layer=layer)
        # Hessian and gradient of -log det A - sum log theta, in the scaled variables x = diag(x) y
        Hfull = torch.empty(nvar + 1, nvar + 1, dtype=F64, device=dev)
        Hfull[0, 0] = h_rr
        Hfull[0, 1:] = h_rt
        Hfull[1:, 0] = h_rt
        Hfull[1:, 1:] = H
        Hfull[1:, 1:] += torch.diag(1.0 / theta ** 2)
        Lh = _chol_reg(Hfull * x[:, None] * x[None, :])
        e[0] = x[0]  # d(tau rho)/d y_0
        g = torch.cat([(g_rho + tau).reshape(1), g_t - 1.0 / theta]) * x
        dy = -torch.cholesky_solve(g[:, None], Lh)[:, 0]
        dec2 = float(-(g * dy).sum())
        steps += 1
        if dec2 <= CENTERED:
            best_dual = max(best_dual, _dual_bound(chain, x, dy * x, tau, g_rho, g_t, to_T))
            gap = (rho - best_dual) / rho
            if checkpoint is None and gap <= checkpoint_gap:
                checkpoint = (theta.clone(), tau)
            if gap <= tol:
                stop, converged = f"relative duality gap {max(gap, 0.0):.1e} <= {tol:.0e}", True
                break
            delta = -tau * torch.cholesky_solve(e[:, None], Lh)[:, 0] * x
            alpha = min(1.0, _to_zero(x, delta), chain.max_step(fac, float(delta[0]), to_T(delta[1:])))
            alpha *= PREDICT_FRACTION
            while alpha > 1e-8 and not feasible(x + alpha * delta):  # the Lanczos estimate can overshoot
                alpha *= 0.7
            new_tau = tau / max(1.0 - alpha, 1.0 / MAX_TAU_JUMP)
            f2, rho2 = valley(x[1:] + alpha * delta[1:], new_tau) if alpha > 1e-8 else (math.inf, None)
            if rho2 is None:
                stop = f"no feasible predictor step at relative duality gap {gap:.1e} (numerical limit)"
                break
            theta, tau, fval, rho = x[1:] + alpha * delta[1:], new_tau, f2, rho2
            predictors += 1
            continue
        dth = (dy * x)[1:]
        s = min(1.0, _to_zero(theta, dth))
        while s > 1e-12:
            f2, rho2 = valley(theta + s * dth, tau)
            if f2 <= fval - ARMIJO * s * dec2:
                break
            s *= 0.5
        else:
            stop = f"no descent along the Newton direction at relative duality gap {gap:.1e} (numerical limit)"
            break
        theta, fval, rho = theta + s * dth, f2, rho2
    return SolveReport(T=to_T(theta), rho=rho, dual=best_dual, converged=converged, stop=stop, newton_steps=steps,
                       predictor_steps=predictors, history=history, checkpoint=checkpoint)


def _dual_bound(chain, x, dx, tau, g_rho, g_t, to_T) -> float:
    """The DSDP-style dual lower bound of the module docstring; -inf when Z is not feasible."""
    th, dth = x[1:], dx[1:]
    if not bool((dth <= th).all()):
        return -math.inf
    xb = x - dx
    if chain.factor(float(xb[0]), to_T(xb[1:]), need_F=False) is None:
        return -math.inf
    n_A = chain.ns[0] + chain.N
    trAS = torch.cat([-g_rho.reshape(1), -g_t])  # tr(A_j S) = -d(-log det A)/dx_j
    gap = (n_A - float((dx * trAS).sum()) + float((1.0 - dth / th).sum())) / tau
    return float(x[0]) - gap


def _to_zero(x, dx) -> float:
    """TO_BOUNDARY times the largest step keeping every entry of x positive (inf if none decreases)."""
    neg = dx < 0
    if not bool(neg.any()):
        return math.inf
    return TO_BOUNDARY * float((-x[neg] / dx[neg]).min())


def _chol_reg(H):
    """Cholesky of the scaled Hessian; a tiny diagonal regularisation if rounding made it indefinite."""
    L, info = torch.linalg.cholesky_ex(H)
    reg = 1e-14
    while int(info) != 0:
        if reg > 1e-2 or not bool(torch.isfinite(H).all()):
            raise RuntimeError("the Newton system is not positive definite (numerical breakdown)")
        n = H.shape[0]
        L, info = torch.linalg.cholesky_ex(H + reg * float(torch.diagonal(H).abs().max()) *
                                           torch.eye(n, dtype=H.dtype, device=H.device))
        reg *= 100
    return L
