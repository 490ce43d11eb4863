"""Per-node factor checks and the propagation of factors through the graph, re-derived here.

``factor_holds(node, in_shape, claimed)`` proves that ``claimed`` bounds the Lipschitz constant of
one node, from the node's op class (its weights, geometry and slopes: the op classes are part of
what the verifier trusts) by a rule chosen from the op's type, never from what a method said:
Cholesky for weights, closed forms for shape ops, activations, pools and reductions.
``propagate_up`` recomputes Lip(input -> output) from per-node factors with upward rounding.
"""

from __future__ import annotations

import math

import torch

from lipverify.graph.ir import Graph, Node
from lipverify.ops.activation import Activation
from lipverify.ops.base import LinearOp
from lipverify.ops.conv import Conv, ConvTranspose
from lipverify.ops.dense import Dense, LeftMatMul, Scale, Shift
from lipverify.ops.merge import Add, Concat, Sub
from lipverify.ops.pool import AvgPool, MaxPool, Reduce
from lipverify.ops.shape import Broadcast, Pad, Reshape, Slice, Tile, Transpose
from lipverify.ops.softmax import Softmax
from lipverify.verifier.conv import UNROLL_MAX_ENTRIES, conv_norm_at_most, unrolled
from lipverify.verifier.linalg import norm_at_most
from lipverify.verifier.numbers import add_up, fail, mul_up, sqrt_up, up

UNROLL_MAX_INPUTS = 4096  # generic linear ops of at most this many inputs are unrolled and checked


def _max_windows_per_input(op: MaxPool, in_shape) -> int:
    """How many pooling windows read each input position, at most (counted from the op's geometry)."""
    spatial = tuple(in_shape[1:])
    x = torch.zeros((1, 1) + spatial, dtype=torch.float64, requires_grad=True)
    sums = op.window.window_sum(x, op.window.padded_pads(spatial))
    (counts,) = torch.autograd.grad(sums.sum(), x)
    return int(round(float(counts.max())))


def _same_size(node: Node, in_shape) -> bool:
    return math.prod(node.out_shape) == math.prod(in_shape)


def factor_holds(node: Node, in_shape, claimed: float) -> bool:
    op, in_shape = node.op, tuple(in_shape)
    if not (math.isfinite(claimed) and claimed >= 0):
        return False
    same_shape = tuple(node.out_shape) == in_shape
    if isinstance(op, Dense):
        return norm_at_most(op.weight, claimed)
    if isinstance(op, LeftMatMul):
        return norm_at_most(op.matrix, claimed)
    if isinstance(op, (Broadcast, Tile)):
        # every input entry is copied k times into disjoint output entries: norm sqrt(k) exactly
        k = math.prod(node.out_shape) / math.prod(in_shape)
        return k == int(k) and claimed >= sqrt_up(k)
    if isinstance(op, Shift):
        return same_shape and claimed >= 1.0
    if isinstance(op, Scale):
        # a diagonal map only when it does not broadcast its input to a larger shape
        return same_shape and float(op.scale.to(torch.float64).abs().max()) <= claimed
    if isinstance(op, (Reshape, Transpose)):
        return _same_size(node, in_shape) and claimed >= 1.0
    if isinstance(op, (Pad, Slice, Softmax)):
        return claimed >= 1.0
    if isinstance(op, Activation):
        a, b = op.slopes
        return same_shape and max(abs(a), abs(b)) <= claimed
    if isinstance(op, Reduce):
        n = math.prod(in_shape[a] for a in op.axes)
        return claimed >= (1.0 / math.sqrt(n) if op.mean else math.sqrt(n)) * (1 + 4e-16)
    if isinstance(op, MaxPool):
        return claimed >= sqrt_up(_max_windows_per_input(op, in_shape))
    if isinstance(op, Conv):
        return conv_norm_at_most(op.weight, in_shape, op.stride, op.pads, op.dilation, op.groups, claimed,
                                 apply=op.apply)
    if isinstance(op, ConvTranspose):
        if math.prod(in_shape) * math.prod(node.out_shape) <= UNROLL_MAX_ENTRIES:
            return norm_at_most(unrolled(op.apply, in_shape), claimed)
        conv, shape = op.adjoint_conv(tuple(node.out_shape))  # ||op|| <= ||conv|| (see the op's docstring)
        return conv_norm_at_most(conv.weight, shape, conv.stride, conv.pads, conv.dilation, conv.groups, claimed)
    if isinstance(op, AvgPool):
        n_out = math.prod(node.out_shape)
        if math.prod(in_shape) * n_out <= UNROLL_MAX_ENTRIES:
            return norm_at_most(unrolled(op.apply, in_shape), claimed)
        spatial = tuple(in_shape[1:])
        inv_max = float((1.0 / op._counts(spatial, torch.float64, "cpu")).max())
        ones = torch.ones((1, 1) + op.window.kernel, dtype=torch.float64)
        # the window-sum map acts on each channel alike: its norm is the one-channel norm
        return conv_norm_at_most(ones, (1,) + spatial, op.window.stride, op.window.padded_pads(spatial),
                                 op.window.dilation, 1, claimed / up(inv_max) / (1 + 4e-16))
    if isinstance(op, LinearOp) and math.prod(in_shape) <= UNROLL_MAX_INPUTS:
        return norm_at_most(unrolled(op.apply, in_shape), claimed)
    return False


def check_factors(graph: Graph, factors: dict, what: str) -> dict[str, float]:
    """Every unary node needs a claimed factor that holds; returns them as floats."""
    from lipverify.verifier.numbers import claim

    out = {}
    for node in graph.nodes:
        if node.is_merge:
            continue
        if node.name not in factors:
            fail(f"{what}: no factor for {label(node)}")
        value = claim(factors[node.name], f"{what}: the factor of {label(node)}")
        if not factor_holds(node, graph.in_shape(node), value):
            fail(f"{what}: the factor {value!r} claimed for {label(node)} is not a verified upper bound")
        out[node.name] = value
    return out


def merge_bound(node: Node, bounds: list[float]) -> float:
    """Lipschitz bound of a merge from its inputs' bounds (upward rounded)."""
    if isinstance(node.op, (Add, Sub)):
        return add_up(bounds)
    if isinstance(node.op, Concat):
        return sqrt_up(add_up(mul_up(b, b) for b in bounds))
    fail(f"no rule for the merge {label(node)}")


def propagate_up(graph: Graph, factors: dict[str, float], merge=None) -> dict[str, float]:
    """Bound on Lip(input -> t) for every tensor t, with upward rounding. ``merge(node, bounds)``
    may replace the default merge rule (it must itself be verified)."""
    bound = {graph.input_name: 1.0}
    for node in graph.nodes:
        if node.is_merge:
            rule = merge or (lambda n, b: merge_bound(n, [b[i] for i in n.inputs]))
            bound[node.name] = rule(node, bound)
        else:
            bound[node.name] = mul_up(factors[node.name], bound[node.inputs[0]])
    return bound


def label(node: Node) -> str:
    return f"{node.source or node.name} ({node.op.describe()})"
