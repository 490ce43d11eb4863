"""Checker for ``compositional`` certificates: witness = {"rho", "multipliers"} (one scalar per hidden layer).

A compositional certificate is LipSDP with layer-uniform multipliers T_k = t_k I, so the proof is
the LipSDP one: the dense chain is re-derived from the graph (``lipsdp.dense_chain``) and the
block-tridiagonal Cholesky of A(rho, T) - delta diag(s) must succeed (``lipsdp.lmi_holds``), with
every claimed number validated first (finite, t_k >= 0, rho > 0).
"""

from __future__ import annotations

import torch

from lipverify.graph.ir import Graph
from lipverify.verifier.lipsdp import dense_chain, lmi_holds
from lipverify.verifier.numbers import at_least, claim, claim_vector, fail, only_keys, sqrt_up, up


def verify_compositional(graph: Graph, value: float, witness: dict) -> tuple[float, str]:
    only_keys(witness, {"rho", "multipliers"}, "compositional")
    chain = dense_chain(graph)
    rho = claim(witness.get("rho"), "compositional: rho", positive=True)
    t = claim_vector(witness.get("multipliers"), "compositional: multipliers", length=len(chain.slopes))
    T = [torch.full((w.shape[0],), float(tk), dtype=torch.float64) for w, tk in zip(chain.weights[:-1], t)]
    ok, detail = lmi_holds(chain.weights, chain.slopes, T, rho, chain.magnitudes, chain.product_depth)
    if not ok:
        fail(f"compositional: the LMI does not hold for the stored (rho, multipliers): {detail}")
    implied = sqrt_up(up(rho))
    at_least(value, implied, "compositional")
    return implied, f"LipSDP LMI with layer-uniform multipliers re-checked at the stored (rho, t): {detail}"
