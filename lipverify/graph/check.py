"""Self-check: the extracted graph must compute what the user's model computes.

A wrong extraction would silently certify a different network, so we run both on random inputs
(Gaussian and uniform in [0, 1], the usual input ranges) and refuse when they differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lipverify.errors import ExtractionMismatchError
from lipverify.graph.ir import Graph

# The original runs in float32, the graph in float64: allow float32 rounding, relative to the
# output's magnitude, and nothing more.
REL_TOL = 1e-4


@dataclass
class SelfCheck:
    max_abs_diff: float
    tolerance: float
    samples: int

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "samples": self.samples}


def probe_inputs(input_shape, n: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    half = n // 2
    gauss = rng.standard_normal((half,) + tuple(input_shape))
    unif = rng.uniform(0.0, 1.0, (n - half,) + tuple(input_shape))
    return np.concatenate([gauss, unif]).astype(np.float32)


def self_check(graph: Graph, reference: Callable[[np.ndarray], np.ndarray], n: int = 8, seed: int = 0) -> SelfCheck:
    x = probe_inputs(graph.input_shape, n, seed)
    expected = np.asarray(reference(x), dtype=np.float64)
    with torch.no_grad():
        got = graph.forward(torch.from_numpy(x.astype(np.float64))).numpy()
    if got.shape != expected.shape:
        raise ExtractionMismatchError(f"the extracted graph gives outputs of shape {got.shape[1:]} but the model gives "
                                      f"{expected.shape[1:]}; refusing to certify")
    if not np.all(np.isfinite(expected)):
        raise ExtractionMismatchError("the model produces NaN/Inf on random inputs; refusing to certify")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    tol = REL_TOL * (1.0 + float(np.max(np.abs(expected))))
    if not diff <= tol:
        raise ExtractionMismatchError(
            f"the extracted graph differs from the model by {diff:.3g} (tolerance {tol:.3g}) on random inputs; "
            "refusing to certify a different network. Please report this model.")
    return SelfCheck(diff, tol, n)
