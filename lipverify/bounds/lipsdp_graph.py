"""Method ``lipsdp-graph``: LipSDP over a whole graph of convolutions, residual blocks and dense layers.

``sdp_plan`` cuts the graph into a chain of segments: ``freq`` (convolutions, residual adds and
activations; multipliers constant per channel, the LMI checked frequency by frequency on a periodic
grid, strided tensors as polyphase components), ``dense`` (dense layers, and convolution stages
small enough to unroll: per-neuron multipliers), ``tied`` (one per-channel op such as max pooling)
and ``layerwise`` (stages too large for an LMI, or unsupported ops).

Composition (docs/conv-lipsdp.md): every boundary tensor b gets per-channel weights w_b, and each
segment certifies sum w_out |dy|^2 <= sum w_in |dx|^2. Consecutive non-layerwise segments form a
*run*, solved as one convex problem (``sdp_run``) with its end weights shaped like the layerwise
scalings there (the identity at the network's input and output); a layerwise stage contributes its
certified scaled factor. Runs are processed from the output back, and each run keeps the better of
its LMI factor and the layerwise factor of the same stretch. The trusted checker
(``lipverify.verifier.lipsdp_graph``) re-verifies the whole chain.
"""

from __future__ import annotations

import math
import time

from lipverify.bounds import register
from lipverify.bounds.base import BoundContext, BoundMethod, BoundResult, LayerBound
from lipverify.bounds.sdp_plan import PlanOptions, SegmentPlan, plan_segments, runs
from lipverify.bounds.sdp_run import OPT_MAX_FREQS, solve_run
from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph
from lipverify.norms.margin import inflate
from lipverify.ops.activation import Activation
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Scale, Shift
from lipverify.ops.shape import Reshape
from lipverify.verifier.lipsdp_graph import LAYERWISE_KEYS, check_segments
from lipverify.verifier.numbers import sqrt_up
from lipverify.verifier.scaled import _per_channel, _rebuild_scalings

DEGENERATE_RHO = 1e-100  # below this the network is numerically zero: try the floor
RHO_FLOOR = 1e-280  # (the checker's Cholesky shift has an absolute 1e-300 term)
AUTO_MAX_WORK = 2e10  # sum over LMI segments of (matrices x size^3): auto skips larger problems


