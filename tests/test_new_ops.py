"""Operations added for users' models: ConvTranspose, Split, Expand, Tile, left MatMul, graphs without a
batch axis, and the extra activations. Each is checked against onnxruntime (the self-check) and its
certified factor against the exact norm of the unrolled map or a difference quotient on the file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from lipverify.certify import CertifyOptions, certify
from lipverify.graph.build import build_graph
from lipverify.load import load_model
from lipverify.verifier.conv import unrolled
from test_redteam import file_quotient, make_onnx, refused

FAST = dict(lower_starts=4, lower_budget_s=2)
RNG = np.random.default_rng(0)


def _exact_norm(op, in_shape) -> float:
    return float(torch.linalg.svdvals(unrolled(op.apply, in_shape))[0])


@pytest.mark.parametrize("nd,stride,pads,out_pad,dil,groups", [
    (2, 1, [0, 0, 0, 0], [0, 0], 1, 1),
    (2, 2, [1, 1, 1, 1], [1, 1], 1, 1),
    (2, 2, [0, 1, 2, 0], [0, 1], 1, 2),
    (2, 3, [1, 0, 0, 1], [2, 0], 2, 1),
    (1, 2, [1, 2], [1], 1, 1),
])
def test_conv_transpose_matches_onnxruntime_and_its_norm(tmp_path, nd, stride, pads, out_pad, dil, groups):
    cin, cout, k = 4, 6, 3
    w = RNG.standard_normal((cin, cout // groups) + (k,) * nd).astype(np.float32) * 0.3
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[stride] * nd, pads=pads,
                            output_padding=out_pad, dilations=[dil] * nd, group=groups)
    shape = [cin] + [5] * nd
    path = make_onnx(tmp_path / "ct.onnx", [node], {"w": w, "b": RNG.standard_normal(cout).astype(np.float32)}, shape)
    graph, check = build_graph(load_model(path))
    assert check["worst_ratio"] <= 1.0
    cert = certify(path, CertifyOptions(method="product", **FAST))
    op = next(n for n in graph.nodes if n.op.kind == "ConvTranspose")
    exact = _exact_norm(op.op, tuple(shape))
    assert exact <= cert["certified_bound"] <= exact * (1 + 1e-6)


def test_conv_transpose_large_grid_uses_the_adjoint_conv_bound(tmp_path):
    w = RNG.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    path = make_onnx(tmp_path / "ct.onnx", [node], {"w": w}, [8, 24, 24])
    cert = certify(path, CertifyOptions(method="product", **FAST))
    x = RNG.standard_normal((8, 24, 24))
    assert cert["certified_bound"] >= file_quotient(path, x, x + 0.1 * RNG.standard_normal(x.shape))
    assert cert["certified_bound"] >= cert["lower_bound"]


def test_split_into_branches(tmp_path):
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1),
             helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Mul", ["b", "three"], ["tb"]),
             helper.make_node("Concat", ["ra", "tb"], ["y"], axis=1)]
    path = make_onnx(tmp_path / "s.onnx", nodes, {"sizes": np.array([2, 3], np.int64), "three": np.float32(3.0)}, [5],
                     opset=13)
    cert = certify(path, CertifyOptions(method="product", **FAST))
    assert cert["certified_bound"] == pytest.approx(math.sqrt(1 + 9), rel=1e-9)


def test_split_equal_parts_opset18(tmp_path):
    nodes = [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Concat", ["s", "c"], ["y"], axis=1)]
    path = make_onnx(tmp_path / "s.onnx", nodes, {}, [7], opset=18)  # sizes 3, 3, 1
    cert = certify(path, CertifyOptions(method="product", **FAST))
    assert cert["model"]["output_shape"] == [4]
    assert cert["certified_bound"] >= file_quotient(path, np.zeros(7), np.ones(7))


def test_expand_and_tile(tmp_path):
    nodes = [helper.make_node("Expand", ["x", "shape"], ["e"]), helper.make_node("Tile", ["e", "reps"], ["y"])]
    path = make_onnx(tmp_path / "e.onnx", nodes, {"shape": np.array([1, 4, 3], np.int64),
                                                  "reps": np.array([1, 1, 2], np.int64)}, [1, 3])
    cert = certify(path, CertifyOptions(method="product", **FAST))
    assert cert["certified_bound"] == pytest.approx(math.sqrt(8), rel=1e-9)  # each entry copied 4 * 2 times


def test_unbatched_acas_like_graph(tmp_path):
    """ERAN's ACAS Xu style: input [5], W @ x, no batch axis."""
    w1 = RNG.standard_normal((8, 5)).astype(np.float32)
    w2 = RNG.standard_normal((5, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["w1", "x"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["w2", "r"], ["y"])]
    path = make_onnx(tmp_path / "acas.onnx", nodes, {"w1": w1, "w2": w2, "b1": np.zeros(8, np.float32)}, [5],
                     batch=None)
    cert = certify(path, CertifyOptions(method="all", **FAST))
    prod = np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2)
    assert cert["model"]["input_shape"] == [5]
    assert cert["bounds"]["product"] == pytest.approx(prod, rel=1e-6)
    assert cert["certified_bound"] >= cert["lower_bound"]
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal(5).astype(np.float32)
    y = x + np.float32(0.01)
    fx, fy = (np.asarray(s.run(None, {"x": v})[0], np.float64) for v in (x, y))
    assert cert["certified_bound"] >= np.linalg.norm(fx - fy) / np.linalg.norm(x.astype(np.float64) - y)


