"""Checker for ``product`` certificates: witness = {"factors": {node: factor}}."""

from __future__ import annotations

from lipverify.graph.ir import Graph
from lipverify.verifier.factors import check_factors, propagate_up
from lipverify.verifier.numbers import at_least, fail, only_keys


def verify_product(graph: Graph, value: float, witness: dict) -> str:
    only_keys(witness, {"factors"}, "product")
    factors = witness.get("factors")
    if not isinstance(factors, dict):
        fail("product: the witness has no factors")
    checked = check_factors(graph, factors, "product")
    implied = propagate_up(graph, checked)[graph.output]
    at_least(value, implied, "product")
    return implied, f"{len(checked)} factors re-checked (Cholesky / closed forms, float64); propagation recomputed rounding up"
