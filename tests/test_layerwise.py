"""Layerwise-scaled certificates (method "layerwise"): never above the product bound, never below a
sampled lower bound, at least 20% below the product bound on a trained MLP, tamper-proof witness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import Residual, export_onnx, external, graph_as_file
import lipverify.bounds.layerwise  # noqa: F401  (registers the method and its verifier)
from lipverify.attack import lower_bound
from lipverify.bounds import METHODS, BoundContext
from lipverify.bounds.layerwise import build_plan, loop_recursion
from lipverify.certify import CertifyOptions, certify
from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph, Node
from lipverify.ops.activation import GELU, LeakyReLU, ReLU
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense, Shift
from lipverify.ops.merge import Add
from lipverify.ops.pool import AvgPool, MaxPool, Reduce
from lipverify.ops.shape import Reshape
from lipverify.verifier import verify

torch.set_num_threads(1)
F64 = torch.float64
FAST = {"layerwise_steps": 120}
ACTS = {"relu": ReLU, "leaky": lambda: LeakyReLU(0.1), "gelu": GELU, "leaky_neg": lambda: LeakyReLU(-0.5)}


def _run(graph, method="layerwise", **options):
    return METHODS[method].run(graph, BoundContext(options={**FAST, **options}))


def _mlp(widths, act, seed, scale=1.0) -> Graph:
    gen = torch.Generator().manual_seed(seed)
    nodes, prev = [], "x"
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        w = torch.randn(b, a, generator=gen, dtype=F64) * scale / math.sqrt(a)
        nodes.append(Node(f"d{i}", Dense(w, torch.randn(b, generator=gen, dtype=F64)), [prev], (b,)))
        prev = f"d{i}"
        if i < len(widths) - 2:
            nodes.append(Node(f"a{i}", act(), [prev], (b,)))
            prev = f"a{i}"
    return Graph("x", (widths[0],), nodes, prev)


def _conv(c_out, c_in, k, gen, stride=1, pad=1):
    w = torch.randn(c_out, c_in, k, k, generator=gen, dtype=F64) / math.sqrt(c_in * k * k)
    return Conv(w, torch.randn(c_out, generator=gen, dtype=F64) * 0.1, (stride, stride), (pad,) * 4, (1, 1), 1)


def _cnn(act, seed, pool="max") -> Graph:
    gen = torch.Generator().manual_seed(seed)
    pool_op = MaxPool((2, 2), (2, 2), (0, 0, 0, 0)) if pool == "max" else AvgPool((2, 2), (2, 2), (0, 0, 0, 0))
    nodes = [Node("c1", _conv(6, 2, 3, gen), ["x"], (6, 8, 8)), Node("a1", act(), ["c1"], (6, 8, 8)),
             Node("c2", _conv(8, 6, 3, gen, stride=2), ["a1"], (8, 4, 4)),
             Node("s2", Shift(torch.randn(8, 1, 1, generator=gen, dtype=F64)), ["c2"], (8, 4, 4)),
             Node("a2", act(), ["s2"], (8, 4, 4)),
             Node("p", pool_op, ["a2"], (8, 2, 2)),
             Node("flat", Reshape((32,)), ["p"], (32,)),
             Node("d", Dense(torch.randn(16, 32, generator=gen, dtype=F64) / 5), ["flat"], (16,)),
             Node("a3", act(), ["d"], (16,)),
             Node("y", Dense(torch.randn(4, 16, generator=gen, dtype=F64) / 4), ["a3"], (4,))]
    return Graph("x", (2, 8, 8), nodes, "y")


def _check_sandwich(g, res, seed=0):
    prod = METHODS["product"].run(g, BoundContext()).value
    assert res.value <= prod * (1 + 1e-12)
    lb = lower_bound(graph_as_file(g), g, starts=8, seed=seed, effort=0.25)
    assert 0 < lb.value <= res.value
    assert "re-checked" in verify(g, res)
    return prod, lb.value


# ---------------------------------------------------------------------------------------------
# product >= layerwise >= sampled lower bound
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_mlp_between_lower_bound_and_product(act, seed):
    g = _mlp([10, 32, 24, 32, 3], ACTS[act], seed, scale=1.5)
    res = _run(g)
    prod, _ = _check_sandwich(g, res, seed)
    assert res.value < prod  # scalings / loop transformation help on every random MLP here


@pytest.mark.parametrize("act", ["relu", "gelu", "leaky_neg"])
def test_one_dimensional_input_against_a_dense_grid(act):
    """With a scalar input and output, Lip = sup |f'|: a fine grid of difference quotients is an
    almost exact lower bound, so this checks the loop transformation's soundness closely."""
    g = _mlp([1, 12, 12, 12, 1], ACTS[act], seed=3, scale=2.0)
    res = _run(g)
    x = torch.linspace(-8, 8, 200001, dtype=F64)[:, None]
    with torch.no_grad():
        y = g.forward(x)[:, 0]
    slopes = (y[1:] - y[:-1]).abs() / (x[1, 0] - x[0, 0])
    assert float(slopes.max()) <= res.value
    verify(g, res)


