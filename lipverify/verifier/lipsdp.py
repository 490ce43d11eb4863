"""Checker for ``lipsdp-neuron`` / ``lipsdp-layer`` certificates: witness = {"rho", "T", "mode"}.

The dense chain (weights and slopes) is re-read from the graph here. With c = (a+b)/2 per hidden
layer, the LMI A(rho, T) = -M(rho, T) >= 0 is block tridiagonal (blocks = layers):

    A[0,0]   = rho I + 2 a_0 b_0 W_0^T T_0 W_0
    A[k,k]   = 2 T_{k-1} + 2 a_k b_k W_k^T T_k W_k          (1 <= k <= l-1)
    A[l,l]   = 2 T_{l-1} - W_l^T W_l
    A[k,k+1] = -(a_k + b_k) W_k^T T_k                       (0 <= k <= l-1)

and L^2 <= rho when A >= 0 with T >= 0 (Fazlyab et al. 2019; any slopes, a < 0 included).
The check: a block Cholesky (forward block LDL^T) of A - delta diag(s) where s_i is a row scale
with |A_ij| <= sqrt(s_i s_j) and delta = max(1e-9, 2 n^2 eps). Rounding in forming A is at most
m eps sqrt(s_i s_j) entrywise and a completed Cholesky has backward error at most
(n+1) eps sqrt(a_ii a_jj), so in the scaled matrix diag(s)^-1/2 (.) diag(s)^-1/2 every error is
below n (n+1) eps < delta in norm: success proves A >= 0 exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lipverify.graph.ir import Graph
from lipverify.ops.activation import Activation
from lipverify.ops.dense import Dense, Scale, Shift
from lipverify.ops.shape import Reshape, Transpose
from lipverify.verifier.numbers import EPS, at_least, claim, claim_vector, fail, only_keys, sqrt_up, up

MARGIN_REL = 1e-9


_AFFINE = (Dense, Scale, Shift, Reshape, Transpose)


@dataclass
class DenseChain:
    weights: list  # W_0 .. W_l (float64), as computed here
    slopes: list  # (alpha, beta) per hidden layer
    magnitudes: list  # U_k >= |W_k| entrywise, also bounding the exact weights' magnitudes
    product_depth: int = 0  # largest inner dimension of a float64 product of weights (0: none)


def dense_chain(graph: Graph) -> DenseChain:
    """The graph as a dense chain, re-derived here from the graph's own ops.

    The graph must be a chain of affine ops (Dense, Scale, Shift, Reshape, Transpose) and
    elementwise activations. Each maximal affine run between activations is one affine map on the
    flattened tensors; its linear part is materialised by applying the ops' linear parts
    (``apply``) to the identity basis (Shift only translates). Scalings and permutations of the
    basis are exact up to one rounding per entry; a product of two weights (merged linear maps) is
    rounded relative to |W_2| |W_1|, so ``magnitudes`` carries that bound for the row scales. An
    elementwise activation is elementwise on the flattened tensor too; a chain ending in an
    activation gets the identity as its last weight. Otherwise fail."""
    if not graph.is_chain():
        fail("lipsdp: the graph is not a chain")
    weights, slopes, mags = [], [], []
    depth = 0
    n0 = math.prod(tuple(graph.input_shape))
    basis = torch.eye(n0, dtype=torch.float64)  # rows: images of the unit vectors so far
    mag = basis.clone()  # entrywise bound on |basis| and on the exact map's magnitudes
    has_dense = False
    for n in graph.nodes:
        op, in_shape = n.op, tuple(graph.in_shape(n))
        if isinstance(op, Activation):
            if tuple(n.out_shape) != in_shape:
                fail(f"lipsdp: {op.describe()} changes the shape")
            weights.append(basis.T.contiguous())
            mags.append(mag.T.contiguous())
            slopes.append(tuple(float(s) for s in op.slopes))
            basis = torch.eye(math.prod(in_shape), dtype=torch.float64)
            mag, has_dense = basis.clone(), False
        elif isinstance(op, Shift):
            pass
        elif isinstance(op, Dense):
            W = op.weight.detach().to(device="cpu", dtype=torch.float64)
            k = basis.shape[0]
            basis = op.apply(basis.reshape((k,) + in_shape).to(op.weight.dtype)).reshape(k, -1).to(torch.float64)
            if has_dense:  # a product of weights: rounding relative to |basis| |W|^T
                depth = max(depth, W.shape[1])
            mag = (mag.reshape(-1, W.shape[1]) @ W.abs().T).reshape(k, -1) * (1 + 4 * W.shape[1] * EPS)
            mag = torch.maximum(mag, basis.abs())
            has_dense = True
        elif isinstance(op, (Scale, Reshape, Transpose)):
            k = basis.shape[0]
            dtype = next((v.dtype for v in vars(op).values() if isinstance(v, torch.Tensor) and v.is_floating_point()),
                         torch.float64)
            basis = op.apply(basis.reshape((k,) + in_shape).to(dtype)).reshape(k, -1).to(torch.float64)
            mag = op.apply(mag.reshape((k,) + in_shape).to(dtype)).reshape(k, -1).to(torch.float64).abs()
            mag = torch.maximum(mag * (1 + 2 * EPS), basis.abs())
        else:
            fail(f"lipsdp: {op.describe()} breaks the dense chain")
    weights.append(basis.T.contiguous())
    mags.append(mag.T.contiguous())
    if not slopes:
        fail("lipsdp: the chain has no activation")
    for a, b in slopes:
        if not (math.isfinite(a) and math.isfinite(b) and a < b):
            fail(f"lipsdp: slope interval [{a}, {b}] must satisfy alpha < beta")
    for w in weights:
        if not bool(torch.isfinite(w).all()):
            fail("lipsdp: non-finite weights")
    return DenseChain(weights, slopes, mags, depth)


def _blocks(ws, sl, T, rho):
    l = len(ws) - 1
    D, C = [], []
    for k in range(l + 1):
        blk = (rho * torch.eye(ws[0].shape[1], dtype=torch.float64)) if k == 0 else torch.diag(2.0 * T[k - 1])
        if k < l:
            a, b = sl[k]
            if a * b != 0.0:
                blk = blk + 2.0 * a * b * (ws[k].T * T[k]) @ ws[k]
            C.append(-(a + b) * (ws[k].T * T[k]))
        if k == l:
            blk = blk - ws[l].T @ ws[l]
        D.append(blk)
    return D, C


def _chol(a):
    L, info = torch.linalg.cholesky_ex((a + a.T) / 2)
    return None if int(info) != 0 else L


def row_scales(ws, sl, T, rho, mags=None) -> list:
    """Per block, the row scale s with |A_ij| <= sqrt(s_i s_j) (rho only enters block 0 as rho);
    ``mags`` (entrywise bounds U_k >= |W_k|) replace |W_k| when given."""
    l = len(ws) - 1
    ws = ws if mags is None else mags
    ns = [ws[0].shape[1]] + [w.shape[0] for w in ws[:-1]]
    scl = []
    for k in range(l + 1):
        sk = torch.full((ns[k],), rho, dtype=torch.float64) if k == 0 else 2.0 * T[k - 1]
        if k < l:
            a, b = sl[k]
            sk = sk + (abs(2 * a * b) + abs(a + b)) * ((ws[k] ** 2).T @ T[k])
        if k == l:
            sk = sk + (ws[l] ** 2).sum(0)
        scl.append(sk)
    return scl


def shift_rel(n: int, product_depth: int = 0) -> float:
    """delta: the relative diagonal shift that covers every rounding error (module docstring), plus
    4 n k eps for weights that are float64 products with inner dimension k (merged linear maps)."""
    return max(MARGIN_REL, 2.0 * n * n * EPS) + 4.0 * n * product_depth * EPS


def lmi_holds(ws, sl, T, rho, mags=None, product_depth: int = 0) -> tuple[bool, str]:
    """Block-Cholesky proof that A(rho, T) >= 0 (see the module docstring)."""
    l = len(ws) - 1
    ns = [ws[0].shape[1]] + [w.shape[0] for w in ws[:-1]]
    D, C = _blocks(ws, sl, T, rho)
    scl = row_scales(ws, sl, T, rho, mags)
    rel = shift_rel(sum(ns), product_depth)
    X = None
    for k in range(l + 1):
        s = D[k] - torch.diag(rel * scl[k])
        if X is not None:
            s = s - X.T @ X
        Lk = _chol(s)
        if Lk is None:
            return False, f"the Schur complement at block {k} is not positive definite"
        if k < l:
            X = torch.linalg.solve_triangular(Lk, C[k], upper=False)
    return True, f"block-tridiagonal Cholesky of -M - {rel:.1e} diag(s) (s_i = row scale)"


def verify_lipsdp(graph: Graph, value: float, witness: dict) -> str:
    only_keys(witness, {"rho", "T", "mode"}, "lipsdp")
    if witness.get("mode") not in ("neuron", "layer"):
        fail("lipsdp: the witness's mode must be 'neuron' or 'layer'")
    chain = dense_chain(graph)
    weights, slopes = chain.weights, chain.slopes
    rho = claim(witness.get("rho"), "lipsdp: rho", positive=True)
    raw_T = witness.get("T")
    if not isinstance(raw_T, list) or len(raw_T) != len(weights) - 1:
        fail("lipsdp: the multipliers T do not match the network's hidden layers")
    T = [claim_vector(t, f"lipsdp: T[{k}]", length=weights[k].shape[0]) for k, t in enumerate(raw_T)]
    ok, detail = lmi_holds(weights, slopes, T, rho, chain.magnitudes, chain.product_depth)
    if not ok:
        fail(f"lipsdp: the LMI does not hold for the stored (rho, T): {detail}")
    implied = sqrt_up(up(rho))
    at_least(value, implied, "lipsdp")
    return implied, f"LipSDP LMI re-checked at the stored (rho, T): {detail}"
