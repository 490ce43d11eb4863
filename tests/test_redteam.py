"""Adversarial files: one test per way a wrong "certified" number could be printed.

Each test builds a file an attacker could write and asserts that lipverify either refuses it (exit 2,
a message naming the cause) or certifies a bound at least as large as a difference quotient measured
on the FILE itself (onnxruntime), not on lipverify's extraction of it.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import FIXTURES, save_torchscript
from lipverify.certify import CertifyOptions, certify
from lipverify.cli import app
from lipverify.errors import ExtractionMismatchError, UserInputError
from lipverify.verifier.certificate import CertificateInvalid, check_certificate

runner = CliRunner()
FAST = dict(lower_starts=4, lower_budget_s=2)


# ------------------------------------------------------------------------------------------------
# helpers


def make_onnx(path, nodes, inits, in_shape, out_name="y", opset=17, in_type=TensorProto.FLOAT, batch="N"):
    dims = ([batch] if batch is not None else []) + list(in_shape)
    inp = helper.make_tensor_value_info("x", in_type, dims)
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [inp], [out],
                              [numpy_helper.from_array(np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f"
                                                       else np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def file_outputs(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0], dtype=np.float64)


def file_quotient(path, x: np.ndarray, y: np.ndarray) -> float:
    """|f(x) - f(y)| / |x - y| evaluated on the file (single-sample queries, float64 differences)."""
    fx, fy = file_outputs(path, x[None]), file_outputs(path, y[None])
    return float(np.linalg.norm((fx - fy).ravel()) / np.linalg.norm((x - y).ravel()))


def refused(path, *args, match: str) -> None:
    r = runner.invoke(app, ["certify", str(path), *map(str, args), "--lower-starts", "2"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert match.lower() in r.output.lower().replace("\n", " "), r.output


def bound_at_least(path, quotient: float, **kw) -> dict:
    cert = certify(path, CertifyOptions(method="all", **FAST, **kw))
    for name, value in cert["bounds"].items():
        assert value >= quotient * (1 - 1e-6), (name, value, quotient)
    return cert


def gemm(name, inp, out, w, b=None):
    return [helper.make_node("Gemm", [inp, f"{name}_w"] + ([f"{name}_b"] if b is not None else []), [out],
                             transB=1)], {f"{name}_w": w, **({f"{name}_b": b} if b is not None else {})}


def _gelu_nodes(z, out, prefix="g"):
    """torch's legacy GELU decomposition of tensor z."""
    return [helper.make_node("Div", [z, f"{prefix}_sqrt2"], [f"{prefix}_d"]),
            helper.make_node("Erf", [f"{prefix}_d"], [f"{prefix}_e"]),
            helper.make_node("Add", [f"{prefix}_e", f"{prefix}_one"], [f"{prefix}_a"]),
            helper.make_node("Mul", [z, f"{prefix}_a"], [f"{prefix}_m"]),
            helper.make_node("Mul", [f"{prefix}_m", f"{prefix}_half"], [out])], {
        f"{prefix}_sqrt2": np.float32(math.sqrt(2)), f"{prefix}_one": np.float32(1.0), f"{prefix}_half": np.float32(0.5)}


# ------------------------------------------------------------------------------------------------
# 1. decomposed activations recognised by sampling


def test_gelu_with_hidden_steep_where_branch(tmp_path):
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 3)) * 0.3, rng.standard_normal((2, 4)) * 0.3
    n1, i1 = gemm("l1", "x", "z", w1)
    ng, ig = _gelu_nodes("z", "gelu")
    steep = [helper.make_node("Greater", ["z", "fifty"], ["big"]),
             helper.make_node("Sub", ["z", "fifty"], ["zm"]),
             helper.make_node("Mul", ["zm", "thousand"], ["zs"]),
             helper.make_node("Add", ["zs", "fifty"], ["zb"]),
             helper.make_node("Where", ["big", "zb", "gelu"], ["h"])]
    n2, i2 = gemm("l2", "h", "y", w2)
    path = make_onnx(tmp_path / "m.onnx", n1 + ng + steep + n2, {**i1, **ig, **i2, "fifty": np.float32(50),
                                                               "thousand": np.float32(1000)}, [3])
    refused(path, match="Greater")


def test_gelu_with_mutated_constants_gets_the_slopes_of_the_file(tmp_path):
    """0.6 x (1 + erf(x / 1.2)) is not GELU; it must be bounded as what it is."""
    w1 = np.eye(3) * 1.0
    n1, i1 = gemm("l1", "x", "z", w1)
    ng, ig = _gelu_nodes("z", "y")
    ig["g_half"], ig["g_sqrt2"] = np.float32(0.6), np.float32(1.2)
    path = make_onnx(tmp_path / "m.onnx", n1 + ng, {**i1, **ig}, [3])
    # GELU'(u) peaks at 1.129; here g'(x) = 1.2 GELU'(x sqrt2 / 1.2): the peak is 1.2 * 1.129 = 1.355
    u = math.sqrt(2.0)
    x = np.array([1.2 * u / math.sqrt(2), 0, 0])
    q = file_quotient(path, x - np.array([2e-2, 0, 0]), x + np.array([2e-2, 0, 0]))  # wide: above float32 noise
    assert q > 1.35
    bound_at_least(path, q)


def test_gelu_with_nonscalar_constant_is_not_a_gelu(tmp_path):
    n1, i1 = gemm("l1", "x", "z", np.eye(3))
    ng, ig = _gelu_nodes("z", "y")
    ig["g_half"] = np.array([0.5, 0.5, 50.0], dtype=np.float32)  # one neuron scaled by 100
    path = make_onnx(tmp_path / "m.onnx", n1 + ng, {**i1, **ig}, [3])
    x = np.array([0.0, 0.0, 1.0])
    q = file_quotient(path, x - np.array([0, 0, 0.02]), x + np.array([0, 0, 0.02]))
    assert q > 100
    bound_at_least(path, q)