@pytest.mark.parametrize("act", ["relu", "leaky", "gelu"])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_random_cnn_between_lower_bound_and_product(act, pool):
    g = _cnn(ACTS[act], seed=11, pool=pool)
    plan = build_plan(g)
    assert plan.rules["c2"] == "scaled" and plan.rules["p"] == "channel" and plan.rules["flat"] == "permute"
    res = _run(g)
    _check_sandwich(g, res)


def test_residual_cnn_scaled_as_a_whole():
    gen = torch.Generator().manual_seed(4)
    nodes = [Node("c0", _conv(4, 2, 3, gen), ["x"], (4, 6, 6)), Node("r0", ReLU(), ["c0"], (4, 6, 6)),
             Node("c1", _conv(4, 4, 3, gen), ["r0"], (4, 6, 6)), Node("r1", ReLU(), ["c1"], (4, 6, 6)),
             Node("c2", _conv(4, 4, 3, gen), ["r1"], (4, 6, 6)), Node("add", Add(), ["c2", "r0"], (4, 6, 6)),
             Node("r2", ReLU(), ["add"], (4, 6, 6)), Node("m", Reduce((1, 2), keepdims=False), ["r2"], (4,)),
             Node("y", Dense(torch.randn(3, 4, generator=gen, dtype=F64)), ["m"], (3,))]
    g = Graph("x", (2, 6, 6), nodes, "y")
    plan = build_plan(g)
    # the skip path, the branch's last conv and the sum share one scaling class
    assert plan.tensors["c2"].cls == plan.tensors["c0"].cls == plan.tensors["add"].cls
    assert plan.rules["add"] == "merge"
    res = _run(g)
    _check_sandwich(g, res, seed=2)


def test_residual_onnx_end_to_end(tmp_path):
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), Residual(body), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    path = export_onnx(model, (6,), tmp_path / "res.onnx")
    cert = certify(path, CertifyOptions(method="layerwise", lower_starts=8, lower_budget_s=2,
                                        method_options=FAST))
    assert cert["lower_bound"] <= cert["certified_bound"]
    prod = certify(path, CertifyOptions(method="product", lower_starts=2, lower_budget_s=0.2))
    assert cert["certified_bound"] <= prod["certified_bound"] * (1 + 1e-12)


# ---------------------------------------------------------------------------------------------
# Trained MLP: at least 20% below the product bound
# ---------------------------------------------------------------------------------------------


def test_trained_digits_mlp_at_least_20_percent_below_product():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100),
                              torch.nn.ReLU(), torch.nn.Linear(100, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):  # about a second, full batch
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert float((net(x).argmax(1) == y).float().mean()) > 0.95
    nodes, prev = [], "x"
    for i, layer in enumerate(net):
        if isinstance(layer, torch.nn.Linear):
            op, shape = Dense(layer.weight.detach().double(), layer.bias.detach().double()), (layer.out_features,)
        else:
            op, shape = ReLU(), nodes[-1].out_shape
        nodes.append(Node(f"n{i}", op, [prev], shape))
        prev = f"n{i}"
    g = Graph("x", (64,), nodes, prev)
    res = _run(g, layerwise_steps=300)
    prod, lower = _check_sandwich(g, res)
    assert res.value <= 0.8 * prod
    assert res.info["chosen"] == "optimized"


# ---------------------------------------------------------------------------------------------
# The loop recursion and the witness
# ---------------------------------------------------------------------------------------------


