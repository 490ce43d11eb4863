"""Checker for ``lipsdp-graph`` certificates: a chain of segment LMIs (docs/conv-lipsdp.md).

Witness::

    {"rho": r, "weights": {tensor: [w per channel], ...},      # every segment boundary
     "segments": [{"kind": "freq", "entry": .., "exit": .., "grid": [N, ..], "t": {act: [per channel]}},
                  {"kind": "dense", "entry": .., "exit": .., "t": {act: [..]}, "granularity": {act: ..}},
                  {"kind": "tied", "entry": .., "exit": .., "factor": f}, ...]}

What is proved: the segments chain the network input to its output and cover every node once;
rho >= every input weight and every output weight >= 1; each segment j gives
sum_c w_out[c] |dy_c|^2 <= sum_c w_in[c] |dx_c|^2: a *tied* segment (one per-channel op of certified
factor f, re-checked by ``factor_holds``) when f^2 w_out <= w_in, an LMI segment when every matrix
of its pair form (each grid frequency for ``freq``) passes ``proves_psd`` with the assembly's
rounding bound. Chaining: |f(x) - f(y)|^2 <= ... <= rho |x - y|^2, so L <= sqrt(rho).
"""

from __future__ import annotations

import math

import torch

from lipverify.graph.ir import Graph
from lipverify.ops.activation import Activation
from lipverify.ops.dense import Scale, Shift
from lipverify.ops.pool import AvgPool, MaxPool, Reduce
from lipverify.ops.shape import Pad
from lipverify.verifier.factors import factor_holds, label
from lipverify.verifier.linalg import proves_psd
from lipverify.verifier.numbers import at_least, claim, claim_vector, fail, mul_up, sqrt_up
from lipverify.verifier.sdp_graph import (PairForm, assemble, assembly_error, dense_pair_form, dense_segment,
                                          freq_columns, freq_pair_form, freq_segment, group_arrays, group_values,
                                          half_grid, segment_nodes)

CHUNK_ENTRIES = 4_000_000  # complex entries of U per batch of frequencies
TIED_OPS = (Activation, Shift, Scale, MaxPool, AvgPool, Pad, Reduce)


def tied_op_ok(node, in_shape) -> bool:
    """Ops that act on each channel (axis 0) separately and identically: a per-channel weight passes."""
    op, out = node.op, tuple(node.out_shape)
    if not isinstance(op, TIED_OPS) or not out or not in_shape or out[0] != in_shape[0]:
        return False
    if isinstance(op, (Activation, Shift, Scale)):
        return out == tuple(in_shape)
    if isinstance(op, Reduce):
        return 0 not in op.axes
    if isinstance(op, Pad):
        n_axes = len(op.torch_pads) // 2
        return n_axes < len(in_shape) or all(p == 0 for p in op.torch_pads[-2:])
    return len(in_shape) >= 2


def _multipliers(seg_w: dict, seg, lengths: dict[str, int]) -> dict[str, torch.Tensor]:
    raw = seg_w.get("t")
    if not isinstance(raw, dict):
        fail(f"lipsdp-graph: segment {seg.entry} -> {seg.exit} has no multipliers")
    out = {}
    for name, n in lengths.items():
        if name not in raw:
            fail(f"lipsdp-graph: no multipliers for activation {name}")
        out[name] = claim_vector(raw[name], f"lipsdp-graph: multipliers of {name}", length=n)
    return out


def check_lmi(U_chunks, form: PairForm, values: dict, what: str) -> int:
    """Prove every matrix of the pair form PSD; returns how many were checked."""
    partner, g_self, g_pair, g_abs = group_arrays(form, values)
    count = 0
    for U in U_chunks:
        A = assemble(U, partner, g_self, g_pair)
        err = assembly_error(U, form, partner, g_self, g_pair, g_abs)
        if not proves_psd(A, err):
            fail(f"lipsdp-graph: the LMI of {what} is not positive semidefinite at the stored multipliers")
        count += A.shape[0]
    return count