def test_spike_between_grid_points_is_refused(tmp_path):
    """softplus(x) + 1e-3 * relu-bump: the bump is not part of any template."""
    n1, i1 = gemm("l1", "x", "z", np.eye(2))
    nodes = [helper.make_node("Softplus", ["z"], ["sp"]),
             helper.make_node("Sub", ["z", "c"], ["zc"]),
             helper.make_node("Mul", ["zc", "k"], ["zk"]),
             helper.make_node("Tanh", ["zk"], ["t"]),
             helper.make_node("Mul", ["t", "eps"], ["bump"]),
             helper.make_node("Add", ["sp", "bump"], ["y"])]
    path = make_onnx(tmp_path / "m.onnx", n1 + nodes, {**i1, "c": np.float32(3.3), "k": np.float32(1e5),
                                                      "eps": np.float32(1e-3)}, [2])
    r = runner.invoke(app, ["certify", str(path), "--lower-starts", "2"])
    if r.exit_code == 0:  # a sum of two activations is certified as such: it must cover the bump
        cert = certify(path, CertifyOptions(**FAST))
        x = np.array([3.3, 0.0])
        q = file_quotient(path, x - [1e-5, 0], x + [1e-5, 0])
        assert cert["certified_bound"] >= q
    else:
        assert r.exit_code == 2 and "Traceback" not in r.output


def test_softplus_threshold_with_a_big_jump_is_refused(tmp_path):
    n1, i1 = gemm("l1", "x", "z", np.eye(2))
    nodes = [helper.make_node("Softplus", ["z"], ["sp"]),
             helper.make_node("Greater", ["z", "t"], ["g"]),
             helper.make_node("Where", ["g", "z", "sp"], ["y"])]
    path = make_onnx(tmp_path / "m.onnx", n1 + nodes, {**i1, "t": np.float32(2.0)}, [2])
    refused(path, match="threshold")


# ------------------------------------------------------------------------------------------------
# 2. forged certificates


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    d = tmp_path_factory.mktemp("forge")
    out = {}
    for name in ("mlp", "resmlp"):
        model = d / f"{name}.onnx"
        shutil.copy(FIXTURES / f"{name}.onnx", model)
        cert = certify(model, CertifyOptions(method="all", **FAST))
        out[name] = (model, cert)
    return d, out


def _forge(d, cert, edit):
    c = copy.deepcopy(cert)
    edit(c)
    p = d / "forged.json"
    p.write_text(json.dumps(c))
    return p


def _first_key(dct):
    return next(iter(dct))


FORGERIES = {
    "negative product factor": lambda c: c["methods"]["product"]["witness"]["factors"].update(
        {_first_key(c["methods"]["product"]["witness"]["factors"]):
         -c["methods"]["product"]["witness"]["factors"][_first_key(c["methods"]["product"]["witness"]["factors"])]}),
    "NaN product factor": lambda c: c["methods"]["product"]["witness"]["factors"].update(
        {_first_key(c["methods"]["product"]["witness"]["factors"]): float("nan")}),
    "infinite value": lambda c: c["methods"]["product"].update(value=float("inf")),
    "string factor": lambda c: c["methods"]["product"]["witness"]["factors"].update(
        {_first_key(c["methods"]["product"]["witness"]["factors"]): "1.0"}),
    "negative rslmi tau": lambda c: c["methods"]["rslmi"]["witness"]["tau"].update(
        {_first_key(c["methods"]["rslmi"]["witness"]["tau"]): -1.0}),
    "negative layerwise scaling": lambda c: c["methods"]["layerwise"]["witness"]["scalings"].update(
        {_first_key(c["methods"]["layerwise"]["witness"]["scalings"]):
         [-abs(v) for v in c["methods"]["layerwise"]["witness"]["scalings"][
             _first_key(c["methods"]["layerwise"]["witness"]["scalings"])]]}),
    "headline below its method": lambda c: c.update(certified_bound=c["certified_bound"] * 0.5),
    "headline above its method": lambda c: c.update(certified_bound=c["certified_bound"] * 2),
    "headline names another method": lambda c: c.update(method="product"),
    "value looser than its witness": lambda c: (c["methods"]["product"].update(value=c["methods"]["product"]["value"] * 3),
                                                c["bounds"].update(product=c["methods"]["product"]["value"])),
    "lower bound above the bound": lambda c: c.update(lower_bound=c["certified_bound"] * 2),
    "max-L gate flipped": lambda c: c.update(gates=[{"name": "max-L", "threshold": 1.0, "value": c["certified_bound"],
                                                    "passed": True}]),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_certificates_are_rejected(honest, forgery):
    d, certs = honest
    model, cert = certs["mlp"]
    if forgery == "headline names another method" and cert["method"] == "product":
        pytest.skip("product is the tightest here")
    path = _forge(d, cert, FORGERIES[forgery])
    with pytest.raises(CertificateInvalid):
        check_certificate(path, model)


def test_negative_loop_norms_and_block_factors_are_rejected(honest):
    d, certs = honest
    model, cert = certs["resmlp"]
    blocks = cert["methods"]["rslmi"]["witness"]["blocks"]
    if blocks:
        path = _forge(d, cert, lambda c: [b.update(factor=-abs(b["factor"])) for b in
                                          c["methods"]["rslmi"]["witness"]["blocks"].values()])
        with pytest.raises(CertificateInvalid):
            check_certificate(path, model)
    _, mlp_cert = certs["mlp"]
    loops = mlp_cert["methods"]["layerwise"]["witness"]["loops"]
    if loops:
        path = _forge(d, mlp_cert, lambda c: [e.update(norms=[-abs(v) for v in e["norms"]]) for e in
                                              c["methods"]["layerwise"]["witness"]["loops"].values()])
        with pytest.raises(CertificateInvalid):
            check_certificate(path, certs["mlp"][0])


def test_results_on_data_are_recomputed_or_flagged(tmp_path):
    model = tmp_path / "mlp.onnx"
    shutil.copy(FIXTURES / "mlp.onnx", model)
    data = tmp_path / "test.npz"
    shutil.copy(FIXTURES / "digits_test.npz", data)
    from lipverify.data import DataSpec
    from lipverify.robustness import DataOptions

    opts = CertifyOptions(method="product", **FAST,
                          data=DataOptions(DataSpec(str(data), limit=60), eps=[0.05, 0.1], attack_samples=4))
    cert = certify(model, opts)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cert))
    report = check_certificate(path, model, data_path=data)
    assert any("results on data" in s for s, _ in report.steps)
    with pytest.raises(CertificateInvalid, match="not verified"):
        check_certificate(path, model)
    assert check_certificate(path, model, ignore_data=True).unverified
    for edit in (lambda c: c["data"]["certified_accuracy"].update({k: 1.0 for k in c["data"]["certified_accuracy"]}),
                 lambda c: c["data"].update(clean_accuracy=1.0),
                 lambda c: c["data"]["L_pairwise"][0].__setitem__(1, c["data"]["L_pairwise"][0][1] / 2)):
        forged = _forge(tmp_path, cert, edit)
        with pytest.raises(CertificateInvalid):
            check_certificate(forged, model, data_path=data)
    other = tmp_path / "other.npz"
    with np.load(data) as z:
        np.savez(other, x=z["x"][::-1], y=z["y"][::-1])
    with pytest.raises(CertificateInvalid, match="sha256"):
        check_certificate(path, model, data_path=other)


