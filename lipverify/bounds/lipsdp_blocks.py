"""Block-tridiagonal algebra of the LipSDP matrix A(rho, T) = -M(rho, T), used by the solvers.

Blocks are layers: block 0 is the (QR-reduced) input, block k >= 1 the k-th hidden layer, block l
the last hidden layer; hidden layer k (0 <= k < l) has multipliers t_k coupling blocks k and k+1:

    A[0,0]   = rho I + p_0 W_0^T T_0 W_0
    A[k,k]   = 2 T_{k-1} + p_k W_k^T T_k W_k          (1 <= k <= l-1)
    A[l,l]   = 2 T_{l-1} - W_l^T W_l
    A[k,k+1] = s_k W_k^T T_k                        p_k = 2 alpha_k beta_k, s_k = -(alpha_k + beta_k)

Everything costs O(sum of n_k^3) per factorization; nothing forms the dense matrix. With the
forward Schur complements Sigma_0 = A[0,0], Sigma_{k+1} = A[k+1,k+1] - C_k^T Sigma_k^{-1} C_k and
F_k = Sigma_k^{-1} C_k, A = L D L^T with D = diag(Sigma_k) and L's sub-diagonal blocks F_k^T, so
log det A = sum log det Sigma_k and the inverse S = A^{-1} satisfies (row k of L^T S = D^{-1} L^{-1})

    S[k,j] = -F_k S[k+1,j]  (j > k),     S[k,k] = Sigma_k^{-1} - S[k,k+1] F_k^T.

The barrier's gradient needs only S's tridiagonal blocks ("selected inversion"); its exact Hessian
H_ij = tr(S A_i S A_j) over neurons i, j needs every block S[a,b] (O(l^2 n^3), still never the
dense Newton system of the old solver). This module only computes; soundness never rests on it
(``lipverify.verifier.lipsdp`` re-checks every certificate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

F64 = torch.float64


def reduce_input(W0: torch.Tensor) -> torch.Tensor:
    """R^T with W0 = R^T Q^T (QR of W0^T) when W0 is wide: an exact congruence of the input block
    (W0^T K W0 and R K R^T have the same nonzero spectrum), shrinking it to rank(W0) dimensions."""
    if W0.shape[1] > W0.shape[0]:
        return torch.linalg.qr(W0.T, mode="r")[1].T
    return W0


@dataclass
class Factor:
    """Block LDL^T of A: Sigma_k's Cholesky factors and F_k = Sigma_k^{-1} C_k."""

    chol: list
    F: list
    logdet: float
    X: list  # L_k^{-1} C_k: the sub-diagonal blocks (transposed) of the block Cholesky factor


