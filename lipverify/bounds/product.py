"""Method ``product``: propagate per-node certified factors through the graph.

Lip(input -> node) <= factor(node) * Lip(input -> its input) for unary ops; merges combine their
inputs' bounds (Add: sum, so a residual block gets at most 1 + Lip(branch); Concat: root sum of
squares). On a chain this is the product of the per-layer factors.
"""

from __future__ import annotations

import hashlib
import time

import torch

from lipverify.bounds import register
from lipverify.bounds.base import BoundContext, BoundMethod, BoundResult, LayerBound
from lipverify.graph.ir import Graph
from lipverify.norms.margin import inflate


def cumulative_bounds(graph: Graph, factors: dict[str, float]) -> dict[str, float]:
    """Bound on Lip(input -> node) for every node, given a certified factor per unary node."""
    bound = {graph.input_name: 1.0}
    for n in graph.nodes:
        if n.is_merge:
            bound[n.name] = n.op.combine([bound[i] for i in n.inputs])
        else:
            bound[n.name] = factors[n.name] * bound[n.inputs[0]]
    return bound


def propagate(graph: Graph, factors: dict[str, float]) -> float:
    """Bound on Lip(input -> output) given a certified factor per unary node."""
    # float64 rounding of the products and sums: one more documented margin
    return inflate(cumulative_bounds(graph, factors)[graph.output], len(graph.nodes))


def op_fingerprint(op, in_shape) -> str:
    """Identifies an op by its type, geometry and exact tensor contents (for caching norms)."""
    h = hashlib.sha1(f"{type(op).__name__}|{op.describe()}|{tuple(in_shape)}".encode())
    for name, value in sorted(vars(op).items()):
        if isinstance(value, torch.Tensor):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(f"{name}={value!r}".encode())
    return h.hexdigest()


def layer_factors(graph: Graph, ctx: BoundContext) -> list[tuple]:
    """(node, NormResult) for every unary node, with a progress bar; cached across related graphs."""
    out = []
    unary = [n for n in graph.nodes if not n.is_merge]
    cache = ctx.cache.setdefault("factors", {})
    for n in ctx.track(unary, "per-layer norms", len(unary)):
        key = op_fingerprint(n.op, graph.in_shape(n))
        if key not in cache:
            cache[key] = n.op.factor(graph.in_shape(n), device=ctx.device)
        out.append((n, cache[key]))
    return out


def layer_rows(graph: Graph, factors, cumulative: dict[str, float] | None = None) -> list[LayerBound]:
    """One row per node in graph order: unary nodes with their factor, merges (residual Add,
    Concat) with how they combine their branches; ``cumulative`` adds Lip(input -> node)."""
    by_name = {n.name: r for n, r in factors}
    rows = []
    for n in graph.nodes:
        extra = {} if cumulative is None else {"cumulative": cumulative[n.name]}
        common = dict(name=n.source or n.name, op=n.op.describe(), in_shape=list(graph.in_shape(n)),
                      out_shape=list(n.out_shape), extra=extra)
        if n.is_merge:
            rows.append(LayerBound(factor=None, lower=None, how=f"combines the bounds of its {len(n.inputs)} "
                                   f"inputs ({MERGE_RULES.get(n.op.kind, n.op.kind)})", **common))
        else:
            r = by_name[n.name]
            rows.append(LayerBound(factor=r.upper, lower=r.lower, how=r.method, **common))
    return rows


MERGE_RULES = {"Add": "sum", "Sub": "sum", "Concat": "root sum of squares"}


@register
class ProductBound(BoundMethod):
    name = "product"
    description = "product of certified per-layer operator norms (residual blocks: 1 + Lip(branch))"

    def run(self, graph: Graph, ctx: BoundContext) -> BoundResult:
        start = time.perf_counter()
        factors = layer_factors(graph, ctx)
        uppers = {n.name: r.upper for n, r in factors}
        value = propagate(graph, uppers)
        return BoundResult(
            method=self.name, value=value, layers=layer_rows(graph, factors, cumulative_bounds(graph, uppers)),
            check="per-layer norms in float64 with rounding margin",
            witness={"factors": {n.name: r.upper for n, r in factors}},
            seconds=time.perf_counter() - start,
        )
