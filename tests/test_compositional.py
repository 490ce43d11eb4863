"""The compositional tier: closed-form layer-uniform LipSDP certificates, sound for any slopes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lipverify.bounds.compositional_core import compositional, slope_u
from lipverify.bounds.lipsdp_core import lipsdp, rho_for_T, verify_lipsdp
from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph, Node
from lipverify.ops.activation import GELU, LeakyReLU, ReLU
from lipverify.ops.dense import Dense
from lipverify.verifier.compositional import verify_compositional

torch.set_num_threads(1)
EXT = Path(__file__).resolve().parents[2] / "shared" / "external"
GELU_SL = GELU().slopes


def _rand_net(rng, dims, scale=1.0):
    return [rng.normal(size=(dims[i + 1], dims[i])) * scale / np.sqrt(dims[i]) for i in range(len(dims) - 1)]


def _sampled_lower(ws, act, n=400, seed=0):
    """max ||J(x)||_2 over random inputs: a true lower bound on Lip(f)."""
    g = torch.Generator().manual_seed(seed)
    Wt = [torch.as_tensor(w) for w in ws]
    best = 0.0
    for _ in range(n):
        x = torch.randn(Wt[0].shape[1], generator=g, dtype=torch.float64) * 2

        def f(z):
            for W in Wt[:-1]:
                z = act(W @ z)
            return Wt[-1] @ z
        best = max(best, float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(f, x), 2)))
    return best


def test_eclipse_fast_known_answer_and_negative_alpha():
    path = EXT / "ECLipsE" / "lyr2n80test1.npz"
    if not path.exists():
        pytest.skip(f"{path} absent")
    d = np.load(path)
    ws = [d["w1"], d["w2"]]
    _, rho = compositional(ws, [(0.0, 1.0)])
    assert abs(np.sqrt(rho) - 0.8090351972788797) < 1e-9  # ECLipsE-Fast's published value (ReLU: same rule)
    _, rho = compositional(ws, [(-0.13, 1.13)])
    assert np.sqrt(rho) >= 0.8331004  # >= LipSDP-Neuron for this slope class; 0.7373 would be unsound


def test_slope_rule_matches_eclipse_fast_for_relu():
    assert slope_u(0.0, 1.0) == 1.0  # lambda = 1 / ||W P^-1 W^T||
    assert 0 < slope_u(-0.13, 1.13) < slope_u(0.0, 1.0)


ACTS = [((0.0, 1.0), torch.relu), (GELU_SL, torch.nn.functional.gelu),
        (LeakyReLU(-0.5).slopes, lambda z: torch.nn.functional.leaky_relu(z, -0.5)),
        (LeakyReLU(0.2).slopes, lambda z: torch.nn.functional.leaky_relu(z, 0.2))]


@pytest.mark.parametrize("case", range(len(ACTS)))
def test_between_lipsdp_and_product_and_sound(case):
    rng = np.random.default_rng(20 + case)
    slopes, act = ACTS[case]
    dims = [int(rng.integers(3, 8))] + [int(rng.integers(4, 12)) for _ in range(3)] + [int(rng.integers(1, 4))]
    ws = _rand_net(rng, dims, 2.0)
    sl = [slopes] * 3
    t, rho = compositional(ws, sl)
    T = [np.full(w.shape[0], tk) for w, tk in zip(ws[:-1], t)]
    assert abs(rho_for_T(ws, sl, T) - rho) <= 1e-8 * rho  # the closed form's rho is rho*(T)
    value = np.sqrt(rho)
    K = max(abs(slopes[0]), abs(slopes[1]))
    product = np.prod([np.linalg.norm(w, 2) for w in ws]) * K ** 3
    neuron = lipsdp(ws, sl).value
    assert neuron <= value * (1 + 1e-7)
    assert value <= product * (1 + 1e-9)
    assert _sampled_lower(ws, act) <= value  # sound for alpha < 0 too


def _graph(ws, act_cls) -> Graph:
    g = Graph("x", (ws[0].shape[1],))
    prev = "x"
    for k, w in enumerate(ws):
        g.nodes.append(Node(f"d{k}", Dense(torch.as_tensor(w)), [prev], (w.shape[0],)))
        prev = f"d{k}"
        if k < len(ws) - 1:
            g.nodes.append(Node(f"a{k}", act_cls(), [prev], (w.shape[0],)))
            prev = f"a{k}"
    g.output = prev
    return g


def test_method_and_checker_reject_tampering():
    from lipverify.bounds import BoundContext, get_method

    rng = np.random.default_rng(3)
    ws = _rand_net(rng, [5, 7, 6, 2], 1.5)
    g = _graph(ws, ReLU)
    res = get_method("compositional").run(g, BoundContext())
    assert "closed form" in res.solver["stop"]
    verify_compositional(g, res.value, res.witness)
    lo = dict(res.witness, rho=res.witness["rho"] * (1 - 1e-4))
    with pytest.raises(SoundnessError):
        verify_compositional(g, res.value, lo)  # rho is tight for these multipliers
    with pytest.raises(SoundnessError):
        verify_compositional(g, res.value, dict(res.witness, multipliers=[-1.0, 1.0]))
    with pytest.raises(SoundnessError):
        verify_compositional(g, res.value, dict(res.witness, multipliers=[1.0]))
    with pytest.raises(SoundnessError):
        verify_compositional(g, res.value * 0.99, res.witness)  # claims less than the witness proves
    # the same witness is a LipSDP-Layer certificate
    T = [np.full(w.shape[0], t) for w, t in zip(ws[:-1], res.witness["multipliers"])]
    assert verify_lipsdp(ws, [(0.0, 1.0)] * 2, T, res.witness["rho"])[0]
