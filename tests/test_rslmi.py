"""RS-LMI (method "rslmi"): sketched estimates stay estimates, certified taus are true bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import external, graph_as_file
import lipverify.bounds.rslmi  # noqa: F401  (registers the method and its verifier)
from lipverify.attack import lower_bound
from lipverify.bounds import METHODS, BoundContext
from lipverify.bounds.sketch import linear_map, power_sigma, sketched_tau
from lipverify.certify import CertifyOptions, certify
from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph, Node
from lipverify.norms.conv import conv_norm_exact
from lipverify.ops.activation import ReLU
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense
from lipverify.ops.merge import Add, Sub
from lipverify.ops.pool import AvgPool
from lipverify.ops.shape import Reshape
from lipverify.verifier import verify

torch.set_num_threads(1)
F64 = torch.float64


def _dense(out, inp, gen, scale=1.0):
    return Dense(torch.randn(out, inp, generator=gen, dtype=F64) * scale / math.sqrt(inp),
                 torch.randn(out, generator=gen, dtype=F64))


def _chain(input_shape, ops) -> Graph:
    """A chain graph from (op, out_shape) pairs."""
    nodes, prev = [], "x"
    for i, (op, shape) in enumerate(ops):
        nodes.append(Node(f"n{i}", op, [prev], tuple(shape)))
        prev = f"n{i}"
    return Graph("x", tuple(input_shape), nodes, prev)


def _run(graph, method="rslmi", **options):
    return METHODS[method].run(graph, BoundContext(options=options))


# ---------------------------------------------------------------------------------------------
# The sketch itself is an under-estimate (Rayleigh-Ritz), exact when it spans the space
# ---------------------------------------------------------------------------------------------


def test_sketch_is_a_lower_estimate_and_exact_with_full_rank_sketch():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 60, generator=gen, dtype=F64)
    exact = float(torch.linalg.svdvals(w)[0]) ** 2
    op = Dense(w)
    full = sketched_tau(linear_map(op, (60,), (40,)), sketch_dim=60, iters=0)
    assert full.tau_hat == pytest.approx(exact, rel=1e-10)
    for m in (1, 4, 16):
        for q in (0, 1, 3):
            est = sketched_tau(linear_map(op, (60,), (40,)), sketch_dim=m, iters=q, seed=m)
            assert est.tau_hat <= exact * (1 + 1e-12)
    # block power iterations converge towards the true norm
    assert sketched_tau(linear_map(op, (60,), (40,)), sketch_dim=8, iters=6).tau_hat >= 0.99 * exact


def test_power_sigma_is_below_the_norm_and_differentiable():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(30, 20, generator=gen, dtype=F64, requires_grad=True)
    v = torch.randn(1, 20, generator=gen, dtype=F64)
    sigma, v = power_sigma(lambda x: x @ w.detach().T, lambda y: y @ w.detach(), v / v.norm(), steps=50)
    true = float(torch.linalg.svdvals(w.detach())[0])
    assert float(sigma) <= true * (1 + 1e-12)
    assert float(sigma) == pytest.approx(true, rel=1e-6)
    (v @ w.T).norm().backward()
    assert w.grad is not None and float(w.grad.norm()) > 0


# ---------------------------------------------------------------------------------------------
# Certified tau_k >= exact ||W_k||^2; tau_hat is carried but never certified
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_tau_at_least_exact_norm_squared(seed):
    gen = torch.Generator().manual_seed(seed)
    widths = [7, 33, 5, 64, 3]
    ops = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        ops.append((_dense(b, a, gen, scale=1 + seed), (b,)))
        if i < len(widths) - 2:
            ops.append((ReLU(), (b,)))
    g = _chain((widths[0],), ops)
    res = _run(g, sketch_dim=4)  # a small sketch: tau_hat may be well below the norm
    dense_rows = [r for r in res.layers if r.op.startswith("Dense")]
    assert len(dense_rows) == 4
    for row, node in zip(dense_rows, [n for n in g.nodes if isinstance(n.op, Dense)]):
        exact = float(np.linalg.norm(node.op.weight.numpy(), 2)) ** 2
        assert row.tau >= exact
        assert res.witness["tau"][node.name] >= exact
        assert row.extra["tau_hat"] <= exact * (1 + 1e-9)  # the sketch under-estimates
        assert "not certified" in row.extra["tau_hat_is"]
        assert row.extra["tau_certified"] == pytest.approx(row.tau)
    assert res.value >= _run(g, "product").value * (1 - 1e-12)
    verify(g, res)


CONV_CASES = [
    # (in_shape, weight shape, stride, pads, dilation, groups)
    ((3, 9, 9), (4, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((4, 10, 8), (6, 2, 3, 3), (2, 2), (1, 0, 2, 1), (1, 1), 2),
    ((2, 11, 11), (3, 2, 3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    ((3, 16), (5, 3, 4), (3,), (0, 2), (1,), 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_tau_at_least_exact_norm_squared(case):
    in_shape, wshape, stride, pads, dil, groups = case
    gen = torch.Generator().manual_seed(len(wshape) + wshape[0])
    w = torch.randn(wshape, generator=gen, dtype=F64)
    op = Conv(w, None, stride, pads, dil, groups)
    out_shape = tuple(op.apply(torch.zeros((1,) + in_shape, dtype=F64)).shape[1:])
    g = _chain(in_shape, [(op, out_shape)])
    res = _run(g, sketch_dim=3)
    exact = conv_norm_exact(w, in_shape, stride, pads, dil, groups) ** 2
    row = res.layers[0]
    assert row.tau >= exact
    assert row.extra["tau_hat"] <= exact * (1 + 1e-9)
    verify(g, res)


def test_large_conv_uses_the_fft_bound_with_the_sketch_as_floor():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 16, 3, 3, generator=gen, dtype=F64) / 12
    op = Conv(w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    g = _chain((16, 24, 24), [(op, (16, 24, 24))])  # 9216 x 9216: beyond the unrolled path
    res = _run(g, sketch_dim=8)
    row = res.layers[0]
    assert "FFT" in row.how
    from lipverify.norms.conv import conv_power_iteration

    lower = conv_power_iteration(w, (16, 24, 24), (1, 1), (1, 1, 1, 1), (1, 1), 1, iters=200)
    assert row.factor >= lower
    assert row.extra["tau_hat"] <= row.tau
    assert row.factor <= 1.01 * lower  # FFT/Gram is tight on this grid
    verify(g, res)


def test_avgpool_and_reshape_are_sketched_and_certified():
    op = AvgPool((3, 3), (2, 2), (1, 1, 1, 1), count_include_pad=False)
    g = _chain((2, 7, 7), [(op, (2, 4, 4)), (Reshape((32,)), (32,))])
    res = _run(g)
    pool = res.layers[0]
    assert "tau_hat" in pool.extra and pool.tau >= pool.extra["tau_hat"]
    assert pool.factor >= op.factor((2, 7, 7)).lower
    verify(g, res)


# ---------------------------------------------------------------------------------------------
# Tampered witnesses are rejected
# ---------------------------------------------------------------------------------------------


def test_tau_lowered_by_one_part_per_million_is_rejected():
    gen = torch.Generator().manual_seed(5)
    g = _chain((12,), [(_dense(20, 12, gen), (20,)), (ReLU(), (20,)), (_dense(4, 20, gen), (4,))])
    res = _run(g)
    verify(g, res)
    for name in ("n0", "n2"):
        bad = {**res.witness, "tau": dict(res.witness["tau"])}
        exact = float(torch.linalg.svdvals(g.node(name).op.weight)[0]) ** 2
        bad["tau"][name] = exact * (1 - 1e-6)
        tampered = type(res)(res.method, res.value, res.layers, res.check, bad)
        with pytest.raises(SoundnessError):
            verify(g, tampered)
    # a tau replaced by its sketched estimate is rejected too (a sketch is not a certificate)
    small = _run(g, sketch_dim=1, sketch_iters=0)
    bad = {**small.witness, "tau": dict(small.witness["tau"])}
    bad["tau"]["n0"] = small.info["tau_hat"]["n0"]
    assert bad["tau"]["n0"] < small.witness["tau"]["n0"]
    with pytest.raises(SoundnessError):
        verify(g, type(res)(res.method, res.value, res.layers, res.check, bad))
    # and so is a value below what the taus give
    with pytest.raises(SoundnessError):
        verify(g, type(res)(res.method, res.value * (1 - 1e-6), res.layers, res.check, res.witness))


# ---------------------------------------------------------------------------------------------
# Residual blocks
# ---------------------------------------------------------------------------------------------


def _residual_linear(n=10, seed=0, merge=Add):
    gen = torch.Generator().manual_seed(seed)
    inner = _dense(n, n, gen, scale=1.5)
    nodes = [Node("h", _dense(n, n, gen), ["x"], (n,)),
             Node("b", inner, ["h"], (n,)),
             Node("r", merge(), ["h", "b"], (n,)),
             Node("a", ReLU(), ["r"], (n,)),
             Node("y", _dense(3, n, gen), ["a"], (3,))]
    return Graph("x", (n,), nodes, "y")


@pytest.mark.parametrize("merge", [Add, Sub])
def test_linear_residual_block_bounded_by_norm_of_identity_plus_branch(merge):
    g = _residual_linear(merge=merge)
    res = _run(g)
    blocks = res.witness["blocks"]
    assert list(blocks) == ["r"]
    w = g.node("b").op.weight
    sign = -1.0 if merge is Sub else 1.0
    exact = float(torch.linalg.svdvals(torch.eye(10, dtype=F64) + sign * w)[0])
    assert exact <= blocks["r"]["factor"] <= exact * (1 + 1e-9)
    assert blocks["r"]["factor"] < 1 + float(torch.linalg.svdvals(w)[0])
    prod = _run(g, "product").value
    assert res.value < prod
    lb = lower_bound(graph_as_file(g), g, starts=8, seed=0, effort=0.25)
    assert lb.value <= res.value
    verify(g, res)
    bad = {**res.witness, "blocks": {"r": {**blocks["r"], "factor": exact * (1 - 1e-6)}}}
    with pytest.raises(SoundnessError):
        verify(g, type(res)(res.method, res.value, res.layers, res.check, bad))


def test_nonlinear_residual_cnn_bound_above_sampled_lower_bound():
    gen = torch.Generator().manual_seed(7)
    c1 = Conv(torch.randn(4, 2, 3, 3, generator=gen, dtype=F64) / 4, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    c2 = Conv(torch.randn(4, 4, 3, 3, generator=gen, dtype=F64) / 6, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    c3 = Conv(torch.randn(4, 4, 3, 3, generator=gen, dtype=F64) / 6, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    nodes = [Node("c1", c1, ["x"], (4, 6, 6)), Node("r1", ReLU(), ["c1"], (4, 6, 6)),
             Node("c2", c2, ["r1"], (4, 6, 6)), Node("r2", ReLU(), ["c2"], (4, 6, 6)),
             Node("c3", c3, ["r2"], (4, 6, 6)), Node("add", Add(), ["c3", "r1"], (4, 6, 6)),
             Node("flat", Reshape((144,)), ["add"], (144,)), Node("y", _dense(5, 144, gen), ["flat"], (5,))]
    g = Graph("x", (2, 6, 6), nodes, "y")
    res = _run(g)
    assert res.witness["blocks"] == {}  # nonlinear branch: 1 + Lip(branch)
    assert res.value == pytest.approx(_run(g, "product").value, rel=1e-9)
    lb = lower_bound(graph_as_file(g), g, starts=8, seed=1, effort=0.25)
    assert 0 < lb.value <= res.value
    verify(g, res)


# ---------------------------------------------------------------------------------------------
# End to end on the GLipSDP MNIST CNNs (ONNX, external data)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn_C3_CH8", "cnn_C5_CH16"])
def test_glipsdp_mnist_cnn_certifies_with_rslmi(name):
    path = external("GLipSDP", "Scalability", "exported_mnist_models", f"{name}.onnx")
    cert = certify(path, CertifyOptions(method="rslmi", lower_starts=4, lower_budget_s=1))
    assert cert["method"] == "rslmi"
    assert cert["lower_bound"] <= cert["certified_bound"]
    assert "Cholesky" in cert["verification"]["rslmi"]
    for layer in cert["layers"]:
        if "tau_hat" in layer:
            assert layer["tau_hat"] <= layer["tau"]
