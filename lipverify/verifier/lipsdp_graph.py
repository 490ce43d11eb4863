"""Checker for ``lipsdp-graph`` certificates: a chain of segment LMIs (docs/conv-lipsdp.md).

Witness::

    {"rho": r, "weights": {tensor: [w per channel], ...},      # every segment boundary
     "segments": [{"kind": "freq", "entry": .., "exit": .., "grid": [N, ..], "t": {act: [per channel]}},
                  {"kind": "dense", "entry": .., "exit": .., "t": {act: [..]}, "granularity": {act: ..}},
                  {"kind": "tied", "entry": .., "exit": .., "factor": f},
                  {"kind": "layerwise", "entry": .., "exit": ..}, ...],
     "layerwise": {a layerwise witness: scalings of every tensor, per-node factors}}   # if used

What is proved: the segments chain the network input to its output and cover every node once;
rho >= every input weight and every output weight >= 1; each segment j gives
sum_c w_out[c] |dy_c|^2 <= sum_c w_in[c] |dx_c|^2: a *tied* segment (one per-channel op of certified
factor f, re-checked by ``factor_holds``) when f^2 w_out <= w_in, an LMI segment when every matrix
of its pair form (each grid frequency for ``freq``) passes ``proves_psd`` with the assembly's
rounding bound, a *layerwise* segment when its nodes' scaled factors (re-checked by the layerwise
rules) propagate to c with ||S_out dy|| <= c ||S_in dx|| and max(w_out / s_out^2) c^2 <= min(w_in / s_in^2)
(S per channel at both ends). Chaining: |f(x) - f(y)|^2 <= ... <= rho |x - y|^2, so L <= sqrt(rho).
"""

from __future__ import annotations

import math

import torch

from lipverify.graph.ir import Graph
from lipverify.ops.activation import Activation
from lipverify.ops.dense import Scale, Shift
from lipverify.ops.pool import AvgPool, MaxPool, Reduce
from lipverify.ops.shape import Pad
from lipverify.ops.merge import Add, Sub
from lipverify.verifier.factors import factor_holds, label, merge_bound
from lipverify.verifier.linalg import proves_psd
from lipverify.verifier.numbers import EPS, at_least, claim, claim_vector, fail, mul_up, only_keys, sqrt_up, up
from lipverify.verifier.scaled import _check_node, _coarse, _max_ratio, _per_channel, _rebuild_scalings
from lipverify.verifier.sdp_graph import (PairForm, assemble, assembly_error, dense_pair_form, dense_segment,
                                          freq_columns, freq_pair_form, freq_segment, group_arrays, group_values,
                                          half_grid, segment_nodes)

CHUNK_ENTRIES = 4_000_000  # complex entries of U per batch of frequencies
GRID_SLACK = 2  # a claimed grid may exceed the no-wrap grid by this factor per axis (bounds the work)
SEGMENT_KEYS = {"freq": {"kind", "entry", "exit", "grid", "t"}, "dense": {"kind", "entry", "exit", "t", "granularity"},
                "tied": {"kind", "entry", "exit", "factor"}, "layerwise": {"kind", "entry", "exit"}}
LAYERWISE_KEYS = {"scalings", "tensors", "factors"}
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
    only_keys(raw, set(lengths), f"lipsdp-graph: multipliers of segment {seg.entry} -> {seg.exit}")
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
    if len(grid) == len(seg.required_grid) and any(g > GRID_SLACK * r for g, r in zip(grid, seg.required_grid)):
        fail(f"lipsdp-graph: segment {seg.entry} -> {seg.exit}: grid {tuple(grid)} is more than {GRID_SLACK} times "
             f"the no-wrap grid {seg.required_grid}")
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
    only_keys(gran, {node.name for node, _ in seg.acts}, "lipsdp-graph: granularity")
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