# ------------------------------------------------------------------------------------------------
# 3. constants that broadcast the input to a larger shape


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_constant_operand_broadcasting_the_input(tmp_path, op):
    c = np.ones(64, dtype=np.float32)
    nodes = [helper.make_node(op, ["x", "c"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    path = make_onnx(tmp_path / "m.onnx", nodes, {"c": c}, [1])
    q = file_quotient(path, np.array([1.0]), np.array([2.0]))
    assert q == pytest.approx(8.0)
    bound_at_least(path, q)


def test_grayscale_input_normalised_with_per_channel_constants(tmp_path):
    mean = np.array([0.5, 0.4, 0.3], dtype=np.float32).reshape(3, 1, 1)
    std = np.array([0.1, 0.2, 0.25], dtype=np.float32).reshape(3, 1, 1)
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.2
    nodes = [helper.make_node("Sub", ["x", "mean"], ["s"]), helper.make_node("Div", ["s", "std"], ["n"]),
             helper.make_node("Conv", ["n", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["y"])]
    path = make_onnx(tmp_path / "m.onnx", nodes, {"mean": mean, "std": std, "w": w}, [1, 6, 6])
    x = np.random.default_rng(2).uniform(0.4, 0.6, (1, 6, 6))
    q = file_quotient(path, x, x + 1e-2 * np.random.default_rng(3).standard_normal(x.shape))
    bound_at_least(path, q)


def test_hidden_broadcast_behind_a_large_bias(tmp_path):
    """The ReLU after a large negative bias hides the broadcast from random probes; the bound must not."""
    c = np.ones(64, dtype=np.float32)
    nodes = [helper.make_node("Mul", ["x", "c"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["y"])]
    path = make_onnx(tmp_path / "m.onnx", nodes, {"c": c, "b": np.float32(-1e4)}, [1])
    q = file_quotient(path, np.array([2e4]), np.array([2e4 + 1]))
    assert q == pytest.approx(8.0)
    bound_at_least(path, q)


def test_constant_with_more_axes_than_the_data_is_refused(tmp_path):
    nodes = [helper.make_node("Mul", ["x", "c"], ["y"])]
    path = make_onnx(tmp_path / "m.onnx", nodes, {"c": np.ones((2, 1, 4), np.float32)}, [4])
    refused(path, match="batch axis")


# ------------------------------------------------------------------------------------------------
# 4. torch sources whose export differs from the module


class _Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.l(x)
        if x.abs().max() > 10:
            h = 100 * h
        return h


def test_data_dependent_control_flow_in_a_factory_module(tmp_path, monkeypatch):
    pkg = tmp_path / "rtfactory.py"
    pkg.write_text("import torch\nfrom test_redteam import _Branchy\n\ndef build():\n    return _Branchy()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(_Branchy().state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    refused(tmp_path / "w.pt", "--factory", "rtfactory:build", "--input-shape", "4", match="traced faithfully")


def test_softplus_threshold_in_torchscript_and_spec(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Softplus(beta=1.0, threshold=2.0))
    path = save_torchscript(m, (3,), tmp_path / "m.pt")
    refused(path, "--input-shape", "3", match="threshold")
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.eye(3), "fc.bias": torch.zeros(3)}, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps({
        "format": "lipverify-spec", "version": 1, "input_shape": [3],
        "layers": [{"type": "linear", "weight": "fc.weight", "bias": "fc.bias"},
                   {"type": "softplus", "threshold": 2.0}]}))
    refused(tmp_path / "s.safetensors", match="threshold")


# ------------------------------------------------------------------------------------------------
# 5. constants that depend on the batch size


def _shape_trick_nodes():
    """h = x * (B - 1)^2 + x ... computed from Shape(x)[0]: equals x at B = 1, 2... no: 1 + (B-1)(B-2)... """
    return [helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
            helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["bf", "two"], ["b2"]),
            helper.make_node("Sub", ["bf", "eight"], ["b8"]),
            helper.make_node("Mul", ["b2", "b8"], ["p"]),
            helper.make_node("Add", ["p", "one"], ["k"]),  # 1 at B = 2 and B = 8, 8 at B = 1
            helper.make_node("Mul", ["x", "k"], ["y"])], {
        "zero": np.array(0, dtype=np.int64), "two": np.float32(2), "eight": np.float32(8), "one": np.float32(1)}


def test_batch_size_used_as_a_value_is_refused(tmp_path):
    nodes, inits = _shape_trick_nodes()
    path = make_onnx(tmp_path / "m.onnx", nodes, inits, [3])
    refused(path, match="batch size")


def test_reshape_by_batch_size_is_accepted(tmp_path):
    """The usual exporter pattern Reshape(x, [Shape(x)[0], -1]) is exact."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "ax"], ["b1"]), helper.make_node("Concat", ["b1", "m1"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["f"])]
    n2, i2 = gemm("l", "f", "y", np.ones((2, 6), np.float32))
    path = make_onnx(tmp_path / "m.onnx", nodes + n2, {"zero": np.array(0, np.int64), "ax": np.array([0], np.int64),
                                                       "m1": np.array([-1], np.int64), **i2}, [2, 3])
    cert = certify(path, CertifyOptions(**FAST))
    assert cert["certified_bound"] == pytest.approx(math.sqrt(2 * 6), rel=1e-6)


def test_reshape_with_batch_size_elsewhere_is_refused(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "ax"], ["b1"]),
             helper.make_node("Concat", ["one", "b1", "m1"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["r"]), helper.make_node("Reshape", ["r", "back"], ["y"])]
    path = make_onnx(tmp_path / "m.onnx", nodes, {"zero": np.array(0, np.int64), "ax": np.array([0], np.int64),
                                                  "one": np.array([1], np.int64), "m1": np.array([-1], np.int64),
                                                  "back": np.array([-1, 6], np.int64)}, [6])
    refused(path, match="batch")


# ------------------------------------------------------------------------------------------------
# 6. non-deterministic ops


@pytest.mark.parametrize("op", ["RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Bernoulli"])
def test_random_ops_are_refused(tmp_path, op):
    if op in ("RandomUniform", "RandomNormal"):
        rnd = helper.make_node(op, [], ["r"], shape=[3], dtype=TensorProto.FLOAT)
    elif op == "Bernoulli":
        rnd = helper.make_node(op, ["p"], ["r"])
    else:
        rnd = helper.make_node(op, ["p"], ["r"], dtype=TensorProto.FLOAT)
    nodes = [rnd, helper.make_node("Mul", ["x", "r"], ["y"])]
    path = make_onnx(tmp_path / "m.onnx", nodes, {"p": np.full(3, 0.5, np.float32)}, [3])
    refused(path, match="random")


def test_dropout_in_training_mode_is_refused(tmp_path):
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["y"])]
    path = make_onnx(tmp_path / "m.onnx", nodes, {"ratio": np.float32(0.5), "train": np.array(True)}, [3])
    refused(path, match="random")


# ------------------------------------------------------------------------------------------------
# 7. quantising casts


@pytest.mark.parametrize("to", [TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32])
def test_cast_to_lower_precision_is_refused(tmp_path, to):
    n1, i1 = gemm("l1", "x", "z", np.eye(3, dtype=np.float32) * 0.1)
    nodes = [helper.make_node("Cast", ["z"], ["h"], to=to), helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    path = make_onnx(tmp_path / "m.onnx", n1 + nodes, i1, [3])
    refused(path, match="cast")


@pytest.mark.parametrize("op", ["Round", "Floor", "Ceil", "Sign"])
def test_rounding_ops_are_refused(tmp_path, op):
    path = make_onnx(tmp_path / "m.onnx", [helper.make_node(op, ["x"], ["y"])], {}, [3])
    refused(path, match=op)


# ------------------------------------------------------------------------------------------------
# 8. the self-check


def test_self_check_tolerance_is_per_output(tmp_path):
    """A constant logit of 1e6 must not widen the tolerance of the other outputs."""
    from lipverify.graph.build import build_graph
    from lipverify.load import load_model

    w = np.array([[1.0, 0.5], [0.0, 0.0]], dtype=np.float32)
    n1, i1 = gemm("l", "x", "y", w, np.array([0.0, 1e6], np.float32))
    path = make_onnx(tmp_path / "m.onnx", n1, i1, [2])
    loaded = load_model(path)
    graph, _ = build_graph(loaded)
    from lipverify.graph.check import self_check

    node = next(n for n in graph.nodes if hasattr(n.op, "weight"))
    node.op.weight = node.op.weight.clone()
    node.op.weight[0, 0] *= 1 + 1e-3  # an extraction bug of 0.1 % on the small output
    with pytest.raises(ExtractionMismatchError):
        self_check(graph, loaded.reference)


def test_self_check_probes_near_breakpoints(tmp_path):
    """An IR that differs from the model only very near a ReLU kink is caught by the breakpoint probes."""
    from lipverify.graph.check import breakpoint_probes
    from lipverify.graph.build import build_graph
    from lipverify.load import load_model

    n1, i1 = gemm("l1", "x", "z", np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    nodes = [helper.make_node("Relu", ["z"], ["r"])]
    n2, i2 = gemm("l2", "r", "y", np.ones((1, 5), np.float32))
    path = make_onnx(tmp_path / "m.onnx", n1 + nodes + n2, {**i1, **i2}, [4])
    graph, _ = build_graph(load_model(path))
    x = torch.from_numpy(breakpoint_probes(graph))
    z = graph.forward(x, keep=True)
    pre = next(n for n in graph.nodes if n.op.kind == "Activation").inputs[0]
    assert float(z[pre].abs().amin(dim=1).max()) < 1e-2


# ------------------------------------------------------------------------------------------------
# more classes found while attacking


def test_if_node_reading_the_input_from_its_branch_is_refused(tmp_path):
    then = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t_out"])], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    path = make_onnx(tmp_path / "m.onnx", nodes, {"cond": np.array(True), "k": np.float32(100.0)}, [3])
    refused(path, match="If")


def test_non_finite_constant_node_is_refused(tmp_path):
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(
        np.array([[1.0, np.inf], [0.0, 1.0]], dtype=np.float32))),
        helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    path = make_onnx(tmp_path / "m.onnx", nodes, {}, [2])
    refused(path, match="NaN")


def test_nan_activation_attribute_is_refused(tmp_path):
    path = make_onnx(tmp_path / "m.onnx", [helper.make_node("LeakyRelu", ["x"], ["y"], alpha=float("nan"))], {}, [3])
    refused(path, match="not finite")


def test_fixed_batch_constant_varying_along_batch_is_refused(tmp_path):
    path = make_onnx(tmp_path / "m.onnx", [helper.make_node("Mul", ["x", "c"], ["y"])],
                     {"c": np.array([[1.0, 1.0], [100.0, 100.0]], np.float32)}, [2], batch=2)
    refused(path, match="batch axis")


def test_float16_model_input_is_refused(tmp_path):
    path = make_onnx(tmp_path / "m.onnx", [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], {}, [3],
                     in_type=TensorProto.FLOAT16)
    refused(path, match="float32 or float64")


def test_maxpool_windows_made_of_padding_are_refused(tmp_path):
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[2, 2, 2, 2])]
    path = make_onnx(tmp_path / "m.onnx", nodes, {}, [1, 4, 4])
    refused(path, match="pad")


# ------------------------------------------------------------------------------------------------
# the adversarial generator of the soundness campaign (a short run; the full one is a benchmark)


@pytest.mark.parametrize("family", __import__("lipverify.adversarial", fromlist=["FAMILIES"]).FAMILIES)
def test_adversarial_generator_finds_no_violation(tmp_path, family):
    from lipverify.adversarial import check_case

    for seed in range(2):
        rec = check_case(seed, tmp_path, family)
        assert rec["status"] in ("certified", "refused", "checked"), rec
        assert not rec["violations"], rec


def test_radii_allow_for_the_files_rounding_inside_the_network(tmp_path):
    """a06: logits computed through a large intermediate (+1e4, Relu, -1e4) round to a 2^-10 grid, far
    coarser than the logits suggest. A sample whose true margin is 0.02 grid steps showed a file margin of
    one grid step and was certified, yet a perturbation 40x smaller than its radius flipped the file."""
    from lipverify.data import DataSpec
    from lipverify.robustness import DataOptions

    big = np.float32(1e4)
    model = tmp_path / "m.onnx"
    make_onnx(model, [helper.make_node("Gemm", ["x", "W"], ["z"], transB=1),
                      helper.make_node("Add", ["z", "big"], ["u"]),
                      helper.make_node("Relu", ["u"], ["r"]),
                      helper.make_node("Sub", ["r", "big"], ["y"])],
              {"W": np.eye(2, dtype=np.float32), "big": big}, [2])
    grid = float(np.spacing(big))
    rng = np.random.default_rng(0)
    xs = [np.eye(2, dtype=np.float32)[i % 2] + 0.01 * rng.standard_normal(2).astype(np.float32) for i in range(8)]
    ys = [i % 2 for i in range(8)]
    tricky = np.array([0.5 + 0.51 * grid, 0.5 + 0.49 * grid], np.float32)
    flipped = (tricky.astype(np.float64) + np.array([-0.02, 0.02]) * grid).astype(np.float32)
    assert file_outputs(model, tricky[None])[0].argmax() == 0 and file_outputs(model, flipped[None])[0].argmax() == 1
    data = tmp_path / "d.npz"
    np.savez(data, x=np.stack(xs + [tricky]), y=np.array(ys + [0], np.int64))
    cert = certify(model, CertifyOptions(method="product", lower_starts=2, lower_effort=0.25,
                                         data=DataOptions(spec=DataSpec(path=str(data)), eps=[1e-4])))
    assert cert["data"]["logit_tolerance"] > grid  # the allowance sees the internal magnitude 1e4
    assert cert["data"]["certified_accuracy"]["0.0001"] == 8 / 9  # the honest samples stay certified
    cert_path = tmp_path / "c.json"
    cert_path.write_text(json.dumps(cert))
    report = check_certificate(cert_path, model, data_path=data)  # check recomputes the same allowance
    assert any(step.startswith("data") for step, _ in report.steps)


def test_certificate_binds_the_spec_of_a_safetensors_file(tmp_path):
    """a14: only the weights' sha256 was recorded, so a certificate made with another spec (BatchNorm eps
    100 instead of 1e-5: a network ~70x less steep) stayed VALID. The parsed spec is now hashed."""
    model = tmp_path / "m.safetensors"
    shutil.copy(FIXTURES / "cnn_bn.safetensors", model)
    real = json.loads((FIXTURES / "cnn_bn.json").read_text())
    forged = copy.deepcopy(real)
    for layer in forged["layers"]:
        if layer["type"] == "batchnorm":
            layer["eps"] = 100.0
    (tmp_path / "real.json").write_text(json.dumps(real))
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    cert = certify(model, CertifyOptions(method="product", spec=str(tmp_path / "forged.json"), lower_starts=2,
                                         lower_effort=0.25))
    assert "spec_sha256" in cert["model"]["architecture"]
    cert_path = tmp_path / "c.json"
    cert_path.write_text(json.dumps(cert))
    check_certificate(cert_path, model, spec=str(tmp_path / "forged.json"))  # what it was made for: valid
    with pytest.raises(CertificateInvalid, match="not built the way it was certified"):
        check_certificate(cert_path, model, spec=str(tmp_path / "real.json"))
    stripped = copy.deepcopy(cert)
    del stripped["model"]["architecture"]
    cert_path.write_text(json.dumps(stripped))
    with pytest.raises(CertificateInvalid, match="does not record the model's architecture"):
        check_certificate(cert_path, model, spec=str(tmp_path / "forged.json"))


def _check_binds_factory_code(tmp_path, module: str, seed: int, sources: set, edited: str, old: str, new: str):
    """Certify a state dict built by ``module:build``; check says VALID, then INVALID once ``edited`` changes."""
    import importlib

    torch.manual_seed(seed)
    torch.save(importlib.import_module(module).build().state_dict(), tmp_path / "w.pt")
    factory = f"{module}:build"
    cert = certify(tmp_path / "w.pt", CertifyOptions(method="product", factory=factory, lower_starts=2,
                                                     lower_effort=0.25))
    assert set(cert["model"]["architecture"]["factory_sources"]) == sources
    cert_path = tmp_path / "c.json"
    cert_path.write_text(json.dumps(cert))
    check_certificate(cert_path, tmp_path / "w.pt", factory=factory)
    (tmp_path / edited).write_text((tmp_path / edited).read_text().replace(old, new))
    with pytest.raises(CertificateInvalid, match="factory_sources"):
        check_certificate(cert_path, tmp_path / "w.pt", factory=factory)


def test_certificate_binds_the_factory_code(tmp_path, monkeypatch):
    """a14: a state dict's network comes from --factory code, which was not recorded either."""
    (tmp_path / "factory_a14.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _check_binds_factory_code(tmp_path, "factory_a14", 3, {"factory_a14"}, "factory_a14.py", "Tanh", "Hardtanh")


def test_certificate_binds_helper_code_that_forward_calls(tmp_path, monkeypatch):
    """The factory's classes may be plain while forward calls a helper function of another module: its
    source is part of the network too (editing the helper between certify and check changed the network
    and the certificate stayed VALID)."""
    (tmp_path / "helper_b1.py").write_text(
        "import torch\n"
        "def squash(x):\n"
        "    return torch.tanh(x)\n")
    (tmp_path / "factory_b1.py").write_text(
        "import torch.nn as nn\n"
        "import helper_b1\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)\n"
        "    def forward(self, x):\n"
        "        return self.b(helper_b1.squash(self.a(x)))\n"
        "def build():\n"
        "    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _check_binds_factory_code(tmp_path, "factory_b1", 4, {"factory_b1", "helper_b1"}, "helper_b1.py",
                              "tanh(x)", "tanh(x) * 3")


def test_nearly_linear_activation_does_not_hang_lipsdp(tmp_path):
    """a09: LeakyRelu alpha = 0.999999 (slopes [0.999999, 1]) left the LipSDP barrier matrix numerically
    singular and the solver pushed rho off the wall by 1e-12 forever. It now stops; the certified value
    still comes from repaired, verified multipliers, and auto keeps the tightest method."""
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((8, 6)), rng.standard_normal((8, 8)), rng.standard_normal((3, 8))]
    nodes, inits, cur = [], {}, "x"
    for k, w in enumerate(ws):
        nodes.append(helper.make_node("Gemm", [cur, f"W{k}"], [f"z{k}"], transB=1))
        inits[f"W{k}"], cur = w, f"z{k}"
        if k < 2:
            nodes.append(helper.make_node("LeakyRelu", [cur], [f"a{k}"], alpha=0.999999))
            cur = f"a{k}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    model = make_onnx(tmp_path / "m.onnx", nodes, inits, [6])
    cert = certify(model, CertifyOptions(method="lipsdp-neuron", lower_starts=2, lower_effort=0.25))
    assert math.isfinite(cert["certified_bound"]) and cert["lower_bound"] <= cert["certified_bound"]


def test_check_remeasures_the_lower_bound_on_the_file(tmp_path):
    """a03: the lower bound (and so the printed tightness) was not verified: a forger could claim the
    bound is tight. check now recomputes the file's difference quotient at the stored pair."""
    cert = certify(FIXTURES / "mlp.onnx", CertifyOptions(method="product", lower_starts=2, lower_effort=0.25))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cert))
    report = check_certificate(path, FIXTURES / "mlp.onnx")
    assert any(step == "lower bound" for step, _ in report.steps)
    forged = copy.deepcopy(cert)
    forged["lower_bound"] = cert["certified_bound"] * 0.999
    forged["ratio"] = forged["lower_bound"] / cert["certified_bound"]
    path.write_text(json.dumps(forged))
    with pytest.raises(CertificateInvalid, match="difference quotient"):
        check_certificate(path, FIXTURES / "mlp.onnx")
    del forged["lower_bound_search"]["pair"]
    path.write_text(json.dumps(forged))
    with pytest.raises(CertificateInvalid, match="pair of inputs"):
        check_certificate(path, FIXTURES / "mlp.onnx")


