"""Method ``lipsdp-graph``: LipSDP over a whole graph of convolutions, residual blocks and dense layers.

The graph is cut at tensors every path passes through, and the pieces are grouped (deterministic
rules on op types and sizes) into a chain of segments (``lipverify.verifier.sdp_graph``):

* ``freq``: convolutions / activations / residual adds on spatial tensors, optionally ending in a
  global mean; multipliers constant per channel, the LMI checked frequency by frequency on a
  periodic grid (strided tensors as polyphase components);
* ``dense``: dense layers (and flattening); multipliers per neuron;
* ``tied``: one op acting on each channel alone (max pooling, a lone activation, ...), bounded by
  its own certified factor.

Boundaries carry per-channel weights: the input rho, the output 1, and free weights between
segments (a tied segment passes its input weights on, divided by its factor squared). One convex
problem over all multipliers and weights (minimize rho) is solved by ``sdp_barrier``; the answer
is certified only by the trusted checker ``lipverify.verifier.lipsdp_graph`` (the method tries the
outer iterates from the last back until one passes).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from lipverify.bounds import register
from lipverify.bounds.base import BoundContext, BoundMethod, BoundResult, LayerBound
from lipverify.bounds.sdp_barrier import Family, solve_pd
from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph
from lipverify.norms.margin import inflate
from lipverify.ops.activation import Activation
from lipverify.ops.conv import Conv
from lipverify.ops.merge import Add, Sub
from lipverify.verifier.lipsdp_graph import freq_chunks, tied_op_ok, verify_lipsdp_graph
from lipverify.verifier.sdp_graph import (dense_pair_form, dense_segment, dense_size, freq_pair_form, freq_segment,
                                          segment_nodes)

FREQ_MAX_DIM = 512  # per-frequency matrix size above which a stage is not put in one LMI
UNROLL_MAX_DIM = 1024  # stages this small are unrolled: exact LipSDP, per-neuron multipliers
DENSE_MAX_DIM = 3000  # dense LMI size (coordinates) cap
SOLVER_CHUNK = 2_000_000  # complex entries of U per cached chunk


# ----------------------------------------------------------------------------------------------
# Partition
# ----------------------------------------------------------------------------------------------


def cut_points(graph: Graph) -> list[str]:
    """Tensors every input-output path passes through, in order (input first, output last)."""
    last: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        for a in n.inputs:
            last[a] = i
    cuts = [graph.input_name]
    produced = [graph.input_name]
    for i, n in enumerate(graph.nodes):
        produced.append(n.name)
        live = [t for t in produced if last.get(t, -1) > i or t == graph.output]
        if live == [n.name]:
            cuts.append(n.name)
    if cuts[-1] != graph.output:
        cuts.append(graph.output)
    return cuts


@dataclass
class SegmentPlan:
    kind: str
    entry: str
    exit: str
    structure: object = None
    factor: float = 1.0  # tied segments
    granularity: str = "neuron"  # dense segments: one multiplier per neuron or per channel (axis 0)


def _try(build, *args):
    try:
        return build(*args)
    except SoundnessError:
        return None


def plan_segments(graph: Graph, freq_max: int = FREQ_MAX_DIM, dense_max: int = DENSE_MAX_DIM,
                  unroll_max: int = 0, head_activation: bool = True) -> list[SegmentPlan] | str:
    """Greedy grouping of the pieces between cut points (longest valid segment first)."""
    cuts = cut_points(graph)
    plans: list[SegmentPlan] = []
    i = 0
    while i < len(cuts) - 1:
        best = None
        for kind, build, cap in (("freq", freq_segment, freq_max), ("dense", dense_segment, dense_max)):
            for j in range(len(cuts) - 1, i, -1):
                if kind == "dense" and not _dense_fits(graph, cuts[i], cuts[j], cap, unroll_max):
                    continue
                seg = _try(build, graph, cuts[i], cuts[j])
                if seg is None or seg.dim > cap:
                    continue
                if kind == "freq" and not (seg.acts or _has_conv(seg)):
                    continue
                if kind == "dense" and _has_conv(seg) and seg.dim > unroll_max:
                    continue  # convolutions go per frequency unless unrolling is asked for and small
                if best is None or j > best[1]:
                    best = (kind, j, seg)
                break
        if best is not None and best[0] == "freq" and unroll_max and \
                _dense_fits(graph, cuts[i], cuts[best[1]], unroll_max, unroll_max):
            dense = _try(dense_segment, graph, cuts[i], cuts[best[1]])
            if dense is not None and dense.dim <= unroll_max:
                best = ("dense", best[1], dense)
        if best is None:
            node = graph.node(cuts[i + 1])
            if node.is_merge or node.inputs != [cuts[i]] or not tied_op_ok(node, tuple(graph.in_shape(node))):
                return f"{node.source or node.name} ({node.op.describe()}) fits no segment kind"
            factor = inflate(node.op.factor(tuple(graph.in_shape(node))).upper, 4)
            plans.append(SegmentPlan("tied", cuts[i], cuts[i + 1], None, factor))
            i += 1
            continue
        kind, j, seg = best
        plans.append(SegmentPlan(kind, cuts[i], cuts[j], seg))
        i = j
    if not any(p.kind != "tied" for p in plans):
        return "no convolution, residual block or dense layer to put in an LMI"
    if head_activation:
        _move_last_activation(graph, plans, cuts)
    return plans


def _move_last_activation(graph: Graph, plans: list[SegmentPlan], cuts: list[str]) -> None:
    """A frequency segment ending in an activation read by a dense segment hands that activation
    to the dense segment: its neurons then get their own multipliers, not one per channel."""
    for k in range(len(plans) - 1):
        a, b = plans[k], plans[k + 1]
        if a.kind != "freq" or b.kind != "dense":
            continue
        node = graph.node(a.exit)
        if not isinstance(node.op, Activation) or node.inputs[0] not in cuts or node.inputs[0] == a.entry:
            continue
        freq = _try(freq_segment, graph, a.entry, node.inputs[0])
        dense = _try(dense_segment, graph, node.inputs[0], b.exit)
        if freq is not None and dense is not None and (freq.acts or _has_conv(freq)):
            plans[k] = SegmentPlan("freq", a.entry, node.inputs[0], freq)
            plans[k + 1] = SegmentPlan("dense", node.inputs[0], b.exit, dense)


def _dense_fits(graph: Graph, entry: str, exit_: str, cap: int, unroll_max: int) -> bool:
    """Cheap size test before unrolling anything: convolutions only up to ``unroll_max``."""
    try:
        nodes = segment_nodes(graph, entry, exit_)
    except SoundnessError:
        return False
    size = dense_size(graph, entry, nodes)
    return size <= (min(cap, unroll_max) if any(isinstance(n.op, Conv) for n in nodes) else cap)


def _granularity(p: SegmentPlan) -> dict[str, str]:
    return {node.name: p.granularity for node, *_ in p.structure.acts}


def _has_conv(seg) -> bool:
    return any(isinstance(n.op, Conv) for n in seg.nodes)


# ----------------------------------------------------------------------------------------------
# Variables
# ----------------------------------------------------------------------------------------------


@dataclass
class Variables:
    count: int = 1  # variable 0 is rho
    boundary: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # per channel (var | -1, coef)
    mults: dict[str, list[int]] = field(default_factory=dict)  # activation -> variable per multiplier

    def fresh(self, k: int) -> list[int]:
        out = list(range(self.count, self.count + k))
        self.count += k
        return out


def make_variables(graph: Graph, plans: list[SegmentPlan]) -> Variables:
    v = Variables()
    channels = lambda name: graph.shape_of(name)[0]  # noqa: E731
    last_lmi = max(k for k, p in enumerate(plans) if p.kind != "tied")
    # after the last LMI segment the weights are constants: 1 at the output, times f^2 backwards
    v.boundary[graph.output] = [(-1, 1.0)] * channels(graph.output)
    for p in reversed(plans[last_lmi + 1:]):
        f2 = (p.factor * (1 + 1e-12)) ** 2
        v.boundary[p.entry] = [(-1, coef * f2) for _, coef in v.boundary[p.exit]]
    v.boundary[graph.input_name] = [(0, 1.0)] * channels(graph.input_name)
    for k, p in enumerate(plans[:last_lmi + 1]):
        if p.kind == "tied":
            f2 = (p.factor * (1 + 1e-12)) ** 2
            v.boundary[p.exit] = [(var, coef / f2) for var, coef in v.boundary[p.entry]]
        elif k < last_lmi:
            v.boundary[p.exit] = [(var, 1.0) for var in v.fresh(channels(p.exit))]
        for node, *_ in getattr(p.structure, "acts", []):
            per_channel = p.kind == "freq" or p.granularity == "channel"
            v.mults[node.name] = v.fresh(channels(node.name) if per_channel else math.prod(graph.shape_of(node.name)))
    return v


def _family(form, U_chunks, plan: SegmentPlan, variables: Variables) -> Family:
    R = form.n_cols
    partner = torch.arange(R)
    g_self = torch.zeros(R, dtype=torch.float64)
    g_pair = torch.zeros(R, dtype=torch.float64)
    var = torch.full((R,), -1, dtype=torch.long)
    for grp in form.groups:
        kind = grp.key[0]
        if kind == "t":
            v, coef = variables.mults[grp.key[1]][grp.key[2]], 1.0
        else:
            v, coef = variables.boundary[plan.entry if kind == "in" else plan.exit][grp.key[1]]
        for i, a in enumerate(grp.cols):
            g_self[a] = coef * grp.G[i][i]
            var[a] = v
            if len(grp.cols) == 2:
                partner[a] = grp.cols[1 - i]
                g_pair[a] = coef * grp.G[i][1 - i]
    return Family(list(U_chunks), partner, g_self, g_pair, var)


def build_families(graph: Graph, plans: list[SegmentPlan], variables: Variables):
    families, forms = [], {}
    for p in plans:
        if p.kind == "freq":
            seg = p.structure
            form, terms = freq_pair_form(seg, seg.required_grid)
            chunks = list(_solver_chunks(seg, terms, form))
        elif p.kind == "dense":
            form, U = dense_pair_form(p.structure, _granularity(p))
            chunks = [U]
        else:
            continue
        forms[p.entry] = form
        families.append(_family(form, chunks, p, variables))
    return families, forms


def _solver_chunks(seg, terms, form):
    from lipverify.verifier import lipsdp_graph as checker

    saved = checker.CHUNK_ENTRIES
    checker.CHUNK_ENTRIES = SOLVER_CHUNK
    try:
        yield from freq_chunks(seg, terms, form, seg.required_grid)
    finally:
        checker.CHUNK_ENTRIES = saved


# ----------------------------------------------------------------------------------------------
# A strictly feasible start
# ----------------------------------------------------------------------------------------------


def _state_coords(plan: SegmentPlan, graph: Graph) -> list[tuple[str, torch.Tensor]]:
    seg = plan.structure
    out = []
    for name in seg.states:
        rows = seg.rows(name) if plan.kind == "freq" else math.prod(graph.shape_of(name))
        out.append((name, torch.arange(seg.offset[name], seg.offset[name] + rows)))
    return out


def _min_schur_eig(A: torch.Tensor, block: torch.Tensor, trailing: torch.Tensor) -> float:
    """min over the batch of lambda_min(A_bb - A_bt A_tt^{-1} A_tb)."""
    Abb = A[:, block][:, :, block]
    if len(trailing):
        Abt = A[:, block][:, :, trailing]
        Att = A[:, trailing][:, :, trailing]
        L = torch.linalg.cholesky(Att)
        Y = torch.linalg.solve_triangular(L, Abt.mH, upper=False)
        Abb = Abb - Y.mH @ Y
    return float(torch.linalg.eigvalsh((Abb + Abb.mH) / 2)[..., 0].min())


def initial_point(graph: Graph, plans: list[SegmentPlan], variables: Variables, families: list[Family]) -> torch.Tensor:
    """Backward elimination: from the output back to the input, give each activation a uniform
    multiplier making its state's Schur complement positive definite (the trailing states are
    already), then the entry weight likewise. Every matrix of every segment is then positive
    definite: a strictly feasible point (like lipsdp_core's start, for any graph of states)."""
    x = torch.zeros(variables.count, dtype=torch.float64)
    numeric = {graph.output: [coef for _, coef in variables.boundary[graph.output]]}
    fam_iter = iter(reversed(families))
    for p in reversed(plans):
        if p.kind == "tied":
            f2 = (p.factor * (1 + 1e-12)) ** 2
            numeric[p.entry] = [w * f2 for w in numeric[p.exit]]
            continue
        fam = next(fam_iter)
        for (var, coef), w in zip(variables.boundary[p.exit], numeric[p.exit]):
            if var >= 0:
                x[var] = w / coef
        coords = _state_coords(p, graph)
        for k in range(len(coords) - 1, -1, -1):
            name, block = coords[k]
            trailing = torch.cat([c for _, c in coords[k + 1:]]) if k + 1 < len(coords) else block[:0]
            if k > 0:
                x[variables.mults[name]] = 0.0
            else:
                for var, _ in variables.boundary[p.entry]:
                    if var >= 0:
                        x[var] = 0.0
            lam, scale = math.inf, 0.0
            gs, gp = fam.coeffs(x)
            for U in fam.chunks:
                A = _assemble_plain(U, gs, gp, fam.partner)
                lam = min(lam, _min_schur_eig(A, block, trailing))
                scale = max(scale, float(torch.diagonal(A, dim1=-2, dim2=-1).real.abs().max()))
            need = max(-lam, 0.0) * 1.5 + 1e-3 * max(scale, abs(lam), 1e-12)
            if k > 0:  # the state's own term adds 2 t I on its block
                x[variables.mults[name]] = need / 2.0
            else:
                numeric[p.entry] = [need] * len(variables.boundary[p.entry])
        if p.entry == graph.input_name or all(v < 0 for v, _ in variables.boundary[p.entry]):
            pass
    # the input chain: rho so that every channel's weight reaches what the first LMI segment needs
    first_lmi = next(p for p in plans if p.kind != "tied")
    rho = max(w / coef for (v, coef), w in zip(variables.boundary[first_lmi.entry], numeric[first_lmi.entry]))
    x[0] = rho
    return x


def _assemble_plain(U, gs, gp, partner):
    V = U * gs.to(U.dtype) + U[..., partner] * gp.to(U.dtype)
    A = V @ U.mH
    return (A + A.mH) / 2


# ----------------------------------------------------------------------------------------------
# Witness
# ----------------------------------------------------------------------------------------------

BACKOFF = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)