class Chain:
    """Problem data on one device, in float64: weights (input reduced), slopes as (p_k, s_k)."""

    def __init__(self, weights, slopes, device="cpu", reduce=True):
        dev = torch.device(device)
        ws = [torch.as_tensor(w).to(device=dev, dtype=F64) for w in weights]
        if reduce:
            ws[0] = reduce_input(ws[0])
        self.W = ws
        self.device = dev
        self.l = len(ws) - 1
        self.ns = [int(ws[0].shape[1])] + [int(w.shape[0]) for w in ws[:-1]]
        self.hidden = self.ns[1:]
        self.N = int(sum(self.hidden))
        self.p = [2.0 * a * b for a, b in slopes]
        self.s = [-(a + b) for a, b in slopes]
        self.WlTWl = ws[-1].T @ ws[-1]
        self.offsets = np.concatenate([[0], np.cumsum(self.hidden)]).astype(int)  # neurons per layer
        self.block_offsets = np.concatenate([[0], np.cumsum(self.ns)]).astype(int)  # rows of A per block

    def split(self, t: torch.Tensor) -> list:
        o = self.offsets
        return [t[o[k]:o[k + 1]] for k in range(self.l)]

    def eye(self, n):
        return torch.eye(n, dtype=F64, device=self.device)

    def blocks(self, rho: float, T: list):
        """Diagonal blocks D[0..l] and couplings C[0..l-1] (C[k] = A[k, k+1])."""
        D, C = [], []
        for k in range(self.l + 1):
            blk = rho * self.eye(self.ns[0]) if k == 0 else torch.diag(2.0 * T[k - 1])
            if k < self.l:
                Wk = self.W[k]
                if self.p[k] != 0.0:
                    blk = blk + self.p[k] * (Wk.T * T[k]) @ Wk
                C.append(self.s[k] * (Wk.T * T[k]))
            else:
                blk = blk - self.WlTWl
            D.append(blk)
        return D, C

    # -- factorization ---------------------------------------------------------------------------
    def factor(self, rho: float, T: list, need_F: bool = True) -> Factor | None:
        """Block LDL^T, or None when A is not (numerically) positive definite."""
        D, C = self.blocks(rho, T)
        chol, F, Xs, logdet, X = [], [], [], 0.0, None
        for k in range(self.l + 1):
            sig = D[k] if X is None else D[k] - X.T @ X
            L, info = torch.linalg.cholesky_ex(sig)
            if int(info) != 0:
                return None
            logdet += 2.0 * float(torch.log(torch.diagonal(L)).sum())
            chol.append(L)
            if k < self.l:
                X = torch.linalg.solve_triangular(L, C[k], upper=False)  # L^{-1} C_k
                Xs.append(X)
                if need_F:
                    F.append(torch.linalg.solve_triangular(L.T, X, upper=True))  # Sigma^{-1} C_k
        return Factor(chol, F, logdet, Xs)

    def logdet(self, rho: float, T: list) -> float | None:
        f = self.factor(rho, T, need_F=False)
        return None if f is None else f.logdet

    def input_schur(self, T: list):
        """(log det R, eigenvalues f of F) with R the hidden part of A and F = C_0 R^{-1} C_0^T - (A[0,0] - rho I),
        so that log det A(rho, T) = log det R + sum_j log(rho - f_j) and rho*(T) = max f.
        Backward elimination (Sigma_l = A[l,l], Sigma_k = A[k,k] - C_k Sigma_{k+1}^{-1} C_k^T).
        None when R is not positive definite (then no rho makes A >= 0)."""
        D, C = self.blocks(0.0, T)
        sig, logdet = D[self.l], 0.0
        for k in range(self.l, 0, -1):
            L, info = torch.linalg.cholesky_ex(sig)
            if int(info) != 0:
                return None
            logdet += 2.0 * float(torch.log(torch.diagonal(L)).sum())
            X = torch.linalg.solve_triangular(L, C[k - 1].T, upper=False)  # L^{-1} C_{k-1}^T
            sig = D[k - 1] - X.T @ X
        F = -sig  # sig = A[0,0](rho=0) - C_0 R^{-1} C_0^T
        return logdet, torch.linalg.eigvalsh((F + F.T) / 2)

    def rho_min(self, T: list) -> float:
        """Smallest rho with A(rho, T) >= 0 in floating point (inf if none): lambda_max(F)."""
        r = self.input_schur(T)
        return float(r[1][-1]) if r is not None else float("inf")

    # -- step lengths ----------------------------------------------------------------------------
    def _solve_L(self, f: Factor, v: torch.Tensor) -> torch.Tensor:
        """z with Lc z = v, Lc the block Cholesky factor (diagonal L_k, sub-diagonal X_k^T)."""
        o = self.block_offsets
        out, prev = [], None
        for k in range(self.l + 1):
            r = v[o[k]:o[k + 1]]
            if prev is not None:
                r = r - f.X[k - 1].T @ prev
            prev = torch.linalg.solve_triangular(f.chol[k], r[:, None], upper=False)[:, 0]
            out.append(prev)
        return torch.cat(out)

    def _solve_LT(self, f: Factor, z: torch.Tensor) -> torch.Tensor:
        o = self.block_offsets
        out, nxt = [None] * (self.l + 1), None
        for k in range(self.l, -1, -1):
            r = z[o[k]:o[k + 1]]
            if nxt is not None:
                r = r - f.X[k] @ nxt
            nxt = torch.linalg.solve_triangular(f.chol[k].T, r[:, None], upper=True)[:, 0]
            out[k] = nxt
        return torch.cat(out)

    def _apply_linear(self, drho: float, dT: list, v: torch.Tensor) -> torch.Tensor:
        """(A(rho + drho, T + dT) - A(rho, T)) v, matrix-free (A is affine in (rho, T))."""
        o = self.block_offsets
        vb = [v[o[k]:o[k + 1]] for k in range(self.l + 1)]
        out = [torch.zeros_like(b) for b in vb]
        out[0] = out[0] + drho * vb[0]
        for k in range(self.l):
            Wk, dt = self.W[k], dT[k]
            Wv = Wk @ vb[k]
            out[k + 1] = out[k + 1] + 2.0 * dt * vb[k + 1] + self.s[k] * dt * Wv
            inner = self.s[k] * dt * vb[k + 1]
            if self.p[k] != 0.0:
                inner = inner + self.p[k] * dt * Wv
            out[k] = out[k] + Wk.T @ inner
        return torch.cat(out)

    def max_step(self, f: Factor, drho: float, dT: list, iters: int = 30) -> float:
        """Estimate of the largest alpha with A + alpha dA > 0 (A factored in ``f``): -1 / lambda_min
        of Lc^{-1} dA Lc^{-T} by Lanczos (a fixed start vector: deterministic). Ritz values lie inside
        the spectrum, so this can overestimate slightly: callers confirm with a factorization."""
        n = int(self.block_offsets[-1])
        gen = torch.Generator(device="cpu").manual_seed(12345)
        q = torch.randn(n, generator=gen, dtype=F64).to(self.device)
        q = q / torch.linalg.vector_norm(q)
        Q, alphas, betas = [q], [], []
        for j in range(min(iters, n)):
            w = self._solve_L(f, self._apply_linear(drho, dT, self._solve_LT(f, Q[-1])))
            a = float(w @ Q[-1])
            alphas.append(a)
            for qq in Q:  # full re-orthogonalisation (few vectors)
                w = w - float(w @ qq) * qq
            b = float(torch.linalg.vector_norm(w))
            if b <= 1e-14 * max(1.0, abs(a)):
                break
            betas.append(b)
            Q.append(w / b)
        m = len(alphas)
        Tm = torch.diag(torch.tensor(alphas, dtype=F64))
        if m > 1:
            off = torch.tensor(betas[:m - 1], dtype=F64)
            Tm = Tm + torch.diag(off, 1) + torch.diag(off, -1)
        mu_min = float(torch.linalg.eigvalsh(Tm)[0])
        return math.inf if mu_min >= 0 else -1.0 / mu_min

    # -- inverse blocks ----------------------------------------------------------------------------
    @staticmethod
    def _inv(L):
        return torch.cholesky_inverse(L)

    def selected_inverse(self, f: Factor):
        """Diagonal blocks S[k,k] and super-diagonal blocks S[k,k+1] of S = A^{-1}."""
        l = self.l
        Sd, So = [None] * (l + 1), [None] * l
        Sd[l] = self._inv(f.chol[l])
        for k in range(l - 1, -1, -1):
            So[k] = -f.F[k] @ Sd[k + 1]
            Sd[k] = self._inv(f.chol[k]) - So[k] @ f.F[k].T
            Sd[k] = (Sd[k] + Sd[k].T) / 2
        return Sd, So

    def gradient(self, Sd, So):
        """d(-log det A)/d rho and d(-log det A)/d t (all neurons, concatenated)."""
        g = []
        for k in range(self.l):
            Wk = self.W[k]
            gk = 2.0 * torch.diagonal(Sd[k + 1]) + 2.0 * self.s[k] * (Wk * So[k].T).sum(1)
            if self.p[k] != 0.0:
                gk = gk + self.p[k] * ((Wk @ Sd[k]) * Wk).sum(1)
            g.append(-gk)
        return -torch.trace(Sd[0]), torch.cat(g)

    def dual_objective(self, Sd):
        """tr(W_l S[l,l] W_l^T) / tr(S[0,0]): the dual value of Z = S / tr(S[0,0]) (see lipsdp_ipm)."""
        Wl = self.W[-1]
        return float(((Wl @ Sd[self.l]) * Wl).sum()) / float(torch.trace(Sd[0]))

    # -- exact Hessian -----------------------------------------------------------------------------
    def hessian(self, f: Factor, Sd, layer: bool = False):
        """Exact Hessian of -log det A over (rho, t): (h_rr, h_rt, H_tt).

        Neuron i of layer k enters A as A_i = U_i G_k U_i^T with U_i = [w_i at block k, e_i at block
        k+1] and G_k = [[p_k, s_k], [s_k, 2]]; so H_ij = tr(G_k Y G_k' Y'^T) with Y = U_i^T S U_j,
        i.e. for layers k <= k' the block H[k,k'] = sum_{pqrs} G_k[p,q] G_k'[r,s] Y_qr o Y_ps with
        Y_aa = W_k S[k,k'] W_k'^T, Y_ab = W_k S[k,k'+1], Y_ba = S[k+1,k'] W_k'^T, Y_bb = S[k+1,k'+1].
        Block columns of S are generated right to left (S[a,b] = -F_a S[a+1,b]), two at a time.
        ``layer``: return E^T H E (one variable per layer) without forming the neuron matrix.
        """
        l, W = self.l, self.W
        N = self.N
        o = self.offsets
        nvar = l if layer else N
        H = torch.zeros(nvar, nvar, dtype=F64, device=self.device)
        G = [[[self.p[k], self.s[k]], [self.s[k], 2.0]] for k in range(l)]
        col_next = None  # S[:, j+1] blocks 0..j+1
        h_rt = torch.zeros(nvar, dtype=F64, device=self.device)
        S0 = [None] * (l + 1)  # S[0, j] blocks (row 0)
        for j in range(l, -1, -1):
            col = [None] * (j + 1)
            col[j] = Sd[j]
            for a in range(j - 1, -1, -1):
                col[a] = -f.F[a] @ col[a + 1]
            S0[j] = col[0]
            kp = j  # layer k' = j uses block columns j (a-part) and j+1 (b-part)
            if kp < l:
                for k in range(0, kp + 1):
                    Yaa = W[k] @ col[k] @ W[kp].T
                    Yab = W[k] @ col_next[k]
                    Yba = (col[k + 1] @ W[kp].T) if k + 1 <= kp else (W[kp] @ col_next[kp]).T
                    Ybb = col_next[k + 1]
                    Y = {(0, 0): Yaa, (0, 1): Yab, (1, 0): Yba, (1, 1): Ybb}
                    blk = self._pair_block(G[k], G[kp], Y, layer)
                    if layer:
                        H[k, kp] = blk
                        H[kp, k] = blk
                    else:
                        H[o[k]:o[k + 1], o[kp]:o[kp + 1]] = blk
                        if k != kp:
                            H[o[kp]:o[kp + 1], o[k]:o[k + 1]] = blk.T
            col_next = col
        # rho couplings: h_i = tr(E0 S A_i S) = sum_pq G[p,q] <R_p, R_q> with R_a = S[0,k] W_k^T, R_b = S[0,k+1]
        parts = []
        for k in range(l):
            Ra = S0[k] @ W[k].T
            Rb = S0[k + 1]
            hk = 2.0 * (Rb * Rb).sum(0) + 2.0 * self.s[k] * (Ra * Rb).sum(0)
            if self.p[k] != 0.0:
                hk = hk + self.p[k] * (Ra * Ra).sum(0)
            parts.append(hk.sum().reshape(1) if layer else hk)
        h_rt = torch.cat(parts)
        h_rr = (Sd[0] * Sd[0]).sum()
        return h_rr, h_rt, H

    @staticmethod
    def _pair_block(Gk, Gkp, Y, layer):
        """sum_{pqrs} Gk[p,q] Gkp[r,s] Y_qr o Y_ps = sum_{ps} X_ps o Y_ps with X = Gk Y Gkp (2x2 of blocks)."""
        def combine(coeffs_and_mats):
            terms = [c * m for c, m in coeffs_and_mats if c != 0.0 and m is not None]
            return None if not terms else terms[0] if len(terms) == 1 else terms[0] + terms[1]

        GY = {(p, r): combine([(Gk[p][q], Y[q, r]) for q in (0, 1)]) for p in (0, 1) for r in (0, 1)}
        out = 0.0
        for p in (0, 1):
            for s_ in (0, 1):
                X = combine([(Gkp[r][s_], GY[p, r]) for r in (0, 1)])
                if X is not None:
                    out = out + ((X * Y[p, s_]).sum() if layer else X * Y[p, s_])
        return out