def test_check_refuses_a_lower_bound_from_a_pair_inside_the_rounding(tmp_path):
    """A forger claims lower_bound = certified_bound (ratio 1, "tight") from a pair one float32 ulp apart:
    its raw quotient is rounding noise, far above the bound. check subtracts the rounding allowance."""
    from lipverify.attack.engine import encode

    cert = certify(FIXTURES / "mlp.onnx", CertifyOptions(method="product", lower_starts=2, lower_effort=0.25))
    # found by a random search over 2-ulp moves of one pixel: the file's raw quotient there is ~2400
    x = np.frombuffer(base64.b64decode("RI3nPhSfAD+E4yQ/wEdFPA9qOD9ebmI/qYYDP0k/cj/86+o+zybHPonVFj/1LQg+Fg98P5DuSD5e+GM+v8shPxiipT70Kc8+6nkwPU8+Gj8NtiA/UkzhPuCAHT/03I49BbdfP797TD8JcGs/Etb5Pu6PQz9tUEs/0TpXPyUHbT2UNvI+vl+1PmKGNj9sznQ/pU46P2nNaT+yuC0/CruvPrtGDj/yzCM/gv3uPsnuCT8qQ0M+94oNPCmqbj8TEvs6TihkP/Qe2T4UqvQ+So5NPhMmxj7NuCQ/un9sP7YQ7z6uMWA9gFv2O01MET8pof4896D0PogX7T7PmBA/aGbrPA=="), dtype="<f4").reshape(1, 8, 8).copy()
    y = x.copy()
    for _ in range(2):
        y[0, 7, 1] = np.nextafter(y[0, 7, 1], np.float32(1e9))
    raw = np.linalg.norm(file_outputs(FIXTURES / "mlp.onnx", y[None]) - file_outputs(FIXTURES / "mlp.onnx", x[None]))
    assert raw / np.linalg.norm(y.astype(np.float64) - x.astype(np.float64)) > 10 * cert["certified_bound"]
    forged = copy.deepcopy(cert)
    forged["lower_bound"], forged["ratio"] = cert["certified_bound"], 1.0
    forged["lower_bound_search"]["pair"] = {"x": encode(x), "y": encode(y)}
    forged["lower_bound_search"]["batch_size"] = 1
    path = tmp_path / "c.json"
    path.write_text(json.dumps(forged))
    with pytest.raises(CertificateInvalid, match="rounding-corrected difference quotient"):
        check_certificate(path, FIXTURES / "mlp.onnx")


