"""onnx2torch without torchvision, plus the converters it lacks (lipverify.load.onnx2torch_compat).

Every conversion is checked against the original torch model and against onnxruntime, on a batch
size different from the one used at export (the batch axis is dynamic).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lipverify.errors import UnsupportedOperationError, UserInputError
from lipverify.load.onnx2torch_compat import convert_onnx, import_onnx2torch, torchvision_status

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
GLIPSDP = Path(__file__).resolve().parents[2] / "shared" / "external" / "GLipSDP" / "Scalability" / "exported_mnist_models"
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Small models covering the supported operations
# ---------------------------------------------------------------------------------------------


class Activations(nn.Module):
    """Flatten, Gemm, every activation (GELU exact or tanh), Dropout, Add/Sub/Mul/Div, Erf."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(16, 12), nn.Linear(12, 12), nn.Linear(12, 12)
        self.l4, self.l5 = nn.Linear(12, 12), nn.Linear(12, 5)
        self.drop = nn.Dropout(0.3)
        self.approximate = approximate

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = F.relu(self.l1(x))
        x = F.leaky_relu(self.drop(x), 0.05)
        x = torch.tanh(self.l2(x)) + torch.sigmoid(x) - F.elu(x, 0.7)
        x = F.softplus(self.l3(x)) * 0.5 + F.gelu(x, approximate=self.approximate)
        x = F.silu(self.l4(x)) / 2.0 + torch.erf(x)
        return self.l5(x)


class ConvNet(nn.Module):
    """Conv (stride, padding, dilation, groups), BatchNorm, asymmetric Pad, pooling, ReduceMean,
    Shape/Gather/Concat/Reshape, Unsqueeze/Transpose/Squeeze, Slice, Cast, residual Add."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=(1, 2), dilation=(1, 2), groups=2, bias=False)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        y = F.pad(y, (1, 0, 0, 1))
        y = self.c2(y)
        y = y + F.avg_pool2d(y, 3, stride=1, padding=1)
        g = y.mean(dim=(2, 3))
        p = F.avg_pool2d(F.max_pool2d(y, 2), 2, stride=2)
        h = torch.cat([p.reshape(p.shape[0], -1), g], dim=1)
        h = h.unsqueeze(1).transpose(1, 2).squeeze(2)
        h = h[:, : h.shape[1]]
        return self.fc(h.to(torch.float32))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm1d(5)
        self.w = nn.Parameter(torch.randn(50, 4))

    def forward(self, x):
        return torch.matmul(F.elu(self.bn(self.c(x))).flatten(1), self.w)


class GapNet(nn.Module):
    """The GLipSDP pattern: conv, LeakyReLU, global average pooling, view(batch, -1)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.pool(F.leaky_relu(self.c(x), 0.01)).view(x.size(0), -1))


CASES = {
    "activations": (lambda: Activations("none"), (2, 1, 4, 4)),
    "activations_tanh_gelu": (lambda: Activations("tanh"), (2, 16)),
    "convnet": (ConvNet, (2, 2, 8, 8)),
    "conv1d": (Conv1dNet, (2, 3, 10)),
    "gap": (GapNet, (2, 1, 7, 7)),
}
EXPORTERS = [*range(13, 22), "dynamo"]


