"""Method ``compositional``: the layer-by-layer closed-form LipSDP certificate, for any slopes.

ECLipsE-Fast-style (one scalar multiplier per layer, chosen in closed form from the input side,
``compositional_core``), but derived from the exact Schur recursion so it stays sound for alpha < 0
(GELU, SiLU), where the published recurrence is not. Cost: a few dense factorizations per layer,
no iterations. The result is a LipSDP-Layer-feasible (rho, T): never below lipsdp-neuron /
lipsdp-layer, never above the product of norms, repaired against the weights the trusted verifier
re-derives and re-checked there (``lipverify.verifier.compositional``). It is also the warm start
of the LipSDP solver, and what ``auto`` runs when LipSDP is too large for the budget rule.
"""

from __future__ import annotations

import math
import time

import numpy as np

from lipverify.bounds import register
from lipverify.bounds.base import BoundContext, BoundMethod, BoundResult
from lipverify.bounds.compositional_core import compositional
from lipverify.bounds.lipsdp import chain_of
from lipverify.bounds.lipsdp_core import repair, verify_lipsdp
from lipverify.bounds.product import layer_factors, layer_rows
from lipverify.graph.ir import Graph
from lipverify.norms.margin import inflate


def certify_compositional(weights, slopes, trusted, device="cpu", cache=None) -> tuple[float, float, list[float], str]:
    """(certified L, verified rho, per-layer multipliers, check) for a dense chain; ``trusted`` is the
    verifier's ``DenseChain`` of the same network (repair and verification run on it); ``cache``
    shares the hidden-layer pass between graphs that differ only in their last layer."""
    t_values, _ = compositional(weights, slopes, device, cache)
    T = [np.full(w.shape[0], t) for w, t in zip(trusted.weights[:-1], t_values)]
    ws = [w for w in trusted.weights]
    # the closed form is tight in the last block; when rho cannot buy the verifier's margin there
    # (e.g. W_0 = 0 decouples the input block), a slightly larger T does
    for inflate_T in (0.0, 1e-6, 1e-4, 1e-2):
        T = [t * (1.0 + inflate_T) for t in T]
        rho = repair(ws, trusted.slopes, T, magnitudes=trusted.magnitudes, product_depth=trusted.product_depth)
        if math.isfinite(rho):
            break
    if not math.isfinite(rho):
        raise RuntimeError("the compositional multipliers could not be verified (numerically degenerate weights?)")
    ok, msg = verify_lipsdp(ws, trusted.slopes, T, rho, trusted.magnitudes, trusted.product_depth)
    assert ok, msg  # repair only returns verified rho
    n = sum([ws[0].shape[1]] + [w.shape[0] for w in ws[:-1]])
    return inflate(math.sqrt(rho), n), rho, [float(t[0]) for t in T], msg


@register
class Compositional(BoundMethod):
    name = "compositional"
    description = ("layer-by-layer closed-form LipSDP certificate (ECLipsE-Fast-style, sound for any slopes); "
                   "dense chains, fast")
    auto_superseded_by = ("lipsdp-neuron",)  # a lipsdp-neuron feasible point (layer-uniform multipliers)

    def not_applicable(self, graph: Graph) -> str | None:
        chain = chain_of(graph)
        return chain if isinstance(chain, str) else None

    def run(self, graph: Graph, ctx: BoundContext) -> BoundResult:
        from lipverify.verifier.lipsdp import dense_chain as trusted_chain

        start = time.perf_counter()
        weights, slopes = chain_of(graph)
        value, rho, t_values, check = certify_compositional(weights, slopes, trusted_chain(graph), ctx.device,
                                                            ctx.cache.setdefault("compositional", {}))
        seconds = time.perf_counter() - start
        factors = layer_factors(graph, ctx)
        return BoundResult(
            method=self.name, value=value, layers=layer_rows(graph, factors), check=check,
            witness={"rho": rho, "multipliers": t_values}, seconds=seconds,
            solver={"converged": True, "stop": "closed form (one pass over the layers)"},
        )