# ------------------------------------------------------------------------------------------------
# float32 underflow and overflow inside the file (the rounding rule was relative only)


def _scale_chain(path, scales, activation=None):
    nodes, inits, cur = [], {}, "x"
    for k, s in enumerate(scales):
        inits[f"s{k}"] = np.float32(s)
        nodes.append(helper.make_node("Mul", [cur, f"s{k}"], [f"h{k}"]))
        cur = f"h{k}"
    if activation:
        nodes.append(helper.make_node(activation, [cur], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [cur], ["y"]))
    return make_onnx(path, nodes, inits, [2])


@pytest.mark.parametrize("scales, activation", [((1e-32, 1e32), None),  # y = x, computed through subnormals
                                                ((2.0**-106, 2.0**69, 2.0**69), "Tanh")])
def test_underflow_that_is_scaled_back_up_is_refused(tmp_path, scales, activation):
    """b1/b3: (x * 1e-32) * 1e32 is the identity for reals, L <= 1 was certified and check said VALID, but
    the file returns 0 at x = 7.006492e-14 and 1.4e-13 one float32 step further (quotient 2e7); with a tanh
    and data, a certified radius was broken inside it. A subnormal intermediate loses every digit."""
    path = _scale_chain(tmp_path / "under.onnx", scales, activation)
    if activation is None:
        a, b = np.array([7.006492e-14, 0], np.float32), np.array([7.0064926e-14, 0], np.float32)
        assert file_quotient(path, a, b) > 1e6
    refused(path, "--method", "product", match="float32 underflow decides this model's outputs")


