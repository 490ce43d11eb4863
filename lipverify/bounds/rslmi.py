"""Method ``rslmi``: randomized-sketch LMI per layer, each layer CERTIFIED by a deterministic bound.

For every linear node W_k (dense, convolution with any stride/padding/groups, average pooling, or
any other ``LinearOp``, used only through ``apply`` and its adjoint):

1. **Estimate** tau_hat_k, the smallest tau satisfying the sketched LMI
   ``S^T (tau I - W_k^T W_k) S >= 0`` for a Gaussian range-finder sketch S of dimension m
   (``options["sketch_dim"]``, default 32; see :mod:`lipverify.bounds.sketch`). tau_hat_k is a
   Rayleigh-Ritz value, so tau_hat_k <= ||W_k||^2: it is an estimate, never a certificate.
2. **Certify** tau_k: raise tau_hat_k until a deterministic upper bound proves it,
   ``tau_k = max(tau_hat_k, u_k^2)`` with u_k an inflated float64 upper bound on ||W_k||: exact SVD
   for dense maps (``dense_norm``), the FFT/polyphase symbol bound with Gram iteration for large
   convolutions (the sketch's sigma_hat is the Gram iteration's stopping floor, which replaces
   the power iteration ``conv_norm`` would run), the exact unrolled SVD for small ones, and the
   op's own certified ``factor`` otherwise.

The global bound propagates sqrt(tau_k) through the graph as ``product`` does (residual Add:
sum of the branches). Residual blocks whose branch is linear (x + L x, with L a chain of linear
ops) are bounded as a whole by a certified ||I + L|| when L is small enough to unroll, which is
never worse than 1 + ||L|| and often much better.

Each LayerBound carries ``extra["tau_hat"]`` (sketched estimate, labelled as such) beside the
certified factor; the witness carries the certified tau_k per node and the block bounds, which
``lipverify.verifier.scaled`` re-checks with different algorithms.
"""

from __future__ import annotations

import math
import time

import torch

from lipverify.bounds import register
from lipverify.bounds.base import BoundContext, BoundMethod, BoundResult, LayerBound
from lipverify.bounds.sketch import linear_map, sketched_tau
from lipverify.graph.ir import Graph, Node
from lipverify.norms.dense import dense_norm
from lipverify.norms.margin import NormResult, inflate
from lipverify.ops.base import LinearOp
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense, Shift
from lipverify.ops.merge import Add, Sub

DEFAULT_SKETCH_DIM = 32
DEFAULT_SKETCH_ITERS = 2
UNROLL_BLOCK_MAX = 4096  # residual blocks x + L x with at most this many inputs get ||I + L|| exactly


def certify_linear(op: LinearOp, in_shape, sigma_hint: float = 0.0, device: str = "cpu") -> NormResult:
    """Deterministic certified upper bound on ||op|| (inflated), using ``sigma_hint`` (a lower
    estimate, e.g. the sketch's) to stop the conv Gram iteration early. The hint never enters the
    bound itself, only when to stop refining frequencies that cannot be the maximum."""
    if isinstance(op, Dense):
        return dense_norm(op.weight, device=device)
    if isinstance(op, Conv):
        from lipverify.norms.conv import _fft_dim, _upper, conv_geometry, conv_norm, polyphase

        geo = conv_geometry(op.weight, in_shape, op.stride, op.pads, op.dilation, op.groups)
        if geo.n_in * geo.n_out <= 4_000_000:
            return conv_norm(op.weight, in_shape, op.stride, op.pads, op.dilation, op.groups, device=device)
        poly = polyphase(op.weight, geo, device)
        bound, how = _upper(geo, poly, sigma_hint)
        return NormResult(upper=inflate(bound, _fft_dim(geo, poly)), lower=sigma_hint, method=how)
    return op.factor(tuple(in_shape), device=device)


# ----------------------------------------------------------------------------------------------
# Residual blocks with a linear branch: x + L x
# ----------------------------------------------------------------------------------------------


def linear_branch(graph: Graph, merge: Node) -> tuple[str, list[Node]] | None:
    """If ``merge`` adds/subtracts x and L(x) + c with L a chain of linear/shift nodes (used only
    there), return (x, chain of nodes from x to the merge input); else None."""
    if not isinstance(merge.op, (Add, Sub)) or len(merge.inputs) != 2:
        return None
    for branch_index in (1, 0):
        skip, end = merge.inputs[1 - branch_index], merge.inputs[branch_index]
        chain: list[Node] = []
        name = end
        while name != skip and name != graph.input_name:
            node = graph.node(name)
            users = graph.consumers(name)
            if node.is_merge or not isinstance(node.op, (LinearOp, Shift)) or len(users) != 1:
                break
            chain.append(node)
            name = node.inputs[0]
        if name == skip and chain and graph.shape_of(skip) == graph.shape_of(end):
            return skip, chain[::-1]
    return None


def block_matrix(graph: Graph, merge: Node, skip: str, chain: list[Node]) -> torch.Tensor:
    """Unrolled matrix of x -> x ± L x (float64), rows/columns in flattened per-sample order."""
    shape = graph.shape_of(skip)
    n = math.prod(shape)
    x = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(shape))
    y = x
    with torch.no_grad():
        for node in chain:
            if isinstance(node.op, LinearOp):
                y = node.op.apply(y)
    # Sub: x - L x or L x - x = -(x - L x), the same norm either way
    sign = -1.0 if isinstance(merge.op, Sub) else 1.0
    total = x + sign * y
    return total.reshape(n, n).T