def _export(model: nn.Module, x: torch.Tensor, exporter, **kwargs) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(
                model, (x,), dynamo=True, input_names=["input"], verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(
            model, (x,), buffer, dynamo=False, opset_version=exporter, input_names=["input"],
            dynamic_axes={"input": {0: "batch"}}, **kwargs,
        )
        return buffer.getvalue()


def _ort(blob: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("case", list(CASES))
def test_both_exporters_all_opsets_convert_and_match(case):
    make, shape = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    x_export = torch.randn(*shape)
    x = torch.randn(3, *shape[1:])  # another batch size: the batch axis must stay dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    failures = []
    for exporter in EXPORTERS:
        blob = _export(model, x_export, exporter)
        converted = convert_onnx(onnx.load_from_string(blob))
        assert not converted.training
        with torch.no_grad():
            got = converted(x).numpy()
        err_torch = float(np.abs(got - expected).max())
        err_ort = float(np.abs(got - _ort(blob, x.numpy())).max())
        if not (err_torch <= ATOL and err_ort <= ATOL):
            failures.append((exporter, err_torch, err_ort))
    assert not failures, failures


def test_new_opsets_really_use_the_new_operator_versions():
    """Guard the test above: at opset 20 GELU is the Gelu-20 op and Reshape/Flatten are new
    versions; the dynamo exporter writes Reshape with allowzero=1."""
    torch.manual_seed(0)
    model = Activations("tanh").eval()
    x = torch.randn(2, 1, 4, 4)
    legacy = onnx.load_from_string(_export(model, x, 21))
    assert "Gelu" in {n.op_type for n in legacy.graph.node}
    assert legacy.opset_import[0].version == 21
    dynamo = onnx.load_from_string(_export(GapNet().eval(), torch.randn(2, 1, 7, 7), "dynamo"))
    reshapes = [n for n in dynamo.graph.node if n.op_type == "Reshape"]
    assert reshapes and all(helper.get_node_attr_value(n, "allowzero") == 1 for n in reshapes)
    assert "ReduceMean" in {n.op_type for n in dynamo.graph.node}


def test_batchnorm_kept_in_graph_stays_in_eval_mode():
    torch.manual_seed(0)
    model = ConvNet().eval()
    blob = _export(model, torch.randn(2, 2, 8, 8), 17, training=torch.onnx.TrainingMode.PRESERVE)
    graph_ops = {n.op_type for n in onnx.load_from_string(blob).graph.node}
    assert "BatchNormalization" in graph_ops  # not folded into the Conv
    converted = convert_onnx(onnx.load_from_string(blob))
    bns = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 and not any(m.training for m in converted.modules())
    before = (bns[0].running_mean.clone(), bns[0].running_var.clone(), bns[0].num_batches_tracked.clone())
    x = torch.randn(5, 2, 8, 8) * 3 + 2  # statistics far from the running ones
    with torch.no_grad():
        got = converted(x)
        expected = model(x)
    assert torch.equal(bns[0].running_mean, before[0]) and torch.equal(bns[0].running_var, before[1])
    assert torch.equal(bns[0].num_batches_tracked, before[2])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.skipif(not GLIPSDP.is_dir(), reason="GLipSDP external models not present")
@pytest.mark.parametrize("name", ["mlp_L3_W16", "mlp_L5_W32", "mlp_L9_W64", "cnn_C3_CH8", "cnn_C5_CH16"])
def test_glipsdp_opset18_models_match_onnxruntime(name):
    path = GLIPSDP / f"{name}.onnx"
    if not path.exists() or not path.with_suffix(".onnx.data").exists():
        pytest.skip(f"{path} or its external data is absent")
    model = onnx.load(str(path))  # loads the .onnx.data beside it
    assert model.opset_import[0].version == 18
    assert "ReduceMean" in {n.op_type for n in model.graph.node} or name.startswith("mlp")
    converted = convert_onnx(model)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    with torch.no_grad():
        got = converted(torch.from_numpy(x)).numpy()
    # float32 sums over up to 28*28*16 terms: compare relative to the output scale
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL * scale)


# ---------------------------------------------------------------------------------------------
# Hand-written graphs for each added converter, checked against onnxruntime
# ---------------------------------------------------------------------------------------------


def _model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _check_against_ort(model: onnx.ModelProto, x: np.ndarray) -> torch.nn.Module:
    converted = convert_onnx(model)
    with torch.no_grad():
        got = converted(torch.from_numpy(x)).numpy()
    expected = _ort(model.SerializeToString(), x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    return converted


@pytest.mark.parametrize("axes,keepdims,noop", [([2, 3], 1, 0), ([-1], 0, 0), (None, 1, 0), (None, 0, 0), (None, 1, 1)])
def test_reduce_mean_18(axes, keepdims, noop):
    inputs = ["x"] + (["axes"] if axes is not None else [])
    node = helper.make_node("ReduceMean", inputs, ["y"], keepdims=keepdims, noop_with_empty_axes=noop)
    inits = [_i64("axes", axes)] if axes is not None else []
    model = _model([node], [_f32("x", ["n", 3, 4, 5])], [_f32("y", None)], inits, opset=18)
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)
    _check_against_ort(model, x)


@pytest.mark.parametrize("opset", [14, 19, 21])
@pytest.mark.parametrize("allowzero", [0, 1])
def test_reshape_allowzero(opset, allowzero):
    shape = [0, -1] if allowzero == 0 else [2, 0, 3]  # allowzero=1: 0 is a real (empty) size
    node = helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=allowzero)
    model = _model([node], [_f32("x", [2, 3, 4] if allowzero == 0 else [2, 0, 3])], [_f32("y", None)],
                   [_i64("s", shape)], opset=opset)
    x = np.random.default_rng(2).standard_normal((2, 3, 4) if allowzero == 0 else (2, 0, 3)).astype(np.float32)
    converted = _check_against_ort(model, x)
    assert tuple(converted(torch.from_numpy(x)).shape) == ((2, 12) if allowzero == 0 else (2, 0, 3))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_20(approximate):
    node = helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)
    model = _model([node], [_f32("x", [3, 7])], [_f32("y", None)], opset=20)
    x = np.linspace(-6, 6, 21, dtype=np.float32).reshape(3, 7)
    converted = _check_against_ort(model, x)
    assert any(isinstance(m, nn.GELU) and m.approximate == approximate for m in converted.modules())