def test_unbatched_with_explicit_input_shape(tmp_path):
    """Input [5, 1] (a column vector): --input-shape 5,1 says there is no batch axis."""
    w = RNG.standard_normal((3, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["w", "x"], ["y"])]
    path = make_onnx(tmp_path / "col.onnx", nodes, {"w": w}, [5, 1], batch=None)
    refused(path, match="input-shape")
    cert = certify(path, CertifyOptions(method="product", input_shape=(5, 1), **FAST))
    assert cert["certified_bound"] == pytest.approx(np.linalg.norm(w, 2), rel=1e-6)


def test_unbatched_conv_with_its_own_n_axis(tmp_path):
    w = RNG.standard_normal((2, 1, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]), helper.make_node("Conv", ["u", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["y"])]
    path = make_onnx(tmp_path / "uc.onnx", nodes, {"w": w, "ax": np.array([0], np.int64)}, [1, 6, 6], batch=None)
    cert = certify(path, CertifyOptions(method="product", input_shape=(1, 6, 6), **FAST))
    assert cert["certified_bound"] >= cert["lower_bound"] > 0


@pytest.mark.parametrize("op,attrs,inits", [
    ("Clip", {}, {"lo": np.float32(-1), "hi": np.float32(2)}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, {}),
    ("HardSwish", {}, {}),
    ("Selu", {}, {}),
    ("Celu", {"alpha": 0.7}, {}),
    ("Mish", {}, {}),
    ("Softsign", {}, {}),
    ("Abs", {}, {}),
    ("PRelu", {}, {"slope": np.array([0.1, -0.5, 2.0], np.float32)}),
])
def test_extra_activations_match_the_file_and_cover_its_slopes(tmp_path, op, attrs, inits):
    ins = ["z"] + (["lo", "hi"] if op == "Clip" else ["slope"] if op == "PRelu" else [])
    nodes = [helper.make_node("Gemm", ["x", "w"], ["z"], transB=1), helper.make_node(op, ins, ["y"], **attrs)]
    path = make_onnx(tmp_path / "a.onnx", nodes, {"w": np.eye(3, dtype=np.float32), **inits}, [3], opset=18)
    graph, check = build_graph(load_model(path))
    assert check["worst_ratio"] <= 1.0
    act = next(n for n in graph.nodes if n.op.kind == "Activation").op
    a, b = act.slopes
    xs = np.linspace(-6, 6, 1201)  # steps of 0.01: float32 rounding moves a quotient by < 2e-5
    for k in range(3):  # every neuron: difference quotients of the FILE stay inside the slope interval
        pts = np.zeros((len(xs), 3))
        pts[:, k] = xs
        f = np.asarray([file_quotient_row(path, pts)])[0][:, k]
        q = np.diff(f) / np.diff(xs)
        assert q.min() >= a - 1e-4 and q.max() <= b + 1e-4, (op, k, q.min(), q.max(), a, b)
        assert q.max() >= b - 0.05 * (b - a) or op in ("Clip", "PRelu", "Softsign"), (op, q.max(), b)  # and tight


def file_quotient_row(path, pts):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, {"x": pts.astype(np.float32)})[0], dtype=np.float64)


def test_inspect_lists_every_unsupported_op_with_a_hint(tmp_path):
    from typer.testing import CliRunner

    from lipverify.cli import app

    lstm = torch.nn.LSTM(4, 3, batch_first=True)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return torch.floor(self.fc(self.lstm(x)[0][:, -1]))

    from conftest import export_onnx

    path = export_onnx(Net(), (5, 4), tmp_path / "lstm.onnx")
    r = CliRunner().invoke(app, ["inspect", str(path)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    from lipverify.certify import inspect

    info = inspect(path)
    assert not info["supported"] and len(info["onnx_nodes"]) > 5
    why = {p["op"]: p["why"] for p in info["problems"]}
    assert "recurrent" in why["LSTM"] and "rounds" in why["Floor"]
