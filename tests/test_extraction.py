"""Every supported operation survives export -> extraction -> self-check, and bounds stay sound."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from conftest import Residual, export_onnx, save_torchscript
from lipverify.certify import CertifyOptions, build_graph, certify
from lipverify.errors import UnsupportedOperationError, UserInputError
from lipverify.load import load_model


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Concat2(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return torch.cat([torch.tanh(self.a(x)), self.b(x)], dim=1)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


MODELS = {
    "mlp_acts": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.LeakyReLU(0.1), nn.Linear(10, 10), nn.Tanh(),
                                       nn.Linear(10, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 8),
                                       nn.Softplus(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU(),
                                       nn.Linear(8, 5)), (3, 4)),
    "gelu_tanh": (lambda: nn.Sequential(nn.Linear(6, 6), nn.GELU(approximate="tanh"), nn.Linear(6, 3)), (6,)),
    "cnn_bn_pool": (lambda: nn.Sequential(Normalize([0.5, 0.4], [0.2, 0.3]), nn.Conv2d(2, 4, 3, padding=1), _bn(4),
                                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, stride=2, padding=(1, 2)),
                                          _bn(6), nn.ReLU(), nn.AvgPool2d(2, stride=1), nn.Flatten(),
                                          nn.Linear(6 * 1 * 2, 3)), (2, 8, 8)),
    "cnn_groups_dilation": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2, dilation=2, padding=2), nn.ReLU(),
                                                  nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU(),
                                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)), (4, 7, 7)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(5 * 5, 2)), (3, 10)),
    "asym_pad": (lambda: nn.Sequential(nn.ZeroPad2d((1, 0, 2, 1)), nn.Conv2d(1, 3, 3), nn.ReLU(),
                                       nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), nn.Flatten(),
                                       nn.LazyLinear(2)), (1, 6, 6)),
    "residual": (lambda: nn.Sequential(nn.Linear(6, 6), nn.ReLU(), Residual(nn.Sequential(nn.Linear(6, 6), nn.ReLU(),
                                                                                         nn.Linear(6, 6))),
                                       nn.ReLU(), nn.Linear(6, 2)), (6,)),
    "concat": (lambda: nn.Sequential(Concat2(), nn.ReLU(), nn.Linear(7, 2)), (6,)),
    "dropout_identity": (lambda: nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.5), nn.Identity(), nn.ReLU(),
                                               nn.Linear(5, 2), nn.Softmax(dim=-1)), (5,)),
}


def _make(name):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    m = make()
    m(torch.randn((1,) + shape))  # materialize lazy layers
    return m.eval(), shape


@pytest.mark.parametrize("name", sorted(MODELS))
def test_extraction_matches_and_bounds_are_sound(name, tmp_path):
    model, shape = _make(name)
    path = export_onnx(model, shape, tmp_path / f"{name}.onnx")
    cert = certify(path, CertifyOptions(method="product", lower_starts=8, lower_budget_s=5))
    assert cert["self_check"]["worst_ratio"] <= 1.0
    assert cert["lower_bound"] <= cert["certified_bound"]
    assert cert["lower_bound"] > 0
    # the graph is the model: the IR output equals torch's on fresh inputs
    loaded = load_model(path)
    graph, _ = build_graph(loaded)
    x = torch.rand((3,) + shape)
    with torch.no_grad():
        np.testing.assert_allclose(graph.forward(x.double()).numpy(), model(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("opset", [13, 15, 17, 18, 20])
def test_opsets(opset, tmp_path):
    model, shape = _make("cnn_bn_pool")
    path = export_onnx(model, shape, tmp_path / "m.onnx", opset=opset)
    cert = certify(path, CertifyOptions(method="product", lower_starts=4, lower_budget_s=3))
    assert cert["certified_bound"] >= cert["lower_bound"] > 0


def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    model, shape = _make("mlp_acts")
    path = export_onnx(model, shape, tmp_path / "d.onnx", opset=18, dynamo=True)
    legacy = export_onnx(model, shape, tmp_path / "l.onnx")
    a = certify(path, CertifyOptions(method="product", lower_starts=4, lower_budget_s=3))
    b = certify(legacy, CertifyOptions(method="product", lower_starts=4, lower_budget_s=3))
    assert a["certified_bound"] == pytest.approx(b["certified_bound"], rel=1e-6)


def test_torchscript_equals_onnx(tmp_path):
    model, shape = _make("cnn_bn_pool")
    a = certify(export_onnx(model, shape, tmp_path / "m.onnx"), CertifyOptions(method="product", lower_starts=4))
    b = certify(save_torchscript(model, shape, tmp_path / "m.pt"),
                CertifyOptions(method="product", input_shape=shape, lower_starts=4))
    assert b["model"]["format"] == "torchscript"
    assert a["certified_bound"] == pytest.approx(b["certified_bound"], rel=1e-6)


def test_batchnorm_is_folded_into_conv(tmp_path):
    model, shape = _make("cnn_bn_pool")
    graph, _ = build_graph(load_model(export_onnx(model, shape, tmp_path / "m.onnx")))
    kinds = [n.op.kind for n in graph.nodes]
    assert "Scale" not in kinds  # the input normalization scale and both BatchNorm scales were folded
    assert kinds.count("Conv") == 2


def test_product_matches_hand_computation(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.LeakyReLU(0.2), nn.Linear(7, 3))
    path = export_onnx(model, (5,), tmp_path / "m.onnx")
    cert = certify(path, CertifyOptions(method="product", lower_starts=4))
    w1, w2 = (np.linalg.norm(l.weight.detach().double().numpy(), 2) for l in (model[0], model[2]))
    assert cert["certified_bound"] == pytest.approx(w1 * w2, rel=1e-8)
    assert cert["certified_bound"] >= w1 * w2


def test_output_selection(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    path = export_onnx(model, (4,), tmp_path / "m.onnx")
    cert = certify(path, CertifyOptions(method="product", output=1, lower_starts=4))
    w1 = np.linalg.norm(model[0].weight.detach().double().numpy(), 2)
    row = np.linalg.norm(model[2].weight.detach().double().numpy()[1])
    assert cert["certified_bound"] == pytest.approx(w1 * row, rel=1e-8)
    with pytest.raises(UserInputError, match="out of range"):
        certify(path, CertifyOptions(method="product", output=3))


def test_unsupported_op_is_named(tmp_path):
    class Square(nn.Module):
        def forward(self, x):
            return torch.floor(x) + x

    path = export_onnx(nn.Sequential(nn.Linear(3, 3), Square()), (3,), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedOperationError) as info:
        certify(path)
    assert info.value.op_type == "Floor" and info.value.node_name


def test_product_of_two_inputs_is_refused(tmp_path):
    class Bilinear(nn.Module):
        def forward(self, x):
            return x * x

    path = export_onnx(Bilinear(), (3,), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedOperationError, match="not globally Lipschitz"):
        certify(path)


def test_self_check_catches_a_wrong_extraction(tmp_path, monkeypatch):
    from lipverify.errors import ExtractionMismatchError
    from lipverify.ops.activation import ReLU

    path = export_onnx(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)), (3,), tmp_path / "m.onnx")
    monkeypatch.setattr(ReLU, "forward", lambda self, x: x)  # a deliberately wrong op
    with pytest.raises(ExtractionMismatchError, match="differs"):
        certify(path)


def test_missing_input_shape_is_a_clear_error(tmp_path):
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    path = save_torchscript(m, (1, 5, 5), tmp_path / "m.pt")
    with pytest.raises(UserInputError, match="--input-shape"):
        certify(path)
    cert = certify(path, CertifyOptions(input_shape=(1, 5, 5), lower_starts=4))
    assert cert["certified_bound"] > 0


def test_symbolic_input_dims_need_input_shape(tmp_path):
    path = export_onnx(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), (1, 6, 6), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "n"
    onnx.save(model, str(path))
    with pytest.raises(UserInputError, match="--input-shape"):
        certify(path)
    assert certify(path, CertifyOptions(input_shape=(1, 6, 6), lower_starts=4))["certified_bound"] > 0


@pytest.mark.regression
@pytest.mark.parametrize("case", ["conv_reads_only_padding", "zero_dense"])
def test_zero_layers_certify_without_false_alarm(case, tmp_path):
    """Found by the soundness campaign: an exactly-zero layer has factor 0 (inflated to 1e-300),
    whose square underflowed in the Cholesky check and raised a false soundness alarm."""
    torch.manual_seed(0)
    if case == "conv_reads_only_padding":
        model, shape = nn.Sequential(nn.Conv2d(1, 1, 1, stride=3, padding=1), nn.Flatten(), nn.Linear(4, 2)), (1, 2, 2)
    else:
        model, shape = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (3,)
        with torch.no_grad():
            model[0].weight.zero_()
    path = export_onnx(model, shape, tmp_path / "z.onnx")
    cert = certify(path, CertifyOptions(method="all", lower_starts=4, lower_budget_s=2))
    assert cert["lower_bound"] == 0.0
    assert all(0.0 <= v < 1e-100 for v in cert["bounds"].values())


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_and_pool_auto_pad(auto_pad, tmp_path):
    """Hand-written ONNX (torch never writes auto_pad): the self-check compares with onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad=auto_pad, strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], auto_pad=auto_pad, kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "auto.onnx"
    onnx.save(model, str(path))
    cert = certify(path, CertifyOptions(method="product", lower_starts=4, lower_budget_s=2))
    assert cert["self_check"]["worst_ratio"] <= 1.0
    assert 0 < cert["lower_bound"] <= cert["certified_bound"]
