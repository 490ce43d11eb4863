"""A log-barrier interior-point solver for LMIs in pair form (``lipverify.verifier.sdp_graph``).

Problem: minimize x[obj] subject to A_b(x) = U_b Gamma(x) U_b^H >= 0 for every block b (many
batched matrices per *family*: one family per segment, one matrix per grid frequency) and x >= 0.
Gamma(x) is block diagonal with one 1x1 or 2x2 block per *group*, linear in one variable (or
constant). With S = A^{-1} and P = U^H S U, the derivatives of -log det A are

    d/dx_i   = -sum_{columns a of i} Re (Gu P)_{aa}
    d2/dx_i dx_j = sum_{a of i, b of j} Re [(Gu P Gu)_{ab} conj(P_{ab})]

(Gu = Gamma's unit coefficients), so one Newton step costs a Cholesky, an inverse and U^H S U per
matrix. Phase I finds a strictly feasible point by minimizing s with A_b(x) + s I >= 0 (rows of
every family pre-scaled so that s I is comparable across blocks); phase II follows the central path
of tau x[obj] - sum log det A_b - sum log x_i, tau growing by ``TAU_GROWTH``. Every stopping rule
is an iteration count or a tolerance: same inputs, same iterates. Its output is only a candidate:
the certificate comes from the verifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

TAU_GROWTH = 8.0
MAX_OUTER = 40
MAX_INNER = 60
PHASE1_MAX_STEPS = 200


@dataclass
class Family:
    """Batched matrices sharing one column layout: U chunks (F, m, R) and per-column group data."""

    chunks: list[torch.Tensor]
    partner: torch.Tensor  # (R,) the other column of the column's group (itself for 1x1 groups)
    g_self: torch.Tensor  # (R,) Gamma[a, a] per unit of the group's variable
    g_pair: torch.Tensor  # (R,) Gamma[a, partner] per unit of the group's variable
    var: torch.Tensor  # (R,) variable index of the column's group, -1 for a constant group

    def coeffs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xc = torch.where(self.var >= 0, x[self.var.clamp_min(0)], torch.ones_like(self.g_self))
        return self.g_self * xc, self.g_pair * xc


@dataclass
class SolveResult:
    x: torch.Tensor
    history: list[torch.Tensor] = field(default_factory=list)  # x after each outer iteration
    info: dict = field(default_factory=dict)


def _assemble(U, gs, gp, partner, shift=0.0):
    V = U * gs.to(U.dtype) + U[..., partner] * gp.to(U.dtype)
    A = V @ U.mH
    if shift:
        A = A + shift * torch.eye(A.shape[-1], dtype=A.dtype)
    return (A + A.mH) / 2


def feasible(families: list[Family], x: torch.Tensor, shift: float = 0.0) -> bool:
    for fam in families:
        gs, gp = fam.coeffs(x)
        for U in fam.chunks:
            _, info = torch.linalg.cholesky_ex(_assemble(U, gs, gp, fam.partner, shift))
            if bool((info != 0).any()):
                return False
    return True


def _barrier_terms(families, x, n, shift=None, derivs=True):
    """(sum log det, grad of -log det, Hessian of -log det) over all matrices; None if infeasible.
    With ``shift`` (phase I) the last variable is s in A + s I.

    With V = U Gu (Gu: Gamma's unit coefficients) and Q = U^H S V, the term of variable i is
    F_i = sum_{a of i} V_a U_a^H, so tr(S F_i) = sum Q_aa and tr(S F_i S F_j) = sum Q_ab Q_ba."""
    logdet = 0.0
    grad = torch.zeros(n, dtype=torch.float64)
    hess = torch.zeros(n, n, dtype=torch.float64)
    s = float(x[-1]) if shift else 0.0
    for fam in families:
        gs, gp = fam.coeffs(x)
        live = fam.var >= 0
        vidx = fam.var[live]
        for U in fam.chunks:
            A = _assemble(U, gs, gp, fam.partner, s)
            L, info = torch.linalg.cholesky_ex(A)
            if bool((info != 0).any()):
                return None
            logdet += 2.0 * float(torch.log(torch.diagonal(L, dim1=-2, dim2=-1).real).sum())
            if not derivs:
                continue
            Ul = U[..., live]
            Vl = (U * fam.g_self.to(U.dtype) + U[..., fam.partner] * fam.g_pair.to(U.dtype))[..., live]
            S = torch.cholesky_inverse(L)
            SV = S @ Vl
            Q = Ul.mH @ SV  # (F, R', R')
            gcol = torch.diagonal(Q, dim1=-2, dim2=-1).real.sum(0)
            grad.index_add_(0, vidx, -gcol)
            hcol = (Q.real * Q.real.transpose(-2, -1) - Q.imag * Q.imag.transpose(-2, -1)).sum(0) \
                if Q.is_complex() else (Q * Q.transpose(-2, -1)).sum(0)
            h = torch.zeros(n, hcol.shape[1], dtype=torch.float64)
            h.index_add_(0, vidx, hcol)
            hess.index_add_(1, vidx, h)
            if shift:  # d/ds = tr(S), d2/ds2 = ||S||_F^2, d2/ds dx_i = sum_{a of i} Re (U_a^H S S V_a)
                grad[-1] -= float(torch.diagonal(S, dim1=-2, dim2=-1).real.sum())
                hess[-1, -1] += float((S.abs() ** 2).sum())
                SU = S @ Ul
                cross = torch.zeros(n, dtype=torch.float64)
                cross.index_add_(0, vidx, (SU.conj() * SV).sum(-2).real.sum(0))
                hess[-1, :-1] += cross[:-1]
                hess[:-1, -1] += cross[:-1]
    return logdet, grad, hess


def _newton(families, x, n, objective, tau, shift, lower, max_steps, stop_when=None):
    """Damped Newton on tau c^T x - sum log det A - sum_{i < lower} log x_i; returns (x, steps)."""
    c = torch.zeros(n, dtype=torch.float64)
    c[objective] = 1.0
    free = torch.arange(n) < lower  # variables with a log barrier (all but the phase-I shift)

    def value(z):
        if bool((z[free] <= 0).any()):
            return None
        t = _barrier_terms(families, z, n, shift, derivs=False)
        if t is None:
            return None
        return tau * float(c @ z) - t[0] - float(torch.log(z[free]).sum())

    f = value(x)
    steps = 0
    for _ in range(max_steps):
        t = _barrier_terms(families, x, n, shift)
        if t is None:
            break
        _, g, H = t
        g = tau * c + g
        g[free] -= 1.0 / x[free]
        H = H.clone()
        idx = torch.arange(n)[free]
        H[idx, idx] += 1.0 / x[free] ** 2
        sc = torch.sqrt(torch.clamp(torch.diagonal(H), min=1e-300))
        Hs = H / sc[:, None] / sc[None, :]
        Lh, info = torch.linalg.cholesky_ex(Hs)
        if int(info) != 0:
            Lh = torch.linalg.cholesky(Hs + 1e-10 * torch.eye(n, dtype=torch.float64))
        step = -torch.cholesky_solve((g / sc)[:, None], Lh)[:, 0] / sc
        dec2 = float(-(g @ step))
        steps += 1
        if dec2 / 2 < 1e-7:
            break
        alpha = _step_to_boundary(x, step, free)
        accepted = False
        while alpha > 1e-12:
            z = x + alpha * step
            fz = value(z)
            if fz is not None and fz <= f - 0.25 * alpha * dec2:
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            break
        x, f = z, fz
        if stop_when is not None and stop_when(x):
            break
    return x, steps


def row_scaling(families: list[Family], x: torch.Tensor) -> None:
    """Rescale each family's rows by 1/sqrt(mean |Gamma|-weighted diagonal): a congruence that
    leaves PSD-ness unchanged and balances the blocks for phase I's s I."""
    for fam in families:
        gs, gp = fam.coeffs(x)
        g_abs = (gs.abs() + gp.abs()).to(torch.float64)
        total, count = None, 0
        for U in fam.chunks:
            d = ((U.abs() ** 2) * g_abs).sum(-1).sum(0)
            total = d if total is None else total + d
            count += U.shape[0]
        scale = 1.0 / torch.sqrt(total / max(count, 1) + 1e-300)
        fam.chunks = [U * scale.to(U.dtype)[None, :, None] for U in fam.chunks]


# ----------------------------------------------------------------------------------------------
# Phase II with the objective variable eliminated ("valley following", as in lipsdp_core)
# ----------------------------------------------------------------------------------------------


@dataclass
class Eliminated:
    """Where the objective variable r enters a family: r * diag(d) on coordinates ``coords``."""

    coords: torch.Tensor
    d: torch.Tensor
    rest: torch.Tensor


def _objective_entries(fam: Family, objective: int) -> Eliminated | None:
    cols = torch.nonzero(fam.var == objective).flatten()
    if len(cols) == 0:
        return None
    coords, d = [], []
    for a in cols.tolist():
        u = fam.chunks[0][0, :, a]
        k = int(torch.argmax(u.abs()))
        nz = int((torch.cat([c[:, :, a] for c in fam.chunks]).abs() > 0).any(0).sum())
        if nz != 1 or int(fam.partner[a]) != a:
            raise ValueError("the objective variable must enter as a diagonal term on unit columns")
        coords.append(k)
        d.append(float(fam.g_self[a]) * float(u.abs()[k]) ** 2)
    coords_t = torch.tensor(coords)
    if len(set(coords)) != len(coords) or any(v <= 0 for v in d):
        raise ValueError("the objective variable's coordinates must be distinct with positive weights")
    m = fam.chunks[0].shape[1]
    keep = torch.ones(m, dtype=torch.bool)
    keep[coords_t] = False
    return Eliminated(coords_t, torch.tensor(d, dtype=torch.float64), torch.nonzero(keep).flatten())


def _reduced(families, elim, x, objective, tau, lower):
    """(g, r*) for the barrier with r = x[objective] minimized out exactly; None when infeasible."""
    z = x.clone()
    z[objective] = 0.0
    free = torch.arange(len(x)) < lower
    free[objective] = False
    if bool((z[free] <= 0).any()):
        return None
    logdet, mus = 0.0, []
    for fam, el in zip(families, elim):
        gs, gp = fam.coeffs(z)
        for U in fam.chunks:
            B = _assemble(U, gs, gp, fam.partner)
            if el is None:
                L, info = torch.linalg.cholesky_ex(B)
                if bool((info != 0).any()):
                    return None
                logdet += 2.0 * float(torch.log(torch.diagonal(L, dim1=-2, dim2=-1).real).sum())
                continue
            E, Rr = el.coords, el.rest
            Bee = B[:, E][:, :, E]
            if len(Rr):
                L, info = torch.linalg.cholesky_ex(B[:, Rr][:, :, Rr])
                if bool((info != 0).any()):
                    return None
                logdet += 2.0 * float(torch.log(torch.diagonal(L, dim1=-2, dim2=-1).real).sum())
                X = torch.linalg.solve_triangular(L, B[:, Rr][:, :, E], upper=False)
                Bee = Bee - X.mH @ X
            sd = 1.0 / torch.sqrt(el.d).to(Bee.dtype)
            M = Bee * sd[None, :, None] * sd[None, None, :]
            mus.append(torch.linalg.eigvalsh((M + M.mH) / 2).reshape(-1))
            logdet += float(torch.log(el.d).sum()) * U.shape[0]
    mu = torch.cat(mus) if mus else torch.zeros(0, dtype=torch.float64)
    # minimize tau r - sum log(r + mu) - log r over r > max(0, -min mu): monotone Newton from the left
    shift = torch.cat([mu, torch.zeros(1, dtype=torch.float64)])
    base = float((-shift).max())
    gaps = shift + base  # >= 0
    u = 0.5 / tau
    for _ in range(200):
        rr = 1.0 / (u + gaps)
        h = float(rr.sum()) - tau
        if h <= 1e-12 * tau:
            break
        u = u + h / float((rr * rr).sum())
    r = base + u
    g = tau * r - float(torch.log(u + gaps).sum()) - logdet - float(torch.log(z[free]).sum())
    return g, r


def _newton_reduced(families, elim, x, n, objective, tau, max_steps):
    """Damped Newton on the reduced barrier (objective minimized out); returns (x, steps)."""
    free = torch.ones(n, dtype=torch.bool)
    free[objective] = False
    t = _reduced(families, elim, x, objective, tau, n)
    if t is None:
        return x, 0
    f, r = t
    x = x.clone()
    x[objective] = r
    steps = 0
    for _ in range(max_steps):
        bt = _barrier_terms(families, x, n)
        if bt is None:  # r* sits numerically on the boundary: nudge it
            x[objective] = x[objective] * (1 + 1e-12) + 1e-300
            bt = _barrier_terms(families, x, n)
            if bt is None:
                break
        _, g, H = bt
        g = g.clone()
        g[free] -= 1.0 / x[free]
        H = H.clone()
        idx = torch.arange(n)
        H[idx, idx] += 1.0 / x ** 2
        o = objective
        hy = torch.cat([H[:o], H[o + 1:]])
        hy = torch.cat([hy[:, :o], hy[:, o + 1:]], 1)
        hr = torch.cat([H[o, :o], H[o, o + 1:]])
        gy = torch.cat([g[:o], g[o + 1:]])
        Hs = hy - torch.outer(hr, hr) / H[o, o]
        sc = torch.sqrt(torch.clamp(torch.diagonal(Hs), min=1e-300))
        Lh, info = torch.linalg.cholesky_ex(Hs / sc[:, None] / sc[None, :])
        if int(info) != 0:
            Lh = torch.linalg.cholesky(Hs / sc[:, None] / sc[None, :] + 1e-10 * torch.eye(n - 1, dtype=torch.float64))
        dy = -torch.cholesky_solve((gy / sc)[:, None], Lh)[:, 0] / sc
        dec2 = float(-(gy @ dy))
        steps += 1
        if dec2 / 2 < 1e-7:
            break
        step = torch.cat([dy[:o], torch.zeros(1, dtype=torch.float64), dy[o:]])
        alpha = _step_to_boundary(x, step, free)
        accepted = False
        while alpha > 1e-12:
            cand = x + alpha * step
            t = _reduced(families, elim, cand, objective, tau, n)
            if t is not None and t[0] <= f - 0.25 * alpha * dec2:
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            break
        f, r = t
        x = cand
        x[objective] = r
    return x, steps


def solve(families: list[Family], n_vars: int, objective: int, x0: torch.Tensor | None = None, *,
          tol: float = 1e-7, max_outer: int = MAX_OUTER, max_inner: int = MAX_INNER, track=None) -> SolveResult:
    """Minimize x[objective] over the LMIs; returns the last iterate and the history of outer iterates."""
    x = torch.ones(n_vars, dtype=torch.float64) if x0 is None else x0.clone().to(torch.float64)
    row_scaling(families, x)
    info = {"phase1_steps": 0, "newton_steps": 0, "outer": 0}
    if not feasible(families, x):
        lam = None
        for fam in families:
            gs, gp = fam.coeffs(x)
            for U in fam.chunks:
                ev = torch.linalg.eigvalsh(_assemble(U, gs, gp, fam.partner))[..., 0].min()
                lam = float(ev) if lam is None else min(lam, float(ev))
        s0 = max(0.0, -lam) * 1.5 + 1.0
        z = torch.cat([x, torch.tensor([s0], dtype=torch.float64)])
        # phase I: minimize s; stop as soon as the shift is negative (x alone strictly feasible)
        z, steps = _newton(families, z, n_vars + 1, n_vars, 1.0, True, n_vars, PHASE1_MAX_STEPS,
                           stop_when=lambda q: float(q[-1]) < 0)
        for k in range(8):
            if float(z[-1]) < 0:
                break
            z, more = _newton(families, z, n_vars + 1, n_vars, 10.0 ** (k + 1), True, n_vars, PHASE1_MAX_STEPS,
                              stop_when=lambda q: float(q[-1]) < 0)
            steps += more
        info["phase1_steps"] = steps
        x = z[:-1]
        if not feasible(families, x):
            raise RuntimeError("no strictly feasible point found for the LMI (phase I did not converge)")
    nu = sum(U.shape[0] * U.shape[1] for fam in families for U in fam.chunks) + n_vars
    tau = nu / max(float(x[objective]), 1e-300)
    history = []
    elim = [_objective_entries(fam, objective) for fam in families]
    for outer in range(max_outer):
        x, steps = _newton_reduced(families, elim, x, n_vars, objective, tau, max_inner)
        info["newton_steps"] += steps
        info.setdefault("steps_per_outer", []).append(steps)
        history.append(x.clone())
        info["outer"] = outer + 1
        if track is not None:
            track(outer, float(x[objective]), nu / tau)
        if nu / tau < tol * float(x[objective]):
            break
        tau *= TAU_GROWTH
    return SolveResult(x=x, history=history, info=info)


# ----------------------------------------------------------------------------------------------
# Primal-dual path following (HKM direction, Mehrotra predictor-corrector)
# ----------------------------------------------------------------------------------------------
#
# Primal: minimize c^T x with S_b = A_b(x) >= 0 and x >= 0 (S always equals A(x): primal feasible).
# Dual: Z_b >= 0, z >= 0 with sum_b tr(F_bi Z_b) + z_i = c_i. Newton on S Z = mu I (HKM):
#   M dx = sigma mu g - c + (corrector),  M_ij = sum_b tr(F_i Z F_j S^-1) + z_i / x_i delta_ij,
#   g_i = sum_b tr(F_i S^-1) + 1 / x_i,  dZ = sigma mu S^-1 - Z - sym(Z dS S^-1) (- sym(dZa dSa S^-1)).
# With F_i = sum_{a of i} V_a U_a^H: tr(F_i X) = sum_a U_a^H X V_a and
# tr(F_i Z F_j S^-1) = sum Q1_ab Q2_ba with Q1 = U^H Z V, Q2 = U^H S^-1 V.

PD_MAX_ITERS = 120
PD_STEP = 0.95
CENTRE_STEPS = 40  # Newton steps of the initial centring
RESID_TOL = 1e-9  # dual residual, relative to the size of the dual terms
STALL_ITERS = 8  # stop when the objective has not moved (relative 1e-12) for this many iterations


def _linear_part(fam: Family, dx: torch.Tensor):
    """Column coefficients of A(x + dx) - A(x) (constant groups drop out)."""
    live = (fam.var >= 0).to(torch.float64)
    xc = dx[fam.var.clamp_min(0)] * live
    return fam.g_self * xc, fam.g_pair * xc


def _max_step(L: torch.Tensor, D: torch.Tensor) -> float:
    """Largest alpha with L L^H + alpha D >= 0 for every matrix of the batch (inf if none binds)."""
    Y = torch.linalg.solve_triangular(L, D, upper=False)
    Y = torch.linalg.solve_triangular(L, Y.mH, upper=False)
    lam = float(torch.linalg.eigvalsh((Y + Y.mH) / 2)[..., 0].min())
    return math.inf if lam >= 0 else -1.0 / lam


class _PDState:
    """Per chunk: S = A(x), its Cholesky factor and inverse, Z, and P_X = U^H X U for X = Z, S^-1.

    Many columns of U are unit vectors (a state's own coordinate, an entry coordinate): for those,
    U^H X U only gathers entries of X and of X U_rest, so P_X costs m^2 r + m r^2 with r the
    number of other columns instead of m^2 R + m R^2."""

    def __init__(self, fam, U, x, Z, layout):
        self.fam, self.U, self.layout = fam, U, layout
        gs, gp = fam.coeffs(x)
        self.S = _assemble(U, gs, gp, fam.partner)
        self.L, info = torch.linalg.cholesky_ex(self.S)
        if bool((info != 0).any()):
            raise RuntimeError("primal iterate left the feasible set")
        self.Si = torch.cholesky_inverse(self.L)
        self.Z = Z
        self.vidx = fam.var[fam.var >= 0]

    def gram(self, X) -> torch.Tensor:
        """P = U^H X U restricted to the live columns (those of a variable)."""
        lay = self.layout
        Ur = self.U[..., lay.rest]
        XUr = X @ Ur
        R = len(lay.order)
        P = torch.empty(X.shape[0], R, R, dtype=X.dtype)
        nr = len(lay.rest)
        P[:, :nr, :nr] = Ur.mH @ XUr
        P[:, nr:, :nr] = XUr[:, lay.unit_coord, :] * lay.unit_val.conj()[None, :, None]
        P[:, :nr, nr:] = P[:, nr:, :nr].mH
        P[:, nr:, nr:] = X[:, lay.unit_coord][:, :, lay.unit_coord] * (
            lay.unit_val.conj()[:, None] * lay.unit_val[None, :])[None]
        return P[:, lay.inv][:, :, lay.inv]  # back to the live-column order

    def times_gamma(self, P) -> torch.Tensor:
        """P Gu (Gu: unit coefficients of Gamma on the live columns)."""
        lay = self.layout
        return P * lay.gs.to(P.dtype) + P[..., lay.partner] * lay.gp.to(P.dtype)

    def schur_and_traces(self, n):
        """(M, sum tr(F_i S^-1), sum tr(F_i Z)) per variable."""
        Q1 = self.times_gamma(self.gram(self.Z))
        Q2 = self.times_gamma(self.gram(self.Si))
        hc = (Q1.real * Q2.real.transpose(-2, -1) - Q1.imag * Q2.imag.transpose(-2, -1)).sum(0) \
            if Q1.is_complex() else (Q1 * Q2.transpose(-2, -1)).sum(0)
        h = torch.zeros(n, hc.shape[1], dtype=torch.float64)
        h.index_add_(0, self.vidx, hc)
        M = torch.zeros(n, n, dtype=torch.float64)
        M.index_add_(1, self.vidx, h)
        diag = lambda Q: self.scatter(torch.diagonal(Q, dim1=-2, dim2=-1).real.sum(0), n)  # noqa: E731
        return M, diag(Q2), diag(Q1)

    def traces(self, X, n) -> torch.Tensor:
        """sum over the batch of Re U_a^H X V_a, per variable (X need not be Hermitian)."""
        fam = self.fam
        live = fam.var >= 0
        V = (self.U * fam.g_self.to(self.U.dtype) + self.U[..., fam.partner] * fam.g_pair.to(self.U.dtype))[..., live]
        return self.scatter((self.U[..., live].conj() * (X @ V)).sum(-2).real.sum(0), n)

    def scatter(self, cols: torch.Tensor, n: int) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.float64)
        out.index_add_(0, self.vidx, cols)
        return out

    def dS(self, dx) -> torch.Tensor:
        gs, gp = _linear_part(self.fam, dx)
        return _assemble(self.U, gs, gp, self.fam.partner)

    def dZ(self, dS, target_mu, extra=None) -> torch.Tensor:
        ZdS = self.Z @ dS @ self.Si
        out = target_mu * self.Si - self.Z - (ZdS + ZdS.mH) / 2
        if extra is not None:
            out = out - (extra + extra.mH) / 2
        return out