def certify_iterate(graph, plans, variables, result, x0):
    """The solver's last iterate sits on the boundary of the binding matrices (that is where the
    optimum is); the checker needs a margin above its rounding bounds. Certify the first point
    (1 - theta) x_last + theta x_anchor, theta in ``BACKOFF``, that passes: x_anchor (the first
    central-path iterate, else the start) is strictly feasible with room to spare, and the LMIs are
    affine in x, so the mix has a margin of at least theta times the anchor's."""
    last = result.x
    anchor = result.history[0] if result.history else x0
    for theta in BACKOFF:
        x = (1.0 - theta) * last + theta * anchor
        cand = make_witness(graph, plans, variables, x)
        value = inflate(math.sqrt(cand["rho"]), 8)
        try:
            check = verify_lipsdp_graph(graph, value, cand)
        except SoundnessError:
            continue
        return cand, value, check, theta
    raise SoundnessError("lipsdp-graph: no point of the solver's path passed the certificate check")



def make_witness(graph: Graph, plans: list[SegmentPlan], variables: Variables, x: torch.Tensor) -> dict:
    xs = x.tolist()

    def weight(entries):
        return [coef * (xs[v] if v >= 0 else 1.0) for v, coef in entries]

    segments = []
    for p in plans:
        entry = {"kind": p.kind, "entry": p.entry, "exit": p.exit}
        if p.kind == "tied":
            entry["factor"] = p.factor
        else:
            entry["t"] = {node.name: [max(xs[v], 0.0) for v in variables.mults[node.name]]
                          for node, *_ in p.structure.acts}
            if p.kind == "freq":
                entry["grid"] = list(p.structure.required_grid)
            else:
                entry["granularity"] = _granularity(p)
        segments.append(entry)
    weights = {b: [max(w, 0.0) for w in weight(e)] for b, e in variables.boundary.items()}
    rho = max(xs[0], max(weights[graph.input_name]))
    return {"rho": rho, "segments": segments, "weights": weights}


