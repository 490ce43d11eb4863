"""Methods ``lipsdp-neuron`` and ``lipsdp-layer``: LipSDP on dense chains, through the graph IR.

Applicable to a chain (optional input flatten) Dense -> activation -> Dense -> ... -> Dense with any
slope-restricted elementwise activations (alpha < 0 included) and biases anywhere. Convolutions and
residual blocks go through the scalable methods instead. The solver and the float64 verifier live in
``lipsdp_core``; the witness (T, rho) is re-checked by ``lipverify.verifier.lipsdp`` before printing.
"""

from __future__ import annotations

import math
import time

import numpy as np

from lipverify.bounds import register
from lipverify.bounds.base import BoundContext, BoundMethod, BoundResult
from lipverify.bounds.lipsdp_core import lipsdp
from lipverify.bounds.product import layer_factors, layer_rows
from lipverify.graph.ir import Graph
from lipverify.ops.activation import Activation
from lipverify.ops.dense import Dense, Shift
from lipverify.ops.shape import Reshape

# Beyond this many hidden neurons the dense Newton step gets slow; auto skips LipSDP then.
AUTO_MAX_NEURONS = 4000


def dense_chain(graph: Graph) -> tuple[list[np.ndarray], list[tuple[float, float]]] | str:
    """(weights, slopes) of a Dense/activation chain, or the reason the graph is not one."""
    if not graph.is_chain():
        return "the graph has residual or concatenation merges (use layerwise/rslmi/product)"
    weights, slopes = [], []
    expect_dense = True
    for n in graph.nodes:
        op = n.op
        if isinstance(op, Shift):
            continue
        if isinstance(op, Reshape):
            if weights:
                return "a reshape between dense layers"
            continue
        if isinstance(op, Dense):
            if not expect_dense:
                return "two linear maps in a row that could not be merged"
            if len(graph.in_shape(n)) != 1:
                return "a dense map on a multi-axis tensor"
            weights.append(op.weight.detach().cpu().numpy().astype(np.float64))
            expect_dense = False
            continue
        if isinstance(op, Activation):
            if expect_dense:
                return "an activation not preceded by a dense map"
            slopes.append(tuple(float(s) for s in op.slopes))
            expect_dense = True
            continue
        return f"{op.describe()} is not a dense map or an elementwise activation"
    if not weights or expect_dense:
        return "the network must end with a dense map"
    if len(weights) < 2:
        return "no hidden layer (the product bound is exact)"
    return weights, slopes


class _LipSDP(BoundMethod):
    mode = "neuron"

    def not_applicable(self, graph: Graph) -> str | None:
        chain = dense_chain(graph)
        return chain if isinstance(chain, str) else None

    def fits_auto(self, graph: Graph) -> bool:
        chain = dense_chain(graph)
        return not isinstance(chain, str) and sum(w.shape[0] for w in chain[0][:-1]) <= AUTO_MAX_NEURONS

    def run(self, graph: Graph, ctx: BoundContext) -> BoundResult:
        start = time.perf_counter()
        weights, slopes = dense_chain(graph)
        solver = ctx.options.get("lipsdp_solver", "fast")
        budget_s = ctx.budget_s  # what is left of the run's --budget-s (None: no time limit)
        res = lipsdp(weights, slopes, self.mode, solver=solver, device=ctx.device, time_budget_s=budget_s)
        if budget_s is not None and res.seconds >= budget_s:
            ctx.time_budget.cut(f"{self.name}: the solver reached the --budget-s deadline (possibly before "
                                "converging); its best verified multipliers were certified")
        factors = layer_factors(graph, ctx)
        notes = []
        if res.raw_violation > 0:
            notes.append(f"{self.name}: the raw solver answer violated the LMI by {res.raw_violation:.2g}; "
                         "the certified value comes from the repaired, verified multipliers")
        return BoundResult(
            method=self.name, value=res.value, layers=layer_rows(graph, factors), check=res.check,
            witness={"mode": self.mode, "rho": res.rho, "T": [t.tolist() for t in res.T], "solver": res.solver},
            seconds=time.perf_counter() - start, notes=notes,
        )


@register
class LipSDPNeuron(_LipSDP):
    name = "lipsdp-neuron"
    description = "LipSDP with one multiplier per neuron (tightest; dense chains), fast structured solver"
    mode = "neuron"


@register
class LipSDPLayer(_LipSDP):
    name = "lipsdp-layer"
    description = "LipSDP with one multiplier per layer (dense chains)"
    mode = "layer"
