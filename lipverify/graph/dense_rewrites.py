"""Exact rewrite of a chain network into the canonical dense chain LipSDP needs.

Common exports do not come as "Dense -> activation -> Dense": an input normalisation (Sub/Div, a
per-pixel Scale and Shift before or after a Flatten), back-to-back linear maps (TLL nets), a
Transpose or Reshape between layers, a network ending in an activation. All of these are exact
rewrites of the same function:

* every maximal run of affine ops between two elementwise activations (Dense, Scale, Shift,
  Reshape/Flatten, Transpose) is ONE affine map on the flattened tensors: it becomes a single
  Dense(M, b) with M the run's linear part (composed exactly: products of the weights, column or
  row scalings, permutations, computed in float64) and b the run applied to zero;
* an elementwise activation acts entry by entry, so on the flattened tensor it is the same
  activation (a permutation commutes with it);
* a chain ending in an activation keeps it; ``dense_chain`` then appends the identity as the last
  weight, so its slope interval enters the LMI as one more hidden layer (tighter than multiplying
  the bound by max(|alpha|, |beta|)).

``canonical_dense_chain(graph)`` returns the rewritten graph (its forward equals the original's up
to float64 rounding, which tests check) or the reason it does not exist.
``lipverify.verifier.lipsdp.dense_chain`` re-derives the same weights independently from the
original graph: nothing here is trusted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lipverify.graph.ir import Graph, Node
from lipverify.ops.activation import Activation
from lipverify.ops.dense import Dense, Scale, Shift
from lipverify.ops.shape import Reshape, Transpose

AFFINE_OPS = (Dense, Scale, Shift, Reshape, Transpose)


def _run_matrix(graph: Graph, run: list[Node], in_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, b) with run(x) = M flat(x) + b on flattened tensors, in float64."""
    n_in = math.prod(in_shape)
    M = None  # None = identity so far (avoids materialising it for a plain Dense)
    shape = tuple(in_shape)
    for node in run:
        op = node.op
        if isinstance(op, Shift):
            pass  # translation: only the offset b changes (computed below)
        elif isinstance(op, Dense) and len(shape) == 1:
            W = op.weight.detach().to(torch.float64)
            M = W.clone() if M is None else W @ M
        else:  # apply the linear part to the current basis (exact for scalings and permutations)
            basis = torch.eye(n_in, dtype=torch.float64) if M is None else M.T
            out = op.apply(basis.reshape((n_in,) + shape).to(_dtype(op)))
            M = out.reshape(n_in, -1).to(torch.float64).T
        shape = tuple(node.out_shape)
    if M is None:
        M = torch.eye(n_in, dtype=torch.float64)
    zero = torch.zeros((1,) + tuple(in_shape), dtype=torch.float64)
    for node in run:
        zero = node.op.forward(zero.to(_dtype(node.op)))
    return M.contiguous(), zero.reshape(-1).to(torch.float64)


def _dtype(op) -> torch.dtype:
    for value in vars(op).values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    return torch.float64


def canonical_dense_chain(graph: Graph) -> Graph | str:
    """An equivalent graph [Reshape] Dense -> act -> Dense -> ... -> Dense [-> act] [Reshape], or why none exists."""
    if not graph.is_chain():
        return "the graph has residual or concatenation merges (use layerwise/rslmi/product)"
    runs, acts = [[]], []
    for node in graph.nodes:
        if isinstance(node.op, Activation):
            if tuple(node.out_shape) != tuple(graph.in_shape(node)):
                return f"{node.op.describe()} changes the shape"
            acts.append(node)
            runs.append([])
        elif isinstance(node.op, AFFINE_OPS):
            runs[-1].append(node)
        else:
            return (f"{node.op.describe()} is not a dense map, a scaling, a shift, a reshape/transpose or an "
                    "elementwise activation")
    if not acts:
        return "no hidden activation (a linear map: the product bound is exact)"
    out = Graph(input_name=graph.input_name, input_shape=graph.input_shape)
    prev, shape = graph.input_name, tuple(graph.input_shape)
    if len(shape) != 1:
        n = math.prod(shape)
        out.nodes.append(Node(prev + "::flat", Reshape((n,)), [prev], (n,), "flatten"))
        prev = prev + "::flat"
    for i, run in enumerate(runs):
        width = math.prod(shape)
        if run:
            M, b = _run_matrix(graph, run, shape)
            name = run[-1].name
            source = " + ".join(dict.fromkeys(p for n in run if n.source for p in n.source.split(" + ")))
            out.nodes.append(Node(name, Dense(M, b), [prev], (M.shape[0],), source))
            prev, width = name, M.shape[0]
            shape = tuple(run[-1].out_shape)
        if i < len(acts):
            act = acts[i]
            out.nodes.append(Node(act.name, act.op, [prev], (width,), act.source))
            prev, shape = act.name, tuple(act.out_shape)
    final = tuple(graph.output_shape)
    if tuple(out.nodes[-1].out_shape) != final:
        out.nodes.append(Node(graph.output + "::shape", Reshape(final), [prev], final, "output shape"))
        prev = graph.output + "::shape"
    out.output = prev
    return out


def dense_chain(graph: Graph) -> tuple[list[np.ndarray], list[tuple[float, float]]] | str:
    """(weights [W_0..W_l] as float64 arrays, slopes per hidden layer) of the canonical dense chain.

    A run missing between two activations (or before the first) is the identity; a chain ending in an
    activation gets the identity as its last weight. Reasons (str) when LipSDP does not apply."""
    canon = canonical_dense_chain(graph)
    if isinstance(canon, str):
        return canon
    weights, slopes, expect_dense = [], [], True
    for node in canon.nodes:
        op = node.op
        if isinstance(op, Reshape):
            continue
        if isinstance(op, Dense):
            weights.append(op.weight.detach().cpu().numpy().astype(np.float64))
            expect_dense = False
        else:  # activation
            if expect_dense:  # nothing linear before it: the identity on the current width
                weights.append(np.eye(node.out_shape[0]))
            slopes.append(tuple(float(s) for s in op.slopes))
            expect_dense = True
    if expect_dense:
        weights.append(np.eye(weights[-1].shape[0]))
    for a, b in slopes:
        if not (math.isfinite(a) and math.isfinite(b) and a < b):
            return f"an activation with slope interval [{a:g}, {b:g}] (alpha < beta is needed; fold linear layers first)"
    return weights, slopes
