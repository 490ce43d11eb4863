"""Pairwise bounds (the C(C-1)/2 logit differences of certified radii): shared work vs cold solves.

    PYTHONPATH=. .venv/bin/python benchmarks/pairwise_speed.py [--dims 784,100,100,10] [--methods lipsdp-neuron,compositional]

For each method, in one process: "cold" bounds every pair with a fresh context (each pair solved
from scratch, nothing shared: what the old code did per pair), "shared" runs ``pairwise_bounds``
with one context after the whole-output run, as ``certify --data`` does (LipSDP warm-starts from
the whole-output path point, the compositional tier reuses its hidden-layer pass, per-layer norms
are cached). Prints both times, the ratio and the largest relative difference of the bounds.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def graph_of(ws):
    from lipverify.graph.ir import Graph, Node
    from lipverify.ops.activation import ReLU
    from lipverify.ops.dense import Dense

    g = Graph("x", (ws[0].shape[1],))
    prev = "x"
    for k, w in enumerate(ws):
        g.nodes.append(Node(f"d{k}", Dense(torch.as_tensor(w)), [prev], (w.shape[0],)))
        prev = f"d{k}"
        if k < len(ws) - 1:
            g.nodes.append(Node(f"a{k}", ReLU(), [prev], (w.shape[0],)))
            prev = f"a{k}"
    g.output = prev
    return g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="784,100,100,10")
    ap.add_argument("--methods", default="lipsdp-neuron,compositional")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from lipverify.bounds import METHODS, BoundContext
    from lipverify.graph.transform import output_dim, pairwise_difference
    from lipverify.robustness import pairwise_bounds
    from lipverify.verifier import verify

    dims = [int(d) for d in a.dims.split(",")]
    rng = np.random.default_rng(a.seed)
    ws = [rng.normal(size=(dims[i + 1], dims[i])) / np.sqrt(dims[i]) for i in range(len(dims) - 1)]
    g = graph_of(ws)
    c = output_dim(g)
    pairs = [(i, j) for i in range(c) for j in range(i + 1, c)]
    quiet = lambda it, desc, total=None: it  # noqa: E731
    print(f"net {a.dims}: {len(pairs)} pairs")
    for name in a.methods.split(","):
        t0 = time.perf_counter()
        cold = np.zeros((c, c))
        for i, j in pairs:
            gp = pairwise_difference(g, i, j)
            r = METHODS[name].run(gp, BoundContext())
            verify(gp, r)
            cold[i, j] = r.value
        t_cold = time.perf_counter() - t0
        ctx = BoundContext()
        METHODS[name].run(g, ctx)  # the whole-output run certify does first (not timed)
        t0 = time.perf_counter()
        L, used = pairwise_bounds(g, [name], ctx, quiet)
        t_shared = time.perf_counter() - t0
        iu = np.triu_indices(c, 1)
        diff = float(np.max(np.abs(L[iu] - cold[iu]) / cold[iu]))
        print(f"  {name:14} cold {t_cold:8.2f} s   shared {t_shared:8.2f} s   speed-up x{t_cold / t_shared:.2f}   "
              f"max relative difference of the bounds {diff:.1e}   ({used})", flush=True)


if __name__ == "__main__":
    main()