@pytest.mark.parametrize("opset", [18, 19, 21])
def test_pad_with_axes_input(opset):
    node = helper.make_node("Pad", ["x", "p", "v", "a"], ["y"], mode="constant")
    inits = [_i64("p", [1, 0, 2, 3]), numpy_helper.from_array(np.array(0.5, np.float32), "v"), _i64("a", [-1, 2])]
    model = _model([node], [_f32("x", [2, 3, 4, 5])], [_f32("y", None)], inits, opset=opset)
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 5)).astype(np.float32)
    converted = _check_against_ort(model, x)
    assert tuple(converted(torch.from_numpy(x)).shape) == (2, 3, 4 + 0 + 3, 5 + 1 + 2)


def test_pad_18_without_axes():
    node = helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect")
    model = _model([node], [_f32("x", [1, 2, 4, 5])], [_f32("y", None)], [_i64("p", [0, 0, 1, 2, 0, 0, 2, 1])], opset=18)
    _check_against_ort(model, np.random.default_rng(4).standard_normal((1, 2, 4, 5)).astype(np.float32))


def test_average_pool_19_and_dilation_refused():
    ok = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], dilations=[1, 1])
    model = _model([ok], [_f32("x", [1, 2, 6, 6])], [_f32("y", None)], opset=19)
    _check_against_ort(model, np.random.default_rng(5).standard_normal((1, 2, 6, 6)).astype(np.float32))
    bad = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2], name="dilated_pool")
    with pytest.raises(UnsupportedOperationError, match="dilated_pool.*dilations"):
        convert_onnx(_model([bad], [_f32("x", [1, 2, 6, 6])], [_f32("y", None)], opset=19))


