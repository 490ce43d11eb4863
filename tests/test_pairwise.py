"""Pairwise certified bounds: a rule on the network chooses the methods, and the result is deterministic."""

from __future__ import annotations

import numpy as np
import torch

from lipverify.bounds import BoundContext
from lipverify.bounds.lipsdp_core import lipsdp
from lipverify.graph.ir import Graph, Node
from lipverify.ops.activation import ReLU
from lipverify.ops.dense import Dense
from lipverify.robustness import pair_methods, pairwise_bounds

torch.set_num_threads(1)


def _mlp(dims, seed=0) -> tuple[Graph, list]:
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(dims[i + 1], dims[i])) * 2 / np.sqrt(dims[i]) for i in range(len(dims) - 1)]
    g = Graph("x", (dims[0],))
    prev = "x"
    for k, w in enumerate(ws):
        g.nodes.append(Node(f"d{k}", Dense(torch.as_tensor(w)), [prev], (w.shape[0],)))
        prev = f"d{k}"
        if k < len(ws) - 1:
            g.nodes.append(Node(f"a{k}", ReLU(), [prev], (w.shape[0],)))
            prev = f"a{k}"
    g.output = prev
    return g, ws


def _no_track(it, desc, total=None):
    return it


def test_pairwise_is_deterministic_and_warm_started():
    g, ws = _mlp([8, 12, 12, 4])
    names = ["lipsdp-neuron", "product"]
    runs = []
    for _ in range(2):
        ctx = BoundContext()
        from lipverify.bounds import METHODS
        METHODS["lipsdp-neuron"].run(g, ctx)  # the whole-output solve leaves its path point in ctx.cache
        runs.append(pairwise_bounds(g, names, ctx, _no_track))
    (L1, used1), (L2, used2) = runs
    np.testing.assert_array_equal(L1, L2)
    assert used1 == used2 and "dropped_for_time" not in used1
    assert used1.get("lipsdp-neuron") == 6
    # each pair's bound matches a cold solve of the same logit difference
    for i, j in [(0, 1), (2, 3)]:
        row = (np.eye(4)[i] - np.eye(4)[j]) @ ws[-1]
        cold = lipsdp(ws[:-1] + [row[None]], (0, 1)).value
        assert abs(L1[i, j] - cold) <= 1e-4 * cold
    assert ctx.cache["lipsdp-paths"]  # the warm start was available


def test_pair_methods_rule_replaces_large_lipsdp_by_compositional():
    small, _ = _mlp([8, 12, 12, 4])
    assert pair_methods(small, ["lipsdp-neuron", "product"], 6) == (["lipsdp-neuron", "product"], [])
    big, _ = _mlp([20, 1000, 1000, 10])
    names, replaced = pair_methods(big, ["lipsdp-neuron", "product"], 45)
    assert names == ["compositional", "product"] and "size rule" in replaced[0]
    names, _ = pair_methods(big, ["lipsdp-neuron", "product"], 45, device="cuda")
    assert names[0] == "lipsdp-neuron"  # the rule depends on sizes and the device, not on timings


def test_compositional_pairs_share_the_hidden_pass():
    g, ws = _mlp([8, 12, 12, 4], seed=1)
    ctx = BoundContext()
    L, used = pairwise_bounds(g, ["compositional"], ctx, _no_track)
    assert len(used.pop("certificates")) == 6  # each pair's best verified witness, for `lipverify check`
    assert used == {"compositional": 6}
    assert len(ctx.cache["compositional"]) == 1  # one forward pass served all six logit differences
    assert np.all(L[np.triu_indices(4, 1)] > 0) and np.allclose(L, L.T)
