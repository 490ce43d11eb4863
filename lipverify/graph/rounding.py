"""How far the file's float32 outputs can be from the exact function the certificate is about.

The file computes in float32, so f32(x) = f(x) + e(x) with a rounding error e. A reported lower bound
must hold for the exact f:

    ||f(x) - f(y)|| >= ||f32(x) - f32(y)|| - ||e(x)|| - ||e(y)||,

so we report (||f32(x) - f32(y)|| - t(x) - t(y)) / ||x - y|| with t(x) >= ||e(x)||_2, per output:

    t_j(x) = min(A_j(x), MEASURED * |f32_j(x) - g_j(x)| + RELATIVE * eps32 * |f32_j(x)|).

- A_j = F * eps32 * M_j(x) is an a-priori bound (F = ``graph.check.tolerance_factor``: the float32
  operations that round into an output, summed over the nodes): M_j sums the magnitudes of the terms that
  make up output j (the graph run on |weights| and |x|), the self-check's rule. It holds whatever the
  graph's values are (only magnitudes are taken from it), but compounds layer by layer and is far
  too loose for deep networks (1e5 on a 9-layer MLP whose outputs are ~10).
- The second term measures e(x) against the extracted graph g in float64. Where the graph is the
  file's function (the self-check's promise) it is e(x) itself up to g's own float64 rounding, which
  comes from the same operations 2^29 times finer; the factor 2 and the relative term cover it. (An
  eps64 * M_j term would compound like A_j: 1e5 on a random 17-layer MLP whose outputs move by 1e-4.) Where the graph is wrong at x, |f32 - g| is large and the min
  falls back on A_j, so a point where the file is steeper than the graph still gets a small, valid
  allowance and the file's own steepness is what the quotient measures.
"""

from __future__ import annotations

import numpy as np
import torch

from lipverify.graph.check import EPS32, fits_float32, magnitude_pass, samples_per_chunk, tolerance_factor
from lipverify.graph.ir import Graph

# the self-check's factor and eps (a passing self-check sees less than a fifth of the factor)
MEASURED = 2.0
RELATIVE = 8.0
FLOOR = 1e-30  # outputs that are exactly representable still get a nonzero allowance


class OutputTolerance:
    """t(x) >= ||f32(x) - f(x)||_2 per sample, for inputs x exactly as the file sees them (float32).

    M(x) comes from the self-check's op-by-op rule (``graph.check.magnitudes``). ``graph`` must have
    the outputs the file model returns (one selected logit or all)."""

    def __init__(self, graph: Graph):
        self.graph = graph

    def __call__(self, x: np.ndarray, f32: np.ndarray) -> np.ndarray:
        """t per sample (shape (n,)) for inputs x exactly as the file saw them and its outputs f32 there."""
        xt = torch.from_numpy(np.asarray(x, dtype=np.float32).astype(np.float64))
        step = samples_per_chunk(self.graph)
        with torch.no_grad():
            m, peak = magnitude_pass(self.graph, xt)
            m = m.reshape(len(xt), -1).numpy()
            g = torch.cat([self.graph.forward(xt[i:i + step]) for i in range(0, len(xt), step)])
            g = g.reshape(len(xt), -1).numpy()
        f32 = np.asarray(f32, dtype=np.float64).reshape(len(xt), -1)
        a_priori = tolerance_factor(self.graph) * EPS32 * m
        measured = MEASURED * np.abs(f32 - g) + RELATIVE * EPS32 * np.abs(f32)
        per_output = np.minimum(a_priori, np.nan_to_num(measured, nan=np.inf)) + FLOOR
        t = np.sqrt((per_output ** 2).sum(axis=1))
        # where a float32 intermediate may overflow, the file's outputs say nothing about f: no allowance holds
        return np.where(fits_float32(peak).numpy(), t, np.inf)
