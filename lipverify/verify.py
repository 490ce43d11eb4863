"""Independent float64 re-check of a certificate before it is printed as certified.

This module deliberately uses different algorithms from the ones that produced the numbers:
a claimed norm bound tau is checked by a Cholesky factorization of tau^2 I - A^T A (positive
definite iff tau > ||A||), on the dense matrix or, for large convolutions, frequency by frequency.
No solver, no iteration, no randomness.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from typing import TYPE_CHECKING
from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph, Node
from lipverify.norms.conv import verify_conv_bound
from lipverify.ops.activation import Activation
from lipverify.ops.base import LinearOp
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense, Scale, Shift
from lipverify.ops.pool import AvgPool, MaxPool, Reduce
from lipverify.ops.shape import Pad, Reshape, Slice, Transpose
from lipverify.ops.softmax import Softmax

if TYPE_CHECKING:  # importing lipverify.bounds here would import the methods, which import this module
    from lipverify.bounds.base import BoundResult

UNROLL_MAX_INPUTS = 4096  # unroll small linear ops into a dense matrix for the check


def gram_is_below(matrix: torch.Tensor, bound: float) -> bool:
    """True iff bound^2 I - A A^T (or A^T A, the smaller side) is positive definite (Cholesky)."""
    a = matrix.to(torch.float64)
    if bound * bound == 0.0:  # a zero (or denormal) bound holds only for the zero map
        return bound >= 0 and not bool(a.any())
    gram = a @ a.mT if a.shape[-2] <= a.shape[-1] else a.mT @ a
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    _, info = torch.linalg.cholesky_ex(bound * bound * eye - gram)
    return bool((info == 0).all())


def unrolled_matrix(op: LinearOp, in_shape) -> torch.Tensor:
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(in_shape))
    with torch.no_grad():
        return op.apply(eye).reshape(n, -1).T  # (out, in)


def check_factor(node: Node, in_shape, claimed: float) -> bool:
    op = node.op
    if isinstance(op, Dense):
        return gram_is_below(op.weight, claimed)
    if isinstance(op, (Shift, Reshape, Transpose, Pad, Slice, Softmax)):
        return claimed >= 1.0
    if isinstance(op, Scale):
        return float(op.scale.abs().max()) <= claimed
    if isinstance(op, Activation):
        a, b = op.slopes
        return max(abs(a), abs(b)) <= claimed
    if isinstance(op, Reduce):
        n = math.prod(in_shape[a] for a in op.axes)
        return (1.0 / math.sqrt(n) if op.mean else math.sqrt(n)) <= claimed
    if isinstance(op, MaxPool):
        return op.factor(in_shape).upper <= claimed  # exact combinatorial count, recomputed
    if isinstance(op, LinearOp) and math.prod(in_shape) <= UNROLL_MAX_INPUTS:
        return gram_is_below(unrolled_matrix(op, in_shape), claimed)
    if isinstance(op, Conv):
        return verify_conv_bound(op.weight, tuple(in_shape), op.stride, op.pads, op.dilation, op.groups, claimed)
    if isinstance(op, AvgPool):
        spatial = tuple(in_shape[1:])
        counts = op._counts(spatial, torch.float64, "cpu")
        ones = torch.ones((1, 1) + op.window.kernel, dtype=torch.float64)
        inv_max = float((1.0 / counts).max())
        return verify_conv_bound(ones, (1,) + spatial, op.window.stride, op.window.padded_pads(spatial),
                                 op.window.dilation, 1, claimed / inv_max)
    return False


def verify_product(graph: Graph, result: "BoundResult") -> str:
    from lipverify.bounds.product import propagate

    factors = result.witness["factors"]
    for node in graph.nodes:
        if node.is_merge:
            continue
        claimed = factors.get(node.name)
        if claimed is None or not check_factor(node, graph.in_shape(node), claimed):
            raise SoundnessError(f"certificate check failed: the factor {claimed} claimed for {node.source or node.name} "
                                 f"({node.op.describe()}) is not a verified upper bound")
    recomputed = propagate(graph, factors)
    if not recomputed <= result.value * (1 + 1e-12):
        raise SoundnessError(f"certificate check failed: factors give {recomputed}, certificate claims {result.value}")
    return "each factor re-checked by Cholesky of tau^2 I - A^T A (float64); product recomputed"


VERIFIERS: dict[str, Callable[[Graph, "BoundResult"], str]] = {"product": verify_product}


def verify(graph: Graph, result: "BoundResult") -> str:
    """Re-check ``result`` independently; return what passed, raise SoundnessError otherwise."""
    if not (result.value >= 0 and math.isfinite(result.value)):
        raise SoundnessError(f"method {result.method} returned a non-finite or negative bound {result.value}")
    checker = VERIFIERS.get(result.method)
    if checker is None:
        raise SoundnessError(f"no independent verifier for method {result.method!r}; refusing to certify")
    return checker(graph, result)