def test_overflow_on_ordinary_inputs_is_refused(tmp_path):
    """b2: tanh(x * 3.4e33 * 1e-20 * 5e-19) was certified L = 1.7e-5 (VALID in check); the file's x * 3.4e33
    is inf from |x| = 1e5 on, tanh(inf) = 1, quotient 8.25 between two inputs 0.01 apart."""
    path = _scale_chain(tmp_path / "over.onnx", (3.4e33, 1e-20, 5e-19), "Tanh")
    a, b = np.array([100083.04, 0], np.float32), np.array([100083.05, 0], np.float32)
    assert file_quotient(path, a, b) > 1e4 * 1.7e-5
    refused(path, "--method", "product", match="may overflow")


def test_certificate_states_the_box_without_overflow_and_check_recomputes_it(tmp_path):
    """Overflow is possible for every network at some input, so every certified number is claimed on the box
    |x_i| <= max_abs_input on which no float32 intermediate can overflow; certify notes a small box, check
    refuses a larger claimed box or none."""
    path = _scale_chain(tmp_path / "big.onnx", (1e31,), None)  # y = 1e31 x: overflow from |x| ~ 3e7 on
    cert = certify(path, CertifyOptions(method="product", lower_starts=2, lower_effort=0.25))
    box = cert["model"]["max_abs_input"]
    assert box == 2.0 ** 17 and any("can overflow" in n for n in cert["notes"])
    assert np.isfinite(file_outputs(path, np.full((1, 2), box, np.float32))).all()
    honest = tmp_path / "c.json"
    honest.write_text(json.dumps(cert))
    check_certificate(honest, path)
    for forged_box in (box * 2, None):
        forged = copy.deepcopy(cert)
        if forged_box is None:
            del forged["model"]["max_abs_input"]
        else:
            forged["model"]["max_abs_input"] = forged_box
        honest.write_text(json.dumps(forged))
        with pytest.raises(CertificateInvalid, match="max_abs_input"):
            check_certificate(honest, path)
    fixture = certify(FIXTURES / "mlp.onnx", CertifyOptions(method="product", lower_starts=2, lower_effort=0.25))
    assert fixture["model"]["max_abs_input"] > 1e30 and not any("can overflow" in n for n in fixture["notes"])