@register
class LipSDPGraph(BoundMethod):
    name = "lipsdp-graph"
    description = ("LipSDP over the whole graph: per-channel multipliers on convolutions (checked per "
                   "frequency), per-neuron on dense layers, residual blocks inside one LMI")

    def not_applicable(self, graph: Graph) -> str | None:
        if graph.is_chain() and not any(isinstance(n.op, Conv) for n in graph.nodes):
            return "a dense chain (lipsdp-neuron is the same LMI)"
        plans = plan_segments(graph)
        return plans if isinstance(plans, str) else None

    def run(self, graph: Graph, ctx: BoundContext) -> BoundResult:
        start = time.perf_counter()
        opts = ctx.options
        plans = plan_segments(graph, int(opts.get("lipsdp_graph_freq_max", FREQ_MAX_DIM)),
                              int(opts.get("lipsdp_graph_dense_max", DENSE_MAX_DIM)),
                              int(opts.get("lipsdp_graph_unroll_max", UNROLL_MAX_DIM)),
                              bool(opts.get("lipsdp_graph_head_activation", True)))
        if isinstance(plans, str):
            raise SoundnessError(f"lipsdp-graph cannot bound this graph: {plans}")
        for p in plans:
            if p.kind == "dense":
                p.granularity = str(opts.get("lipsdp_graph_dense_multipliers", "neuron"))
        variables = make_variables(graph, plans)
        families, _ = build_families(graph, plans, variables)
        x0 = initial_point(graph, plans, variables, families)
        result = solve_pd(families, variables.count, 0, x0, tol=float(opts.get("lipsdp_graph_tol", 1e-8)))
        witness, value, check, theta = certify_iterate(graph, plans, variables, result, x0)
        rows = [LayerBound(name=f"{p.entry} -> {p.exit}", op=p.kind, in_shape=list(graph.shape_of(p.entry)),
                           out_shape=list(graph.shape_of(p.exit)), factor=float("nan"), lower=None,
                           how=f"{p.kind} segment" + (f" (grid {p.structure.required_grid})" if p.kind == "freq" else ""))
                for p in plans]
        return BoundResult(method=self.name, value=value, layers=rows, check=check, witness=witness,
                           seconds=time.perf_counter() - start,
                           notes=[f"lipsdp-graph: {len(plans)} segments ({', '.join(p.kind for p in plans)}); "
                                  f"{result.info['iterations']} interior-point iterations, "
                                  f"certified at back-off {theta:g}"])