def test_loop_recursion_known_answer():
    # one ReLU between two layers: min(1 * n1 * P, 0.5 * n0 * P_in + 0.5 * n1 * P)
    assert loop_recursion([(0.0, 1.0)], [2.0, 3.0], [float("nan"), 4.0], 1.0) == pytest.approx(min(12.0, 1.0 + 6.0))
    # alpha = beta: linear activation, only the composed map matters
    assert loop_recursion([(2.0, 2.0)], [5.0, 100.0], [float("nan"), 1.0], 1.0) == pytest.approx(10.0)


def _tampered(res, **witness):
    return type(res)(res.method, res.value, res.layers, res.check, {**res.witness, **witness})


def test_tampered_witness_is_rejected():
    g = _mlp([8, 20, 20, 3], ReLU, seed=5, scale=1.5)
    res = _run(g)
    verify(g, res)
    plan = build_plan(g)
    cls = str(plan.tensors["d0"].cls)
    scalings = res.witness["scalings"]
    # a D entry perturbed: double the scaling of the heaviest row of S_1 W_0
    s = np.array(scalings[cls])
    row = int(np.argmax(np.linalg.norm(s[:, None] * g.node("d0").op.weight.numpy(), axis=1)))
    bad = {k: list(v) for k, v in scalings.items()}
    bad[cls][row] *= 2.0
    with pytest.raises(SoundnessError):
        verify(g, _tampered(res, scalings=bad))
    # a factor lowered by one part per million
    for name in ("d0", "d1", "d2"):
        factors = dict(res.witness["factors"])
        factors[name] *= 1 - 1e-6
        loops = {k: {**v, "norms": list(v["norms"])} for k, v in res.witness["loops"].items()}
        with pytest.raises(SoundnessError):
            verify(g, _tampered(res, factors=factors, loops=loops) if name == "d0" else _tampered(res, factors=factors))
    # a loop-transformation norm lowered
    if res.witness["loops"]:
        name, entry = next(iter(res.witness["loops"].items()))
        loops = dict(res.witness["loops"])
        loops[name] = {**entry, "norms": [entry["norms"][0] * (1 - 1e-6)] + list(entry["norms"][1:])}
        with pytest.raises(SoundnessError):
            verify(g, _tampered(res, loops=loops))
    # a non-identity output scaling
    out_cls = str(plan.tensors["d2"].cls)
    bad = {k: list(v) for k, v in scalings.items()}
    bad[out_cls] = [2.0] * len(bad[out_cls])
    with pytest.raises(SoundnessError):
        verify(g, _tampered(res, scalings=bad))


# ---------------------------------------------------------------------------------------------
# End to end on the GLipSDP MNIST CNNs (ONNX, external data, LeakyReLU, global average pooling)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn_C3_CH8", "cnn_C5_CH16"])
def test_glipsdp_mnist_cnn_certifies_with_layerwise(name):
    path = external("GLipSDP", "Scalability", "exported_mnist_models", f"{name}.onnx")
    cert = certify(path, CertifyOptions(method="layerwise", lower_starts=4, lower_budget_s=1,
                                        method_options={"layerwise_steps": 40}))
    assert cert["lower_bound"] <= cert["certified_bound"]
    # the product bound from the per-layer factors of the same graph (no second certify run)
    assert cert["methods"]["layerwise"]["value"] == cert["certified_bound"]
    assert "re-checked" in cert["verification"]["layerwise"]


@pytest.mark.regression
def test_loop_product_margin_covers_the_verifiers():
    """A claimed loop norm must include at least the product error the trusted verifier subtracts
    (a 784-512-512-10 MLP exited 3: the method's margin used u, the verifier's eps = 2u)."""
    from lipverify.bounds.layerwise import product_rounding
    from lipverify.verifier.scaled import _product_error

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 784, generator=gen, dtype=torch.float64),
               torch.randn(64, 64, generator=gen, dtype=torch.float64),
               torch.randn(10, 64, generator=gen, dtype=torch.float64)]
    s_out = torch.rand(10, generator=gen, dtype=torch.float64) + 0.5
    s_in = torch.rand(784, generator=gen, dtype=torch.float64) + 0.5
    for k in range(len(weights) - 1):
        assert product_rounding(s_out, s_in, weights[k:]) >= _product_error(s_out, s_in, weights[k:]) > 0