def test_rounding_allowance_covers_subnormal_intermediates(tmp_path):
    """Where underflow is too small to be refused, the allowance still covers it: y = (x * 1e-20) * 1e20 at
    inputs whose product is subnormal, where the file is off by up to 70 %."""
    from lipverify.graph.build import build_graph
    from lipverify.graph.rounding import OutputTolerance
    from lipverify.load import load_model

    path = _scale_chain(tmp_path / "mild.onnx", (1e-20, 1e20), None)
    graph, _ = build_graph(load_model(path))
    x = np.array([[1e-25, 3e-26], [2.5e-26, -1e-27], [1e-30, 0.0], [7e-26, 7e-26]], np.float32)
    f32 = file_outputs(path, x)
    error = np.linalg.norm(f32 - x.astype(np.float64), axis=1)
    assert error.max() > 1e-27  # the file really is off
    assert (OutputTolerance(graph)(x, f32) >= error).all()


@pytest.mark.parametrize("edit", ["duplicate key", "huge integer"])
def test_malformed_certificate_numbers_are_refused_cleanly(tmp_path, edit):
    """{"certified_bound": 0.5, "certified_bound": <honest>} was VALID (Python keeps the last key, another
    reader the first); an integer like 10**400 crashed check with exit 3."""
    cert = certify(FIXTURES / "mlp.onnx", CertifyOptions(method="product", lower_starts=2, lower_effort=0.25))
    text = json.dumps(cert)
    if edit == "duplicate key":
        text = text.replace('"certified_bound": ', '"certified_bound": 0.5, "certified_bound": ', 1)
    else:
        text = text.replace(f'"certified_bound": {json.dumps(cert["certified_bound"])}',
                            '"certified_bound": 1' + "0" * 400, 1)
    path = tmp_path / "c.json"
    path.write_text(text)
    r = runner.invoke(app, ["check", str(path), str(FIXTURES / "mlp.onnx")])
    assert r.exit_code in (1, 2) and "VALID: the certificate holds" not in r.output and "Traceback" not in r.output, r.output


def test_two_versions_of_the_default_opset_are_refused(tmp_path):
    """opset_import ("", 17) and ("ai.onnx", 6) name one domain twice: lipverify read ops under 17 while
    onnxruntime ran 6 (a Clip's opset-6 attributes read as the identity; the self-check caught that one)."""
    path = make_onnx(tmp_path / "m.onnx", [helper.make_node("Relu", ["x"], ["y"])], {}, [3])
    model = onnx.load(str(path))
    model.opset_import.append(helper.make_opsetid("ai.onnx", 6))
    onnx.save(model, str(path))
    refused(path, "--method", "product", match="several opset versions")


# ------------------------------------------------------------------------------------------------
# rounding measured on the graph as the file computes it, with a factor that counts the operations


def _allowance_and_error(path, xs):
    from lipverify.graph.build import build_graph
    from lipverify.graph.rounding import OutputTolerance
    from lipverify.load import load_model

    graph, _ = build_graph(load_model(path))
    x32 = np.asarray(xs, np.float32)
    f32 = file_outputs(path, x32)
    with torch.no_grad():
        exact = graph.forward(torch.from_numpy(x32.astype(np.float64))).numpy().reshape(len(x32), -1)
    error = np.linalg.norm(f32.reshape(len(x32), -1) - exact, axis=1)
    return OutputTolerance(graph)(x32, f32), error, graph


