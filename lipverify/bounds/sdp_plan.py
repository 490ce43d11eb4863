"""How ``lipsdp-graph`` cuts a graph into segments (deterministic rules on op types and sizes).

The graph is cut at tensors every input-output path passes through; the pieces between cuts are
grouped greedily (longest valid segment first) into segments of the kinds checked by
``lipverify.verifier.sdp_graph``: ``freq`` (convolutions per frequency), ``dense`` (unrolled; also
small convolution stages, which then get the exact per-neuron LipSDP), ``tied`` (one per-channel op)
and ``layerwise`` (whatever is too large or unsupported: certified by the layerwise method's scaled
factors).
"""

from __future__ import annotations

from dataclasses import dataclass

from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph
from lipverify.norms.margin import inflate
from lipverify.ops.activation import Activation
from lipverify.ops.conv import Conv
from lipverify.verifier.lipsdp_graph import tied_op_ok
from lipverify.verifier.sdp_graph import dense_segment, dense_size, freq_segment, segment_nodes

FREQ_MAX_DIM = 160  # per-frequency matrix size above which a stage is not put in one LMI (CPU-sized)
DENSE_MAX_DIM = 3000  # dense LMI size (coordinates) cap
UNROLL_MAX_DIM = 1024  # convolution stages this small are unrolled: exact LipSDP, per-neuron multipliers


@dataclass
class SegmentPlan:
    kind: str  # "freq" | "dense" | "tied" | "layerwise"
    entry: str
    exit: str
    structure: object = None  # FreqSegment / DenseSegment
    factor: float = 1.0  # tied segments: the op's certified factor
    granularity: str = "neuron"  # dense segments: one multiplier per neuron or per channel (axis 0)

    @property
    def is_lmi(self) -> bool:
        return self.kind in ("freq", "dense")

    def granularity_map(self) -> dict[str, str]:
        return {node.name: self.granularity for node, *_ in self.structure.acts}


@dataclass
class PlanOptions:
    freq_max: int = FREQ_MAX_DIM
    dense_max: int = DENSE_MAX_DIM
    unroll_max: int = UNROLL_MAX_DIM
    head_activation: bool = True  # hand a CNN's last activation to the dense head (per-neuron multipliers)
    mean_exit: bool = True  # end a frequency segment at a global mean (its exit term lives at frequency 0)
    dense_multipliers: str = "neuron"

    @classmethod
    def from_options(cls, opts: dict) -> "PlanOptions":
        return cls(int(opts.get("lipsdp_graph_freq_max", FREQ_MAX_DIM)),
                   int(opts.get("lipsdp_graph_dense_max", DENSE_MAX_DIM)),
                   int(opts.get("lipsdp_graph_unroll_max", UNROLL_MAX_DIM)),
                   bool(opts.get("lipsdp_graph_head_activation", True)),
                   bool(opts.get("lipsdp_graph_mean_exit", True)),
                   str(opts.get("lipsdp_graph_dense_multipliers", "neuron")))


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


def _try(build, *args):
    try:
        return build(*args)
    except SoundnessError:
        return None


def _has_conv(seg) -> bool:
    return any(isinstance(n.op, Conv) for n in seg.nodes)


def _dense_fits(graph: Graph, entry: str, exit_: str, cap: int, unroll_max: int) -> bool:
    """Cheap size test before unrolling anything: convolutions only up to ``unroll_max``."""
    try:
        nodes = segment_nodes(graph, entry, exit_)
    except SoundnessError:
        return False
    size = dense_size(graph, entry, nodes)
    return size <= (min(cap, unroll_max) if any(isinstance(n.op, Conv) for n in nodes) else cap)


def _longest(graph: Graph, cuts: list[str], i: int, o: PlanOptions):
    """(kind, j, structure) of the longest LMI segment starting at cut i, or None."""
    best = None
    freq_build = lambda g, a, b: freq_segment(g, a, b, o.mean_exit)  # noqa: E731
    for kind, build, cap in (("freq", freq_build, o.freq_max), ("dense", dense_segment, o.dense_max)):
        for j in range(len(cuts) - 1, i, -1):
            if best is not None and j <= best[1]:
                break
            if kind == "dense" and not _dense_fits(graph, cuts[i], cuts[j], cap, o.unroll_max):
                continue
            seg = _try(build, graph, cuts[i], cuts[j])
            if seg is None or seg.dim > cap:
                continue
            if kind == "freq" and not (seg.acts or _has_conv(seg)):
                continue
            best = (kind, j, seg)
            break
    if best is not None and best[0] == "freq" and o.unroll_max and \
            _dense_fits(graph, cuts[i], cuts[best[1]], o.unroll_max, o.unroll_max):
        dense = _try(dense_segment, graph, cuts[i], cuts[best[1]])
        if dense is not None:
            best = ("dense", best[1], dense)
    return best


def plan_segments(graph: Graph, o: PlanOptions | None = None) -> list[SegmentPlan]:
    """Greedy grouping of the pieces between cut points (longest valid segment first)."""
    o = o or PlanOptions()
    cuts = cut_points(graph)
    plans: list[SegmentPlan] = []
    i = 0
    while i < len(cuts) - 1:
        best = _longest(graph, cuts, i, o)
        if best is not None:
            kind, j, seg = best
            plans.append(SegmentPlan(kind, cuts[i], cuts[j], seg, granularity=o.dense_multipliers))
            i = j
            continue
        node = graph.node(cuts[i + 1])
        if not node.is_merge and node.inputs == [cuts[i]] and tied_op_ok(node, tuple(graph.in_shape(node))):
            factor = inflate(node.op.factor(tuple(graph.in_shape(node))).upper, 4)
            plans.append(SegmentPlan("tied", cuts[i], cuts[i + 1], None, factor))
        elif plans and plans[-1].kind == "layerwise":
            plans[-1].exit = cuts[i + 1]
        else:
            plans.append(SegmentPlan("layerwise", cuts[i], cuts[i + 1]))
        i += 1
    if o.head_activation:
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
            plans[k + 1] = SegmentPlan("dense", node.inputs[0], b.exit, dense, granularity=b.granularity)


def runs(plans: list[SegmentPlan]) -> list[list[SegmentPlan]]:
    """Maximal stretches of consecutive non-layerwise segments, and each layerwise segment alone."""
    out: list[list[SegmentPlan]] = []
    for p in plans:
        if p.kind == "layerwise" or not out or out[-1][0].kind == "layerwise":
            out.append([p])
        else:
            out[-1].append(p)
    return out
