"""Dense chains up to exact rewrites: each rewrite keeps the function, and LipSDP then certifies.

Covers the export patterns LipSDP used to refuse: Sub/Div input normalisation before or after a
Flatten, back-to-back linear maps, a Transpose/Reshape between layers, a final activation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import export_onnx
from lipverify.bounds import METHODS
from lipverify.certify import CertifyOptions, certify, inspect
from lipverify.graph.dense_rewrites import canonical_dense_chain, dense_chain
from lipverify.graph.ir import Graph, Node
from lipverify.ops.activation import GELU, ReLU, Sigmoid
from lipverify.ops.dense import Dense, Scale, Shift
from lipverify.ops.shape import Reshape, Transpose
from lipverify.verifier.lipsdp import dense_chain as trusted_chain

torch.set_num_threads(1)
F64 = torch.float64
FAST = dict(lower_starts=4, lower_budget_s=2)


def _chain(ops, in_shape) -> Graph:
    g = Graph("x", tuple(in_shape))
    prev, x = "x", torch.zeros((1,) + tuple(in_shape), dtype=F64)
    for i, op in enumerate(ops):
        x = op.forward(x)
        g.nodes.append(Node(f"n{i}", op, [prev], tuple(x.shape[1:]), f"node{i}"))
        prev = f"n{i}"
    g.output = prev
    return g


def _r(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


CASES = {
    # per-pixel normalisation on the image, then Flatten (ERAN MNIST style)
    "normalise-then-flatten": lambda: _chain([Shift(-_r(1, 4, 4)), Scale(1 / (_r(1, 4, 4, seed=1).abs() + 0.5)),
                                              Reshape((16,)), Dense(_r(8, 16, seed=2), _r(8, seed=3)), ReLU(),
                                              Dense(_r(3, 8, seed=4))], (1, 4, 4)),
    # Flatten first, then a (divide by 1.0) normalisation on the vector
    "flatten-then-normalise": lambda: _chain([Reshape((16,)), Shift(-_r(16)), Scale(torch.ones(16, dtype=F64)),
                                              Dense(_r(8, 16, seed=2)), ReLU(), Dense(_r(3, 8, seed=4))], (1, 4, 4)),
    # back-to-back linear maps (TLL), a transpose between layers, a final activation
    "merge-permute-final-activation": lambda: _chain([Dense(_r(8, 6), _r(8, seed=1)), ReLU(), Reshape((2, 4)),
                                                      Transpose((1, 0)), Reshape((8,)), Dense(_r(6, 8, seed=2)),
                                                      Dense(_r(5, 6, seed=3), _r(5, seed=4)), GELU(),
                                                      Reshape((5, 1))], (6,)),
    # an activation straight on the input and two activations in a row
    "activation-first": lambda: _chain([ReLU(), Dense(_r(5, 6)), Sigmoid(), ReLU(), Dense(_r(2, 5, seed=1))], (6,)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewrite_is_exact_and_matches_the_verifier(name):
    g = CASES[name]()
    canon = canonical_dense_chain(g)
    assert isinstance(canon, Graph)
    x = _r(9, *g.input_shape, seed=7) * 3
    torch.testing.assert_close(canon(x), g(x), rtol=1e-12, atol=1e-12)  # the function is unchanged
    kinds = [type(n.op).__name__ for n in canon.nodes if not isinstance(n.op, Reshape)]
    # canonical form: Dense and activations only, never two Dense in a row
    assert all(not (a == b == "Dense") for a, b in zip(kinds, kinds[1:]))
    weights, slopes = dense_chain(g)
    trusted = trusted_chain(g)
    assert len(weights) == len(trusted.weights) == len(slopes) + 1
    for w, t, m in zip(weights, trusted.weights, trusted.magnitudes):
        np.testing.assert_allclose(w, t.numpy(), rtol=1e-12, atol=1e-12)
        assert bool((m >= t.abs()).all())
    assert slopes == trusted.slopes


def test_final_activation_enters_the_lmi_as_a_hidden_layer():
    g = CASES["merge-permute-final-activation"]()
    weights, slopes = dense_chain(g)
    np.testing.assert_array_equal(weights[-1], np.eye(5))  # identity after the final GELU
    assert slopes[-1] == GELU().slopes


def test_refusal_reasons_reach_inspect(tmp_path):
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    info = inspect(export_onnx(conv, (1, 4, 4), tmp_path / "conv.onnx"))
    assert "is not a dense map" in info["methods"]["lipsdp-neuron"]
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    info = inspect(export_onnx(lin, (4,), tmp_path / "lin.onnx"))
    assert "no hidden activation" in info["methods"]["lipsdp-neuron"]


class Normalised(torch.nn.Module):
    """ERAN-style: (x - mean) / std on the image, Flatten, Linear/ReLU..., ending in a Sigmoid."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("mean", torch.rand(1, 1, 4, 4, generator=g))
        self.register_buffer("std", torch.rand(1, 1, 4, 4, generator=g) + 0.5)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.ReLU(),
                                        torch.nn.Linear(12, 12), torch.nn.Linear(12, 6), torch.nn.ReLU(),
                                        torch.nn.Linear(6, 3), torch.nn.Sigmoid())

    def forward(self, x):
        return self.body((x - self.mean) / self.std)


def test_normalised_onnx_net_certifies_with_lipsdp_and_check(tmp_path):
    from lipverify.verifier.certificate import check_certificate

    torch.manual_seed(0)
    path = export_onnx(Normalised(), (1, 4, 4), tmp_path / "norm.onnx")
    info = inspect(path)
    assert info["methods"]["lipsdp-neuron"] == "applicable"
    cert = certify(path, CertifyOptions(method="all", **FAST))
    b = cert["bounds"]
    assert b["lipsdp-neuron"] <= b["lipsdp-layer"] * (1 + 1e-7)
    assert b["lipsdp-layer"] <= b["compositional"] * (1 + 1e-7)
    assert b["compositional"] <= b["product"] * (1 + 1e-7)
    assert cert["lower_bound"] <= b["lipsdp-neuron"]
    assert cert["methods"]["lipsdp-neuron"]["solver"]["converged"] is True
    import json
    (tmp_path / "cert.json").write_text(json.dumps(cert))
    report = check_certificate(tmp_path / "cert.json", path)  # raises if a witness does not verify
    checked = [step for step, _ in report.steps]
    assert any("lipsdp-neuron" in s for s in checked) and any("compositional" in s for s in checked)


def test_auto_prefers_lipsdp_neuron_and_says_why(tmp_path):
    torch.manual_seed(0)
    path = export_onnx(Normalised(), (1, 4, 4), tmp_path / "norm.onnx")
    cert = certify(path, CertifyOptions(method="auto", **FAST))
    assert "lipsdp-neuron" in cert["bounds"] and "lipsdp-layer" not in cert["bounds"]
    assert "lipsdp-layer: lipsdp-neuron runs" in cert["method_reason"]
    assert "compositional" in METHODS