@dataclass
class _Layout:
    """Live columns split into general ones (``rest``) and scaled unit vectors (``unit_coord``)."""

    rest: torch.Tensor
    unit_coord: torch.Tensor
    unit_val: torch.Tensor
    order: torch.Tensor  # live column indices: rest first, then units
    inv: torch.Tensor  # position in ``order`` of each live column (in live order)
    gs: torch.Tensor
    gp: torch.Tensor
    partner: torch.Tensor


def _layout(fam: Family) -> _Layout:
    live = torch.nonzero(fam.var >= 0).flatten()
    allU = torch.cat(fam.chunks)  # (F_total, m, R)
    nz = (allU.abs() > 0)
    rest, units, coord, val = [], [], [], []
    for a in live.tolist():
        rows = torch.nonzero(nz[:, :, a].any(0)).flatten()
        if len(rows) == 1:
            k = int(rows[0])
            col = allU[:, k, a]
            if bool((col == col[0]).all()):
                units.append(a)
                coord.append(k)
                val.append(col[0])
                continue
        rest.append(a)
    order = torch.tensor(rest + units, dtype=torch.long)
    pos = {a: i for i, a in enumerate(live.tolist())}
    inv = torch.empty(len(order), dtype=torch.long)
    for i, a in enumerate(order.tolist()):
        inv[pos[a]] = i
    # partner / coefficients in live-column numbering (a constant partner cannot occur: groups share a variable)
    live_pos = torch.full((fam.var.shape[0],), -1, dtype=torch.long)
    live_pos[live] = torch.arange(len(live))
    partner = live_pos[fam.partner[live]]
    dtype = allU.dtype
    unit_val = torch.stack(val).to(dtype) if val else torch.zeros(0, dtype=dtype)
    return _Layout(torch.tensor(rest, dtype=torch.long), torch.tensor(coord, dtype=torch.long), unit_val,
                   order, inv, fam.g_self[live], fam.g_pair[live], partner)