def test_dropout_node_in_graph_is_identity_at_inference():
    node = helper.make_node("Dropout", ["x", "r"], ["y"])
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "r")]
    for opset in (13, 22):
        model = _model([node], [_f32("x", [4, 8])], [_f32("y", None)], inits, opset=opset)
        x = np.random.default_rng(6).standard_normal((4, 8)).astype(np.float32)
        with torch.no_grad():
            got = convert_onnx(model)(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(got, x)


def test_type_only_bumps_up_to_opset_21():
    """Constant-19/21, Shape-19/21, Flatten-21, Transpose-21, Unsqueeze-21, Cast-19/21, Identity."""
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((1, 4), 2.0, np.float32))),
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Flatten", ["t"], ["f"], axis=1),
        helper.make_node("Identity", ["f"], ["i"]),
        helper.make_node("Shape", ["i"], ["s"], start=1),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["i", "c"], ["m"]),
        helper.make_node("Unsqueeze", ["sf", "ax"], ["u"]),
        helper.make_node("Add", ["m", "u"], ["y"]),
    ]
    for opset in (19, 21):
        model = _model(nodes, [_f32("x", ["n", 2, 2])], [_f32("y", None)], [_i64("ax", [0])], opset=opset)
        _check_against_ort(model, np.random.default_rng(7).standard_normal((3, 2, 2)).astype(np.float32))


def test_unsupported_operation_names_the_node():
    node = helper.make_node("Hardmax", ["x"], ["y"], name="the_hardmax")
    model = _model([node], [_f32("x", [2, 3])], [_f32("y", None)], opset=18)
    with pytest.raises(UnsupportedOperationError, match="Hardmax.*the_hardmax"):
        convert_onnx(model)


def test_unreadable_file_is_user_input_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(UserInputError, match="bad.onnx"):
        convert_onnx(bad)


def test_import_is_idempotent_and_reports_torchvision_state():
    first = import_onnx2torch()
    assert import_onnx2torch() is first
    status = torchvision_status()
    assert status == "ok" or "torchvision" in status
    stand_in = sys.modules.get("torchvision")
    assert stand_in is None or not getattr(stand_in, "__lipverify_stand_in__", False)


# ---------------------------------------------------------------------------------------------
# torchvision missing / broken / fine, each in a fresh interpreter
# ---------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    PRELUDE
    import numpy as np, onnx, torch
    from onnx import helper, TensorProto
    from lipverify.load.onnx2torch_compat import convert_onnx, torchvision_status
    node = helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = torch.linspace(-3, 3, 6).reshape(2, 3)
    assert torch.allclose(convert_onnx(model)(x), torch.nn.functional.gelu(x, approximate="tanh"))
    import onnx2torch.node_converters.roialign as ra
    print("STATUS:", torchvision_status())
    print("STAND_IN_LEFT:", getattr(sys.modules.get("torchvision"), "__lipverify_stand_in__", False))
    try:
        ra.roi_align(None, None, None)
        print("ROI: ran")
    except NotImplementedError as exc:
        print("ROI: NotImplementedError", "stand-in" in str(exc))
    except Exception as exc:
        print("ROI:", type(exc).__name__)
    """
)

_BLOCK_IMPORT = """
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
sys.meta_path.insert(0, _Block())
"""


def _run_child(prelude: str, extra_path: str = "") -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(REPO)) if p)
    code = _CHILD.replace("PRELUDE", textwrap.indent(prelude, "").strip() or "pass")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_torchvision_missing(tmp_path):
    out = _run_child(_BLOCK_IMPORT)
    assert "STATUS: torchvision is not installed" in out
    assert "STAND_IN_LEFT: False" in out
    assert "ROI: NotImplementedError True" in out


def test_torchvision_broken(tmp_path):
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import extension\n")
    (pkg / "extension.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    out = _run_child("", str(tmp_path))
    assert "STATUS: torchvision failed to import: RuntimeError: operator torchvision::nms does not exist" in out
    assert "STAND_IN_LEFT: False" in out
    assert "ROI: NotImplementedError True" in out


def test_torchvision_fine(tmp_path):
    pkg = tmp_path / "torchvision"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import ops\n")
    (pkg / "ops" / "__init__.py").write_text(
        "def nms(*a, **k):\n    return 'real nms'\n"
        "def box_convert(*a, **k):\n    return None\n"
        "def roi_align(*a, **k):\n    raise ValueError('real roi_align')\n"
    )
    out = _run_child("", str(tmp_path))
    assert "STATUS: ok" in out
    assert "ROI: ValueError" in out  # the real (here: fake but working) torchvision is used