def _check_layerwise(graph: Graph, entry: dict, w_in, w_out, scalings, factors) -> str:
    if scalings is None:
        fail("lipsdp-graph: a layerwise segment needs the layerwise witness")
    nodes = segment_nodes(graph, entry["entry"], entry["exit"])
    bound = {entry["entry"]: 1.0}
    for node in nodes:
        s_t = scalings[node.name]
        if node.is_merge:
            terms = []
            for i in node.inputs:
                same = isinstance(node.op, (Add, Sub)) and scalings[i].shape == s_t.shape
                r = _max_ratio(s_t, scalings[i]) if same else _coarse(s_t, scalings[i])
                terms.append(mul_up(r, bound[i]))
            bound[node.name] = merge_bound(node, terms)
            continue
        if node.name not in factors:
            fail(f"lipsdp-graph: no layerwise factor for {label(node)}")
        f = claim(factors[node.name], f"lipsdp-graph: layerwise factor of {label(node)}")
        _check_node(graph, node, scalings[node.inputs[0]], s_t, f)
        bound[node.name] = mul_up(f, bound[node.inputs[0]])
    c2 = mul_up(bound[entry["exit"]], bound[entry["exit"]])
    s_in, s_out = _per_channel(scalings[entry["entry"]]), _per_channel(scalings[entry["exit"]])
    if s_in is None or s_out is None:
        fail(f"lipsdp-graph: the layerwise scalings at {entry['entry']} / {entry['exit']} are not per channel")
    kappa = max(up(float(w) / (float(s) * float(s) * (1 - 4 * EPS))) for w, s in zip(w_out.tolist(), s_out.tolist()))
    need = mul_up(kappa, c2)
    for c, (w, s) in enumerate(zip(w_in.tolist(), s_in.tolist())):
        if not need <= w / up(s * s) * (1 - 4 * EPS):
            fail(f"lipsdp-graph: the weights across the layerwise segment {entry['entry']} -> {entry['exit']} "
                 f"do not cover its factor (channel {c})")
    return f"layerwise factor {math.sqrt(c2):.6g}"


CHECKS = {"freq": _check_freq, "dense": _check_dense, "tied": _check_tied, "layerwise": _check_layerwise}


def check_segments(graph: Graph, segments: list, weights: dict, layerwise: dict | None = None) -> list[str]:
    """Check each segment's claim  sum w_out |dy|^2 <= sum w_in |dx|^2  at the claimed weights."""
    w = {}
    for entry in segments:
        if not isinstance(entry, dict) or entry.get("kind") not in CHECKS:
            fail("lipsdp-graph: malformed segment")
        only_keys(entry, SEGMENT_KEYS[entry["kind"]], f"lipsdp-graph: {entry['kind']} segment")
        for b in (entry.get("entry"), entry.get("exit")):
            if not isinstance(b, str) or b not in weights:
                fail(f"lipsdp-graph: no weights for the boundary {b!r}")
            if b not in w:
                w[b] = claim_vector(weights[b], f"lipsdp-graph: weights of {b}", length=graph.shape_of(b)[0])
    scalings = factors = None
    if any(e["kind"] == "layerwise" for e in segments):
        if not isinstance(layerwise, dict) or not isinstance(layerwise.get("factors"), dict):
            fail("lipsdp-graph: layerwise segments without a layerwise witness")
        only_keys(layerwise, LAYERWISE_KEYS, "lipsdp-graph: layerwise part")
        scalings, factors = _rebuild_scalings(graph, layerwise), layerwise["factors"]
    elif layerwise is not None:
        fail("lipsdp-graph: a layerwise witness but no layerwise segment")
    details = []
    for entry in segments:
        args = (graph, entry, w[entry["entry"]], w[entry["exit"]])
        if entry["kind"] == "layerwise":
            details.append(_check_layerwise(*args, scalings, factors))
        else:
            details.append(CHECKS[entry["kind"]](*args))
    return details


def verify_lipsdp_graph(graph: Graph, value: float, witness: dict) -> tuple[float, str]:
    only_keys(witness, {"rho", "segments", "weights", "layerwise"}, "lipsdp-graph")
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
    only_keys(weights, {graph.input_name} | {e["exit"] for e in segments}, "lipsdp-graph: weights")
    for end in (graph.input_name, graph.output):
        if end not in weights:
            fail(f"lipsdp-graph: no weights for {end}")
    w_in = claim_vector(weights[graph.input_name], "lipsdp-graph: input weights",
                        length=graph.shape_of(graph.input_name)[0])
    w_out = claim_vector(weights[graph.output], "lipsdp-graph: output weights", length=graph.shape_of(graph.output)[0])
    if not bool((w_in <= rho).all()):
        fail("lipsdp-graph: an input weight exceeds rho")
    if not bool((w_out >= 1.0).all()):
        fail("lipsdp-graph: an output weight is below 1")
    details = check_segments(graph, segments, weights, witness.get("layerwise"))
    implied = sqrt_up(rho)
    at_least(value, implied, "lipsdp-graph")
    return implied, f"{len(segments)} segments re-checked (Cholesky with rounding bounds; {'; '.join(details)})"