def _update(states, x, z, dx, dz, dZs, ap, ad, tries: int = 40):
    """Take the steps, shrinking the primal (dual) one while S (Z) fails to factor in floating point."""
    for _ in range(tries):
        xn, zn = x + ap * dx, z + ad * dz
        if bool((xn <= 0).any()):
            ap *= 0.8
            continue
        if bool((zn <= 0).any()):
            ad *= 0.8
            continue
        try:
            new = [_PDState(st.fam, st.U, xn, None, st.layout) for st in states]
        except RuntimeError:
            ap *= 0.8
            continue
        ok = True
        for ns, st, dZ in zip(new, states, dZs):
            Zn = st.Z + ad * dZ
            ns.Z = (Zn + Zn.mH) / 2
            if bool((torch.linalg.cholesky_ex(ns.Z)[1] != 0).any()):
                ok = False
                break
        if not ok:
            ad *= 0.8
            continue
        return new, xn, zn
    return None


def solve_pd(families: list[Family], n_vars: int, objective: int, x0: torch.Tensor, *, tol: float = 1e-8,
             max_iters: int = PD_MAX_ITERS, track=None) -> SolveResult:
    """Minimize x[objective] over the LMIs and x >= 0 from a strictly feasible x0."""
    x = x0.clone().to(torch.float64)
    n = n_vars
    c = torch.zeros(n, dtype=torch.float64)
    c[objective] = 1.0
    row_scaling(families, x)
    layouts = {id(fam): _layout(fam) for fam in families}
    chunks = [(fam, U) for fam in families for U in fam.chunks]
    nu = sum(U.shape[0] * U.shape[1] for _, U in chunks) + n
    # centre first (barrier with the objective eliminated): at a central point x(tau),
    # Z = S^-1 / tau and z = 1 / (tau x) satisfy the dual equations exactly
    tau = nu / max(float(x[objective]), 1e-300)
    elim = [_objective_entries(fam, objective) for fam in families]
    x, centring = _newton_reduced(families, elim, x, n, objective, tau, CENTRE_STEPS)
    mu = 1.0 / tau
    states = []
    for fam, U in chunks:
        st = _PDState(fam, U, x, None, layouts[id(fam)])
        st.Z = mu * st.Si
        states.append(st)
    z = mu / x
    history, info = [], {"iterations": 0, "centring_steps": centring}
    recent: list[float] = []
    for it in range(max_iters):
        M = torch.diag(z / x)
        g_si = 1.0 / x
        tr_z = z.clone()
        for st in states:
            m_, g_, t_ = st.schur_and_traces(n)
            M, g_si, tr_z = M + m_, g_si + g_, tr_z + t_
        gap = sum(float((st.Z * st.S.conj()).real.sum()) for st in states) + float(z @ x)
        resid = c - tr_z
        info["iterations"] = it
        if track is not None:
            track(it, float(x[objective]), gap, float(resid.abs().max()))
        history.append(x.clone())
        scale = 1.0 + float(tr_z.abs().max())
        if gap < tol * max(float(x[objective]), 1e-300) and float(resid.abs().max()) < RESID_TOL * scale:
            break
        recent.append(float(x[objective]))
        if len(recent) > STALL_ITERS and abs(recent[-1 - STALL_ITERS] - recent[-1]) <= 1e-12 * abs(recent[-1]) \
                and gap < 1e-5 * max(float(x[objective]), 1e-300):
            info["stopped"] = "stalled at the optimum"
            break
        mu = gap / nu
        sc = torch.sqrt(torch.clamp(torch.diagonal(M), min=1e-300))
        Lm, inf_ = torch.linalg.cholesky_ex(M / sc[:, None] / sc[None, :])
        if int(inf_) != 0:
            Lm = torch.linalg.cholesky(M / sc[:, None] / sc[None, :] + 1e-12 * torch.eye(n, dtype=torch.float64))
        solve_m = lambda r: torch.cholesky_solve((r / sc)[:, None], Lm)[:, 0] / sc  # noqa: E731
        g_si = g_si - 1.0 / x  # matrix part; the 1/x of x >= 0 is added back below
        g_all = g_si + 1.0 / x
        z_chol = [torch.linalg.cholesky(st.Z) for st in states]  # Z > 0 is kept by _update

        def direction(target, corr=None, corr_lp=None):
            """Newton direction for S Z = target I; ``corr``: the second-order terms dZa dSa S^-1."""
            rhs = target * g_all - c
            if corr is not None:
                rhs = rhs - sum(st.traces(k, n) for st, k in zip(states, corr)) - corr_lp / x
            dx = solve_m(rhs)
            dSs = [st.dS(dx) for st in states]
            dZs = [st.dZ(dS, target, None if corr is None else k)
                   for st, dS, k in zip(states, dSs, corr or [None] * len(states))]
            dz = target / x - z - z * dx / x - (0.0 if corr_lp is None else corr_lp / x)
            return dx, dSs, dZs, dz

        def steps(dx, dSs, dZs, dz):
            ap, ad = math.inf, math.inf
            neg = dx < 0
            if bool(neg.any()):
                ap = float((-x[neg] / dx[neg]).min())
            negz = dz < 0
            if bool(negz.any()):
                ad = float((-z[negz] / dz[negz]).min())
            for st, dS, dZ, LZ in zip(states, dSs, dZs, z_chol):
                ap = min(ap, _max_step(st.L, dS))
                ad = min(ad, _max_step(LZ, dZ))
            return min(1.0, PD_STEP * ap), min(1.0, PD_STEP * ad)

        # predictor
        dx_a, dS_aff, dZ_aff, dz_a = direction(0.0)
        ap, ad = steps(dx_a, dS_aff, dZ_aff, dz_a)
        mu_aff = sum(float(((st.Z + ad * dZ) * (st.S + ap * dS).conj()).real.sum())
                     for st, dS, dZ in zip(states, dS_aff, dZ_aff))
        mu_aff += float(((x + ap * dx_a) * (z + ad * dz_a)).sum())
        sigma = min(1.0, (mu_aff / max(gap, 1e-300)) ** 3)
        # corrector
        corr = [dZ @ dS @ st.Si for st, dZ, dS in zip(states, dZ_aff, dS_aff)]
        dx, dSs, dZs, dz = direction(sigma * mu, corr, dz_a * dx_a)
        ap, ad = steps(dx, dSs, dZs, dz)
        moved = _update(states, x, z, dx, dz, dZs, ap, ad)
        if moved is None:
            info["stopped"] = "no step keeps both iterates positive definite"
            break
        states, x, z = moved
    info["history_len"] = len(history)
    return SolveResult(x=x, history=history, info=info)


def _step_to_boundary(x: torch.Tensor, step: torch.Tensor, free: torch.Tensor) -> float:
    """The largest step length <= 1 that keeps the barrier coordinates (``free``) of x positive,
    shortened to 99 % of the way to the boundary."""
    neg = (step < 0) & free
    if not bool(neg.any()):
        return 1.0
    return min(1.0, 0.99 * float((-x[neg] / step[neg]).min()))
