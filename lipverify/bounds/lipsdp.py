"""Methods ``lipsdp-neuron`` and ``lipsdp-layer``: LipSDP on dense chains, through the graph IR.

Applicable to any chain that is a dense chain up to exact rewrites (``lipverify.graph.dense_rewrites``:
input normalisation folded into the first layer, consecutive linear maps merged, reshapes and
transposes between layers absorbed as permutations, a final activation kept as one more hidden
layer), with any slope-restricted elementwise activations (alpha < 0 included) and biases anywhere.
Convolutions and residual blocks go through the scalable methods instead. The solver lives in
``lipsdp_ipm`` (on ``lipsdp_blocks``), repair and verification plumbing in ``lipsdp_core``; the
multipliers are repaired against the weights the trusted verifier re-derives itself
(``lipverify.verifier.lipsdp.dense_chain``), which then re-checks the witness (T, rho).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from lipverify.bounds import register
from lipverify.bounds.base import BoundContext, BoundMethod, BoundResult
from lipverify.bounds.lipsdp_core import lipsdp
from lipverify.bounds.product import layer_factors, layer_rows
from lipverify.graph.dense_rewrites import dense_chain
from lipverify.graph.ir import Graph

# auto runs LipSDP only when the estimated work of a typical solve (50 Newton steps) stays below
# this many floating-point operations on the device (a rule on sizes, never on measured time);
# above it auto uses the compositional tier. 2e12 is about a minute of one CPU core.
AUTO_MAX_FLOPS = {"cpu": 2e12, "cuda": 2e14}
TYPICAL_NEWTON_STEPS = 50


def newton_step_flops(widths: list[int]) -> float:
    """Floating-point work of one Newton step on hidden widths ``widths`` (input block = first entry):
    the Hessian assembly touches every pair of blocks (~8 n_a n_b (n_a + n_b) / 2) and the Newton
    system over all N hidden neurons is factored (N^3 / 3)."""
    hidden = widths[1:]
    assembly = sum(8.0 * a * b * (a + b) / 2 for i, a in enumerate(widths) for b in widths[i:])
    n = float(sum(hidden))
    return assembly + n ** 3 / 3


def chain_of(graph: Graph):
    """dense_chain(graph), cached on the graph object (keyed so that a copied or edited graph recomputes)."""
    key = (id(graph), len(graph.nodes), id(graph.nodes[-1]) if graph.nodes else None, graph.output)
    cached = getattr(graph, "_dense_chain_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, dense_chain(graph))
        graph._dense_chain_cache = cached
    return cached[1]


PAIR_WARM_GAP = 0.3  # a related problem's path point (recorded at this relative gap) warm-starts the next


def hidden_key(weights, slopes, mode: str) -> str:
    """Identifies the hidden layers (all weights but the last, slopes) and the multiplier mode:
    graphs that differ only in their last layer (pairwise logit differences) share it."""
    h = hashlib.sha1(f"{mode}|{slopes!r}".encode())
    for w in weights[:-1]:
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def solver_summary(res) -> dict:
    """The 'say what happened' part of a method's JSON entry."""
    out = {"converged": bool(res.converged), "stop": res.stop, "solver": res.solver}
    if res.gap != float("inf"):
        out["duality_gap"] = res.gap
    if res.dual_value is not None:
        out["sdp_lower"] = res.dual_value
    out.update({k: v for k, v in res.info.items()
                if k in ("newton_steps", "predictor_steps", "device", "status", "warm_start")})
    return out


class _LipSDP(BoundMethod):
    mode = "neuron"
    pair_fallback = "compositional"

    def not_applicable(self, graph: Graph) -> str | None:
        chain = chain_of(graph)
        return chain if isinstance(chain, str) else None

    def fits_auto(self, graph: Graph, device: str = "cpu") -> bool:
        return self.fits_pairs(graph, 1, device)

    def fits_pairs(self, graph: Graph, n_problems: int, device: str = "cpu") -> bool:
        """Whether ``n_problems`` solves on this chain fit the work rule (pairwise radii: C(C-1)/2)."""
        chain = chain_of(graph)
        if isinstance(chain, str):
            return False
        weights = chain[0]
        widths = [min(weights[0].shape)] + [w.shape[0] for w in weights[:-1]]
        work = n_problems * newton_step_flops(widths) * TYPICAL_NEWTON_STEPS
        return work <= AUTO_MAX_FLOPS.get(device, AUTO_MAX_FLOPS["cpu"])

    def run(self, graph: Graph, ctx: BoundContext) -> BoundResult:
        from lipverify.verifier.lipsdp import dense_chain as trusted_chain

        start = time.perf_counter()
        weights, slopes = chain_of(graph)
        solver = ctx.options.get("lipsdp_solver", "fast")
        budget_s = ctx.budget_s  # what is left of the run's --budget-s (None: no time limit)
        tol = float(ctx.options.get("lipsdp_tol", 1e-6))
        # a path point of an earlier solve on the same hidden layers (the whole output) warm-starts this
        # one: scaled by 2 it is strictly feasible for any logit difference, since (e_i - e_j)(e_i - e_j)^T <= 2 I
        paths = ctx.cache.setdefault("lipsdp-paths", {})
        key = hidden_key(weights, slopes, self.mode)
        warm = None
        if key in paths and solver == "fast":
            T_ck, tau_ck = paths[key]
            warm = ([2.0 * t for t in T_ck], tau_ck / 2.0)
        res = lipsdp(weights, slopes, self.mode, solver=solver, device=ctx.device, time_budget_s=budget_s,
                     tol=tol, certify_on=trusted_chain(graph), warm_start=warm, checkpoint_gap=PAIR_WARM_GAP)
        if key not in paths and "checkpoint" in res.info:
            paths[key] = res.info["checkpoint"]
        if budget_s is not None and res.seconds >= budget_s:
            ctx.time_budget.cut(f"{self.name}: the solver reached the --budget-s deadline (possibly before "
                                "converging); its best verified multipliers were certified")
        factors = layer_factors(graph, ctx)
        notes = []
        if res.raw_violation > 0:
            notes.append(f"{self.name}: the raw solver answer violated the LMI by {res.raw_violation:.2g}; "
                         "the certified value comes from the repaired, verified multipliers")
        if not res.converged:
            notes.append(f"{self.name}: not converged ({res.stop}); the bound is certified but may be loose")
        summary = solver_summary(res)
        return BoundResult(
            method=self.name, value=res.value, layers=layer_rows(graph, factors), check=res.check,
            witness={"mode": self.mode, "rho": res.rho, "T": [t.tolist() for t in res.T]}, info={"solver": res.solver},
            seconds=time.perf_counter() - start, notes=notes, solver=summary,
        )


@register
class LipSDPNeuron(_LipSDP):
    name = "lipsdp-neuron"
    description = "LipSDP with one multiplier per neuron (tightest; dense chains), structured interior-point solver"
    mode = "neuron"


@register
class LipSDPLayer(_LipSDP):
    name = "lipsdp-layer"
    description = "LipSDP with one multiplier per layer (dense chains)"
    mode = "layer"
    auto_superseded_by = ("lipsdp-neuron",)  # its feasible set is contained in lipsdp-neuron's