def _work(plans: list[SegmentPlan]) -> float:
    total = 0.0
    for p in plans:
        if p.kind == "freq":
            grid = p.structure.required_grid
            total += math.prod(grid[:-1]) * (grid[-1] // 2 + 1) * p.structure.dim ** 3
        elif p.kind == "dense":
            total += p.structure.dim ** 3
    return total


class _Layerwise:
    """The layerwise certificate of the whole graph, read stage by stage."""

    def __init__(self, graph: Graph, ctx: BoundContext):
        from lipverify.bounds import METHODS

        self.result = METHODS["layerwise"].run(graph, ctx)
        self.scalings = _rebuild_scalings(graph, self.result.witness)
        self.factors = self.result.witness["factors"]
        self.ratios = self.result.info["merge_ratios"]
        self.graph = graph

    def shape(self, name: str) -> list[float]:
        s = _per_channel(self.scalings[name])
        if s is None:
            raise SoundnessError(f"lipsdp-graph: the layerwise scaling of {name} is not per channel")
        return [float(v) ** 2 for v in s]

    def factor(self, entry: str, exit_: str) -> float:
        """Propagated layerwise bound from ``entry`` (bound 1) to ``exit_`` (scaled norms)."""
        from lipverify.verifier.sdp_graph import segment_nodes

        bound = {entry: 1.0}
        for n in segment_nodes(self.graph, entry, exit_):
            if n.is_merge:
                bound[n.name] = n.op.combine([r * bound[i] for r, i in zip(self.ratios[n.name], n.inputs)])
            else:
                bound[n.name] = self.factors[n.name] * bound[n.inputs[0]]
        return inflate(bound[exit_], 8)


@register
class LipSDPGraph(BoundMethod):
    name = "lipsdp-graph"
    description = ("LipSDP over the whole graph: per-channel multipliers on convolutions (checked per "
                   "frequency), per-neuron on dense layers, residual blocks inside one LMI")

    def not_applicable(self, graph: Graph) -> str | None:
        if graph.is_chain() and not any(isinstance(n.op, Conv) for n in graph.nodes):
            return "a dense chain (lipsdp-neuron is the same LMI)"
        plans = plan_segments(graph)
        if not any(p.is_lmi for p in plans):
            return "no convolution stage, residual block or dense layer small enough for an LMI"
        if any(p.kind == "layerwise" for p in plans):
            from lipverify.bounds import METHODS

            return METHODS["layerwise"].not_applicable(graph)
        return None

    pair_fallback = "layerwise"

    def fits_auto(self, graph: Graph, device: str = "cpu") -> bool:
        return _work(plan_segments(graph)) <= AUTO_MAX_WORK

    def fits_pairs(self, graph: Graph, n_problems: int, device: str = "cpu") -> bool:
        return n_problems * _work(plan_segments(graph)) <= AUTO_MAX_WORK

    def run(self, graph: Graph, ctx: BoundContext) -> BoundResult:
        start = time.perf_counter()
        plans = plan_segments(graph, PlanOptions.from_options(ctx.options))
        if not any(p.is_lmi for p in plans):
            raise SoundnessError("lipsdp-graph: nothing to put in an LMI")
        blocks = runs(plans)
        lw = _Layerwise(graph, ctx) if any(b[0].kind == "layerwise" for b in blocks) else None
        cut = []  # runs left to layerwise because the user's --budget-s was spent
        tol = float(ctx.options.get("lipsdp_graph_tol", 1e-8))
        weights = {graph.output: [1.0] * graph.shape_of(graph.output)[0]}
        segments, rows, notes = [], [], []
        for block in reversed(blocks):
            entry, exit_ = block[0].entry, block[-1].exit
            ones_in = [1.0] * graph.shape_of(entry)[0]
            shape_in = lw.shape(entry) if lw is not None and entry != graph.input_name else ones_in
            use_lw = block[0].kind == "layerwise" or not any(p.is_lmi for p in block) or \
                (lw is not None and _cannot_beat_scaled_norm(block))
            if not use_lw and ctx.time_budget.expired():
                lw = lw or _Layerwise(graph, ctx)
                use_lw = True
                cut.append(f"{entry} -> {exit_}")
            ones_out = [1.0] * graph.shape_of(exit_)[0]
            kappa_out = _kappa(weights[exit_], lw.shape(exit_) if lw is not None and exit_ != graph.output else ones_out)
            run = None
            if not use_lw:
                try:
                    run = solve_run(graph, block, shape_in, weights[exit_], tol,
                                    int(ctx.options.get("lipsdp_graph_opt_freqs", OPT_MAX_FREQS)))
                except SoundnessError as exc:  # no certified LMI point (e.g. badly conditioned): layerwise
                    lw = lw or _Layerwise(graph, ctx)
                    use_lw = True
                    notes.append(f"lipsdp-graph: {entry} -> {exit_}: layerwise kept ({exc})")
            if run is not None:
                factor, how = run.factor / math.sqrt(kappa_out), " + ".join(p.kind for p in block)
                if lw is not None:
                    # the run was solved for the exit weights it got; compare like with like
                    c_lw = lw.factor(entry, exit_)
                    if c_lw < factor * (1 - 1e-9):
                        use_lw = True
                        notes.append(f"lipsdp-graph: {entry} -> {exit_}: layerwise ({c_lw:.6g}) beat the LMI "
                                     f"({factor:.6g})")
                if not use_lw:
                    segments = run.segments + segments
                    weights.update(run.weights)
                    notes.append(f"lipsdp-graph: {entry} -> {exit_} ({how}): {run.info['iterations']} "
                                 f"interior-point iterations in {run.info['rounds']} round(s), optimized on "
                                 f"{run.info['frequencies'] or 'all'} frequencies, certified on all, "
                                 f"back-off {run.info['backoff']:g}")
            if use_lw:
                c = lw.factor(entry, exit_)
                # lw may have been built just now (budget, failed LMI): shapes from its scalings
                shape_in = lw.shape(entry) if entry != graph.input_name else ones_in
                kappa_out = _kappa(weights[exit_], lw.shape(exit_) if exit_ != graph.output else ones_out)
                weights[entry] = [kappa_out * c * c * s * (1 + 1e-12) for s in shape_in]
                segments = [{"kind": "layerwise", "entry": entry, "exit": exit_}] + segments
                factor, how = c, "layerwise"
            rows.insert(0, LayerBound(name=f"{entry} -> {exit_}", op=how, in_shape=list(graph.shape_of(entry)),
                                      out_shape=list(graph.shape_of(exit_)), factor=factor, lower=None,
                                      how=how))
        if cut:
            ctx.time_budget.cut(f"lipsdp-graph: {len(cut)} run(s) kept the layerwise factor instead of an LMI "
                                f"(--budget-s spent): {', '.join(reversed(cut))}")
        rho = max(weights[graph.input_name])
        witness = {"rho": rho, "segments": segments,
                   "weights": {b: weights[b] for b in [graph.input_name] + [s["exit"] for s in segments]}}
        if lw is not None:
            witness["layerwise"] = {k: lw.result.witness[k] for k in LAYERWISE_KEYS}
        check_segments(graph, [s for s in segments if s["kind"] == "layerwise"], witness["weights"],
                       witness.get("layerwise"))
        if rho < DEGENERATE_RHO:
            witness = _floor_degenerate(graph, witness)
        value = sqrt_up(witness["rho"])  # exactly the bound the witness implies
        kinds = ", ".join(s["kind"] for s in segments)
        return BoundResult(method=self.name, value=value, layers=rows,
                           check=f"segment LMIs ({kinds}) re-checked by Cholesky with rounding bounds",
                           witness=witness, seconds=time.perf_counter() - start, notes=notes,
                           info={"plan": [f"{s['kind']} {s['entry']} -> {s['exit']}" for s in segments],
                                 "budget_cut_runs": list(reversed(cut))})


def _cannot_beat_scaled_norm(block: list[SegmentPlan]) -> bool:
    """True when the run's LMI cannot beat layerwise, so its solve is skipped (a choice between two
    certified candidates, never a soundness question): one LMI segment whose nodes are at most one
    mixing linear map (conv, dense, merge, pooling) followed by at most one activation, with only
    per-channel ops (scale, shift, reshape) around them. The LMI then holds for every activation of
    slopes in [a, b], the linear b * v included, so it is at least b ||W_out^1/2 K W_in^-1/2||: the
    scaled norm layerwise certifies (run end weights are shaped like layerwise's scalings). Not so
    for linear -> activation -> linear: a one-hidden-layer LMI can beat the scaled product strictly
    (relu(x) + relu(-x): 1 against 2)."""
    lmis = [p for p in block if p.is_lmi]
    if len(lmis) != 1:
        return False
    nodes = lmis[0].structure.nodes
    acts = [i for i, n in enumerate(nodes) if isinstance(n.op, Activation)]
    mixing = [i for i, n in enumerate(nodes) if not isinstance(n.op, (Activation, Scale, Shift, Reshape))]
    if len(acts) > 1 or len(mixing) > 1:
        return False
    return not acts or (nodes[acts[0]].op.slopes[0] >= 0 and all(i < acts[0] for i in mixing))


def _floor_degenerate(graph: Graph, witness: dict) -> dict:
    """A (numerically) zero network: the solver creeps towards rho = 0; try rho = RHO_FLOOR at the
    input directly (valid when the input does not reach the output at all) and keep it if it checks."""
    from lipverify.verifier.lipsdp_graph import verify_lipsdp_graph

    floor = dict(witness, rho=RHO_FLOOR, weights=dict(witness["weights"]))
    floor["weights"][graph.input_name] = [RHO_FLOOR] * len(witness["weights"][graph.input_name])
    try:
        verify_lipsdp_graph(graph, math.sqrt(RHO_FLOOR) * 2, floor)
    except SoundnessError:
        return witness
    return floor


def _kappa(weights: list[float], shape: list[float]) -> float:
    """The smallest kappa with weights <= kappa * shape (channelwise), rounded up."""
    return max(w / s for w, s in zip(weights, shape)) * (1 + 1e-12)
