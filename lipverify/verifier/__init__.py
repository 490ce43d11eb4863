"""The trusted base: independent float64 re-checks of every certified number.

Nothing is printed as certified unless ``verify`` accepted it. The package imports nothing from
``lipverify.bounds`` or ``lipverify.norms`` (a method's bug cannot pass its own check) and re-derives
every rule it uses. What it trusts:

- torch's float64 linear algebra (Cholesky factorization, matrix products) and IEEE arithmetic;
- the extracted graph (``lipverify.graph.ir``) and the op classes in ``lipverify.ops`` (their
  weights, geometry, ``apply``/``forward`` and slope intervals), which the self-check compared
  with the user's model;
- the ONNX loader that produced them.

Modules: ``numbers`` (claimed numbers, upward rounding), ``linalg`` (rigorous Cholesky proofs of
PSD and norm bounds), ``conv`` (convolution norms: unrolled or per frequency), ``factors`` (per-op
rules and propagation), one checker per method (``product``, ``lipsdp``, ``compositional``, ``scaled``,
``lipsdp_graph`` with ``sdp_graph``), and
``certificate`` (``lipverify check``: a certificate file against a model file).
"""

from __future__ import annotations

import math
from typing import Callable

from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph
from lipverify.verifier.compositional import verify_compositional
from lipverify.verifier.lipsdp import verify_lipsdp
from lipverify.verifier.lipsdp_graph import verify_lipsdp_graph
from lipverify.verifier.product import verify_product
from lipverify.verifier.scaled import verify_layerwise, verify_rslmi

# method name -> checker(graph, claimed value, witness) -> (the bound the witness implies, what passed);
# a checker raises SoundnessError (verifier.numbers.fail) when the claim is not proven
CHECKERS: dict[str, Callable[[Graph, float, dict], tuple[float, str]]] = {
    "product": verify_product,
    "lipsdp-neuron": verify_lipsdp,
    "lipsdp-layer": verify_lipsdp,
    "rslmi": verify_rslmi,
    "layerwise": verify_layerwise,
    "compositional": verify_compositional,
    "lipsdp-graph": verify_lipsdp_graph,
}


def verify_implied(graph: Graph, result) -> tuple[float | None, str]:
    """Re-check a method's result (anything with ``method``, ``value``, ``witness``) on ``graph``;
    returns the bound its witness implies (None if the checker does not say) and what passed."""
    value = result.value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise SoundnessError(f"method {result.method} returned a non-finite or negative bound {value!r}")
    checker = CHECKERS.get(result.method)
    if checker is None:
        raise SoundnessError(f"no independent verifier for method {result.method!r}; refusing to certify")
    if not isinstance(result.witness, dict):
        raise SoundnessError(f"method {result.method}: the witness is not an object")
    out = checker(graph, float(value), result.witness)
    if isinstance(out, str):
        return None, out
    implied, detail = out
    return float(implied), detail


def verify(graph: Graph, result) -> str:
    """Re-check a method's result on ``graph``; returns what passed (raises SoundnessError otherwise)."""
    return verify_implied(graph, result)[1]