def residual_blocks(graph: Graph, device: str = "cpu") -> dict[str, dict]:
    """Certified ||I ± L|| for every residual merge with a small linear branch."""
    blocks = {}
    for node in graph.nodes:
        if not node.is_merge:
            continue
        found = linear_branch(graph, node)
        if found is None:
            continue
        skip, chain = found
        if math.prod(graph.shape_of(skip)) > UNROLL_BLOCK_MAX:
            continue
        r = dense_norm(block_matrix(graph, node, skip, chain), device=device)
        blocks[node.name] = {"skip": skip, "chain": [c.name for c in chain], "factor": r.upper}
    return blocks


def propagate_with_blocks(graph: Graph, factors: dict[str, float], blocks: dict[str, dict]) -> float:
    """Like ``product.propagate``, but a merge listed in ``blocks`` may use its block bound:
    Lip(input -> x + L x) <= ||I + L|| * Lip(input -> x). The smaller of the two rules is kept."""
    bound = {graph.input_name: 1.0}
    for n in graph.nodes:
        if n.is_merge:
            value = n.op.combine([bound[i] for i in n.inputs])
            if n.name in blocks:
                value = min(value, blocks[n.name]["factor"] * bound[blocks[n.name]["skip"]])
            bound[n.name] = value
        else:
            bound[n.name] = factors[n.name] * bound[n.inputs[0]]
    return inflate(bound[graph.output], len(graph.nodes))


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


@register
class RSLMIBound(BoundMethod):
    name = "rslmi"

    def fits_auto(self, graph, device="cpu") -> bool:
        # it certifies the same value as `product` (the sketch is only an estimate); its gain is speed
        # on large models, so `auto` runs product instead and rslmi is chosen explicitly
        return False
    description = ("RS-LMI: per-layer sketched LMI estimates tau_hat (m-dim Gaussian sketch), each raised to a "
                   "deterministically certified tau; residual blocks with linear branches bounded as a whole")

    def run(self, graph: Graph, ctx: BoundContext) -> BoundResult:
        start = time.perf_counter()
        m = int(ctx.options.get("sketch_dim", DEFAULT_SKETCH_DIM))
        iters = int(ctx.options.get("sketch_iters", DEFAULT_SKETCH_ITERS))
        work = torch.float32 if ctx.options.get("sketch_float32", ctx.device == "cpu") else torch.float64
        unary = [n for n in graph.nodes if not n.is_merge]
        rows, factors, taus, tau_hats = [], {}, {}, {}
        for i, node in enumerate(ctx.track(unary, "RS-LMI per-layer sketches", len(unary))):
            in_shape = graph.in_shape(node)
            extra: dict = {}
            if isinstance(node.op, LinearOp):
                exact_map = linear_map(node.op, in_shape, node.out_shape, device=ctx.device)
                work_map = (linear_map(node.op, in_shape, node.out_shape, work, ctx.device)
                            if work != torch.float64 else None)
                est = sketched_tau(exact_map, m, iters, seed=ctx.seed + i, device=ctx.device, work_map=work_map)
                cert = certify_linear(node.op, in_shape, est.sigma_hat, ctx.device)
                # raise tau_hat until certified: the certified tau is the larger of the two
                factor = max(cert.upper, est.sigma_hat)
                while factor * factor < est.tau_hat:  # float rounding of the square: round up
                    factor = math.nextafter(factor, math.inf)
                tau_hats[node.name] = est.tau_hat
                extra = {"tau_hat": est.tau_hat, "tau_hat_is": "sketched estimate (not certified)",
                         "sketch_dim": est.sketch_dim, "tau_certified": factor * factor,
                         "certified_by": cert.method}
                lower = max(est.sigma_hat, cert.lower or 0.0)
                how = f"sketch m={est.sketch_dim} → {cert.method}"
            else:
                cert = node.op.factor(in_shape, device=ctx.device)
                factor, lower, how = cert.upper, cert.lower, cert.method
            factors[node.name] = factor
            taus[node.name] = factor * factor
            rows.append(LayerBound(name=node.source or node.name, op=node.op.describe(), in_shape=list(in_shape),
                                   out_shape=list(node.out_shape), factor=factor, lower=lower, how=how, extra=extra))
        blocks = residual_blocks(graph, ctx.device)
        value = propagate_with_blocks(graph, factors, blocks)
        notes = []
        if blocks:
            notes.append(f"rslmi: {len(blocks)} residual block(s) with a linear branch bounded by ||I + L||")
        return BoundResult(
            method=self.name, value=value, layers=rows,
            check="each sketched tau_hat raised to a deterministic float64 bound (SVD / FFT-Gram) with rounding margin",
            witness={"tau": taus, "blocks": blocks},
            info={"factors": factors, "tau_hat": tau_hats, "tau_hat_is": "sketched estimates (not certified)"},
            seconds=time.perf_counter() - start, notes=notes,
        )