def freq_chunks(seg, terms, form, grid):
    freqs = half_grid(tuple(grid))
    per = max(1, CHUNK_ENTRIES // max(1, seg.dim * form.n_cols))
    for start in range(0, len(freqs), per):
        yield freq_columns(seg, terms, form, freqs[start:start + per], tuple(grid))


def _check_freq(graph: Graph, entry: dict, w_in, w_out) -> str:
    seg = freq_segment(graph, entry["entry"], entry["exit"])
    grid = entry.get("grid")
    if not isinstance(grid, list) or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
        fail(f"lipsdp-graph: segment {seg.entry} -> {seg.exit}: malformed grid")
    form, terms = freq_pair_form(seg, tuple(grid))
    mults = _multipliers(entry, seg, {n.name: graph.shape_of(n.name)[0] for n, _, _ in seg.acts})
    values = group_values(form, mults, w_in, w_out)
    n = check_lmi(freq_chunks(seg, terms, form, grid), form, values, f"segment {seg.entry} -> {seg.exit}")
    return f"{n} frequencies of a {seg.dim}-dim LMI on grid {tuple(grid)}"


def _check_dense(graph: Graph, entry: dict, w_in, w_out) -> str:
    seg = dense_segment(graph, entry["entry"], entry["exit"])
    gran = entry.get("granularity", {})
    if not isinstance(gran, dict):
        fail("lipsdp-graph: malformed granularity")
    lengths = {}
    for node, _ in seg.acts:
        shape = graph.shape_of(node.name)
        lengths[node.name] = math.prod(shape) if gran.get(node.name, "neuron") == "neuron" else shape[0]
    form, U = dense_pair_form(seg, gran)
    mults = _multipliers(entry, seg, lengths)
    values = group_values(form, mults, w_in, w_out)
    check_lmi([U], form, values, f"segment {seg.entry} -> {seg.exit}")
    return f"a {seg.dim}-dim dense LMI"


def _check_tied(graph: Graph, entry: dict, w_in, w_out) -> str:
    nodes = segment_nodes(graph, entry["entry"], entry["exit"])
    if len(nodes) != 1:
        fail(f"lipsdp-graph: tied segment {entry['entry']} -> {entry['exit']} must hold exactly one node")
    node = nodes[0]
    in_shape = tuple(graph.in_shape(node))
    if node.is_merge or not tied_op_ok(node, in_shape):
        fail(f"lipsdp-graph: {label(node)} does not act on each channel separately")
    f = claim(entry.get("factor"), f"lipsdp-graph: factor of {label(node)}")
    if not factor_holds(node, in_shape, f):
        fail(f"lipsdp-graph: the factor {f!r} claimed for {label(node)} is not verified")
    f2 = mul_up(f, f)
    for c in range(len(w_in)):
        if not mul_up(f2, float(w_out[c])) <= float(w_in[c]):
            fail(f"lipsdp-graph: weights across {label(node)} do not shrink by the factor squared (channel {c})")
    return f"factor {f:.6g}"


CHECKS = {"freq": _check_freq, "dense": _check_dense, "tied": _check_tied}


def verify_lipsdp_graph(graph: Graph, value: float, witness: dict) -> str:
    rho = claim(witness.get("rho"), "lipsdp-graph: rho", positive=True)
    segments, weights = witness.get("segments"), witness.get("weights")
    if not isinstance(segments, list) or not segments or not isinstance(weights, dict):
        fail("lipsdp-graph: the witness has no segments / weights")
    expect, covered = graph.input_name, set()
    for entry in segments:
        if not isinstance(entry, dict) or entry.get("kind") not in CHECKS:
            fail("lipsdp-graph: malformed segment")
        if entry.get("entry") != expect or not isinstance(entry.get("exit"), str):
            fail(f"lipsdp-graph: the segments do not chain (expected a segment starting at {expect})")
        names = {n.name for n in segment_nodes(graph, entry["entry"], entry["exit"])}
        if names & covered:
            fail("lipsdp-graph: two segments share a node")
        covered |= names
        expect = entry["exit"]
    if expect != graph.output or covered != {n.name for n in graph.nodes}:
        fail("lipsdp-graph: the segments do not cover the graph from input to output")
    boundary = [graph.input_name] + [e["exit"] for e in segments]
    w = {}
    for b in boundary:
        if b not in weights:
            fail(f"lipsdp-graph: no weights for the boundary {b}")
        w[b] = claim_vector(weights[b], f"lipsdp-graph: weights of {b}", length=graph.shape_of(b)[0])
    if not bool((w[graph.input_name] <= rho).all()):
        fail("lipsdp-graph: an input weight exceeds rho")
    if not bool((w[graph.output] >= 1.0).all()):
        fail("lipsdp-graph: an output weight is below 1")
    details = []
    for entry in segments:
        details.append(CHECKS[entry["kind"]](graph, entry, w[entry["entry"]], w[entry["exit"]]))
    at_least(value, sqrt_up(rho), "lipsdp-graph")
    return f"{len(segments)} segment LMIs re-checked by Cholesky with rounding bounds ({'; '.join(details)})"
