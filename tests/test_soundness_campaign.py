"""Short differential soundness campaign (the long one is benchmarks/soundness_campaign.py).

Known answers for the independent pieces first (the exact-Lipschitz oracle and the attack), then
~30 random networks through every registered method: no certified bound below the attack or the
exact value, orderings hold, and every supported op and activation was exercised.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lipverify import campaign
from lipverify.campaign import (attack, check_network, exact_relu_lipschitz, random_network, summarize)

torch.set_num_threads(1)
campaign.load_all_methods()


# -- the oracle -----------------------------------------------------------------------------------


def test_exact_oracle_abs_function():
    # |x| = relu(x) + relu(-x): two pieces with slopes +1 and -1: Lip = 1 (not 2, the product bound)
    w = [np.array([[1.0], [-1.0]]), np.array([[1.0, 1.0]])]
    b = [np.zeros(2), np.zeros(1)]
    ex = exact_relu_lipschitz(w, b)
    assert ex.lower == pytest.approx(1.0, rel=1e-12) and ex.upper == pytest.approx(1.0, rel=1e-12)
    assert ex.pieces == 2


def test_exact_oracle_dead_neuron_region_is_not_counted():
    # a neuron whose pre-activation is the constant -1 never fires: its huge outgoing weight must
    # not count (the product of norms would say 1000)
    w = [np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 1000.0]])]
    b = [np.zeros(2), np.zeros(1)]
    b[0][1] = -1.0
    ex = exact_relu_lipschitz(w, b)
    assert ex.lower == pytest.approx(1.0, rel=1e-12) and ex.upper == pytest.approx(1.0, rel=1e-12)


def test_exact_oracle_matches_brute_force_grid():
    """On 2-D inputs the max of ||J|| over a fine grid must equal the oracle (it is attained on pieces)."""
    for seed in range(6):
        net = random_network(seed, "tiny_relu")
        if net.input_shape != (2,):
            continue
        ex = exact_relu_lipschitz(net.dense_weights, net.dense_biases, seed=seed)
        g = np.linspace(-20, 20, 301)
        grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
        best = max(campaign._confirm_piece_values(net.dense_weights, net.dense_biases, x) for x in grid[::3])
        assert best <= ex.upper * (1 + 1e-12)
        assert ex.lower <= ex.upper * (1 + 1e-12)


def test_attack_is_a_true_lower_bound_and_finds_linear_norm():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    exact = float(torch.linalg.matrix_norm(lin.weight.detach().double(), 2))
    a = attack(lin, (5,), seed=0, budget_s=5)
    assert a.value <= exact * (1 + 1e-9)
    assert a.value >= exact * (1 - 1e-6)  # a linear map: power iteration finds the top direction


def test_attack_never_exceeds_exact_on_tiny_relu_nets():
    for seed in range(10, 16):
        net = random_network(seed, "tiny_relu")
        ex = exact_relu_lipschitz(net.dense_weights, net.dense_biases, seed=seed)
        a = attack(net.module, net.input_shape, seed=seed, budget_s=2)
        assert a.value <= ex.upper * (1 + 1e-9)
        assert a.value > 0


def test_generator_covers_every_family_and_is_deterministic():
    a, b = random_network(123), random_network(123)
    assert a.ops == b.ops and a.input_shape == b.input_shape
    for pa, pb in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(pa, pb)
    ops = set(itertools.chain.from_iterable(random_network(s).ops for s in range(300)))
    kinds = {o.split("(")[0] for o in ops}
    for needed in ("linear", "conv", "maxpool", "avgpool", "global_avgpool", "residual", "concat", "batchnorm1d",
                   "batchnorm2d", "flatten", "zeropad", *campaign.ACTIVATIONS):
        assert needed in kinds, needed
    assert any(o.startswith("leaky_relu(-") for o in ops)  # alpha < 0
    assert any("g2" in o or "g3" in o for o in ops) and any("d2" in o for o in ops) and any("s2" in o for o in ops)


# -- the short campaign ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    work = tmp_path_factory.mktemp("campaign")
    out = []
    # 12 tiny ReLU nets (exact comparison) + 18 mixed networks
    for seed in range(12):
        out.append(check_network(10_000 + seed, work, family="tiny_relu", lower_starts=2, lower_budget_s=0.1,
                                 attack_budget_s=0.5, timeout_s=60))
    for seed in range(18):
        out.append(check_network(20_000 + seed, work, lower_starts=2, lower_budget_s=0.1, attack_budget_s=0.5,
                                 timeout_s=60))
    return out


def test_no_violation(records):
    bad = [(r["seed"], r["violations"]) for r in records if r["violations"]]
    assert not bad, bad


def test_no_crash_or_timeout(records):
    bad = [(r["seed"], r["status"], r.get("message"), r.get("traceback")) for r in records
           if r["status"] in ("crash", "timeout")]
    assert not bad, bad


def test_most_networks_are_certified(records):
    certified = [r for r in records if r["status"] == "certified"]
    assert len(certified) >= 0.8 * len(records), summarize(records)["status"]


def test_exact_comparisons_ran_and_hold(records):
    exact = [r for r in records if "exact" in r]
    assert len(exact) >= 10
    for r in exact:
        if "bounds" in r:
            assert min(r["bounds"].values()) >= r["exact"]["lower"] * (1 - 1e-9)
        assert r["attack"] <= r["exact"]["upper"] * (1 + 1e-9)


def test_orderings_hold(records):
    issues = [(r["seed"], r["order_issues"]) for r in records if r["order_issues"]]
    assert not issues, issues


def test_summary_counts(records):
    s = summarize(records)
    assert s["networks"] == len(records)
    assert s["violations"] == 0
    assert s["min_certified_over_attack"] is None or s["min_certified_over_attack"] >= 1 - 1e-9
    assert "product" in s["methods"]
    assert not math.isnan(s["network_seconds"])