@pytest.mark.parametrize("form", ["mul after gemm", "gemm alpha"])
def test_overflow_folded_away_by_the_rewrites_still_bounds_the_box(tmp_path, form):
    """c1: Gemm(1e30 I) -> Mul 1e-30 -> Mul 1e-9 -> Tanh folds into one Dense of norm 1e-9, so the box and the
    allowance never saw 1e30 x, which the file computes and overflows from |x| = 3.4e8 on (file 1.0 where
    tanh(1e-9 x) = 0.33; a Gemm with alpha = 1e-30 returned inf inside the claimed box of 6.6e35)."""
    if form == "gemm alpha":
        nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1, alpha=1e-30),
                 helper.make_node("Mul", ["h", "s2"], ["h3"]), helper.make_node("Tanh", ["h3"], ["y"])]
    else:
        nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Mul", ["h", "s"], ["h2"]),
                 helper.make_node("Mul", ["h2", "s2"], ["h3"]), helper.make_node("Tanh", ["h3"], ["y"])]
    path = make_onnx(tmp_path / "fold.onnx", nodes, {"w": np.eye(2) * 1e30, "s": np.float32(1e-30),
                                                     "s2": np.float32(1e-9)}, [2])
    cert = certify(path, CertifyOptions(method="product", lower_starts=2, lower_effort=0.25))
    box = cert["model"]["max_abs_input"]
    assert box < 3.4e8 and np.isfinite(file_outputs(path, np.full((1, 2), box, np.float32))).all()
    t, error, _ = _allowance_and_error(path, [[3.41e8, 0.0]])
    assert error[0] > 0.5 and not np.isfinite(t[0])  # outside the box: no allowance is claimed


def test_allowance_counts_the_terms_of_a_long_dot_product(tmp_path):
    """c2: one input 1 and 1999 inputs of 0.499 ulp(1) summed by a Gemm of ones: every addition rounds the same
    way and the file is off by 1.5e-5, twice the fixed 64 eps M allowance; two such inputs (0.499 vs
    0.501 ulp) were 32x the certified L apart. The allowance now counts the operations per output."""
    n, u = 2000, 2.0 ** -23
    path = make_onnx(tmp_path / "long.onnx", [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
                     {"w": np.ones((1, n))}, [n])
    xs = []
    for d in (0.499, 0.501):
        x = np.full(n, d * u, np.float32)
        x[0] = 1.0
        xs.append(x)
    t, error, graph = _allowance_and_error(path, xs)
    assert error.max() > 64 * 1.2e-7 * 1.0  # more than the old rule allowed
    assert (t >= error).all()
    cert = certify(path, CertifyOptions(method="product", lower_starts=2, lower_effort=0.25))
    f = file_outputs(path, np.stack(xs))
    quotient = (np.linalg.norm(f[0] - f[1]) - t.sum()) / np.linalg.norm(xs[0].astype(np.float64) - xs[1])
    assert quotient <= cert["certified_bound"]


def test_radius_of_a_function_that_is_its_own_rounding_is_zero(tmp_path):
    """c3: z = s_K - x0 - (K/64) sum(tail) is 0 for reals (gradient 0: PGD has nothing to follow), but the file's
    z is its accumulated rounding, whose sign flips when the tail entries cross half an ulp: a radius
    of 8.5e-6 was certified and broken at 2.5e-6 (check --data: VALID)."""
    from lipverify.data import DataSpec
    from lipverify.robustness import DataOptions

    K, n, u = 8, 256, 2.0 ** -23
    nodes = [helper.make_node("Slice", ["x", "st0", "en0", "ax"], ["s0"]),
             helper.make_node("Slice", ["x", "st1", "en1", "ax"], ["tail"])]
    inits = {"st0": np.array([0]), "en0": np.array([1]), "st1": np.array([1]), "en1": np.array([n + 1]),
             "ax": np.array([1]), "w": np.concatenate([[1.0], np.full(n, 1 / 64)])[None], "wr": np.full((1, n), K / 64),
             "wf": np.array([[1.0], [0.0]])}
    cur = "s0"
    for k in range(K):
        nodes += [helper.make_node("Concat", [cur, "tail"], [f"c{k}"], axis=1),
                  helper.make_node("Gemm", [f"c{k}", "w"], [f"s{k + 1}"], transB=1)]
        cur = f"s{k + 1}"
    nodes += [helper.make_node("Sub", [cur, "s0"], ["a"]), helper.make_node("Gemm", ["tail", "wr"], ["r"], transB=1),
              helper.make_node("Sub", ["a", "r"], ["z"]), helper.make_node("Gemm", ["z", "wf"], ["y"], transB=1)]
    path = make_onnx(tmp_path / "own.onnx", nodes, inits, [n + 1])
    x0 = np.full(n + 1, 64 * 0.48 * u, np.float32)
    x0[0] = 1
    x1 = x0.copy()
    x1[1:] = np.float32(64 * 0.5001 * u)
    assert file_outputs(path, x0[None]).argmax() != file_outputs(path, x1[None]).argmax()
    np.savez(tmp_path / "d.npz", x=x0[None], y=np.array([1]))
    cert = certify(path, CertifyOptions(method="product", lower_starts=2, lower_effort=0.25,
                                        data=DataOptions(DataSpec(str(tmp_path / "d.npz")), eps=[1e-6])))
    assert cert["data"]["radius_quantiles"]["median"] < np.linalg.norm(x1.astype(np.float64) - x0)


def test_allowance_covers_batchnorm_shifts_folded_in_float32(tmp_path):
    """c4: onnxruntime folds BatchNorm's shift beta - mean * scale in float32; with beta = mean * scale the exact
    shift cancels to ~0 and the allowance (m + |shift|) shrank to nothing near x = 0, while the file's constant
    is off by 4e-10 at every input (ratio 1.3e5 at x = 0)."""
    mean, var, eps = np.float32(0.01), np.float32(1.0), 1e-5
    beta = np.float32(mean / np.sqrt(np.float64(var) + np.float32(eps)))
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=eps)]
    path = make_onnx(tmp_path / "bn.onnx", nodes, {"s": [1.0, 1.0], "b": [beta, beta], "m": [mean, mean],
                                                   "v": [var, var]}, [2])
    t, error, _ = _allowance_and_error(path, [[0.0, 0.0], [1e-6, -1e-6], [1e-3, 1e-3]])
    assert error.max() > 1e-10
    assert (t >= error).all()
