"""The sampled lower bound: measured on the user's file, repeatable, never a false alarm."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from conftest import FIXTURES, export_onnx
from lipverify.attack import decode, lower_bound, recompute
from lipverify.attack.engine import Plan
from lipverify.attack.evaluate import FileModel
from lipverify.graph.rounding import OutputTolerance
from lipverify.certify import CertifyOptions, build_graph, certify
from lipverify.errors import SoundnessError, UserInputError
from lipverify.graph.ir import Graph, Node
from lipverify.load import load_model
from lipverify.load.model import _torch_reference
from lipverify.ops.dense import Dense
from lipverify.radii import compute_radii, pgd_inside_radius

FAST = dict(lower_starts=4)


def _ort_outputs(path, x: np.ndarray) -> np.ndarray:
    """The file's outputs, one sample per call, straight from onnxruntime (no lipverify code)."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1].astype(np.float32)})[0] for i in range(len(x))])


def test_reported_value_is_the_files_quotient_of_the_stored_pair(tmp_path):
    path = FIXTURES / "mlp.onnx"
    cert = certify(path, CertifyOptions(method="product", **FAST))
    search = cert["lower_bound_search"]
    json.dumps(search)  # the witness travels in the JSON certificate
    x, y = decode(search["pair"]["x"]), decode(search["pair"]["y"])
    assert x.dtype == np.float32 and x.shape == (1, 8, 8)
    out = _ort_outputs(path, np.stack([x, y])).astype(np.float64)
    raw = np.linalg.norm(out[0] - out[1]) / np.linalg.norm(x.astype(np.float64) - y.astype(np.float64))
    assert search["batch_size"] in (1, 2)
    if search["batch_size"] == 1:
        assert raw == pytest.approx(search["raw_quotient"], rel=1e-12)
    t_x, t_y = search["tolerance"]
    assert 0 < t_x and 0 < t_y
    expected = (search["raw_quotient"] * np.linalg.norm(x.astype(np.float64) - y.astype(np.float64)) - t_x - t_y) \
        / np.linalg.norm(x.astype(np.float64) - y.astype(np.float64))
    assert cert["lower_bound"] == pytest.approx(expected, rel=1e-12)
    assert cert["lower_bound"] <= search["raw_quotient"]
    assert 60 < cert["lower_bound"] <= cert["certified_bound"]  # the exact constant is about 65.1
    loaded = load_model(path)
    assert recompute(loaded, search) == pytest.approx(search["raw_quotient"], rel=1e-12)


def test_same_seed_same_number_bit_for_bit():
    opts = CertifyOptions(method="product", lower_starts=4, seed=3)
    a = certify(FIXTURES / "resmlp.onnx", opts)
    b = certify(FIXTURES / "resmlp.onnx", opts)
    assert a["lower_bound"] == b["lower_bound"]
    assert a["lower_bound_search"]["pair"] == b["lower_bound_search"]["pair"]
    assert a["lower_bound_search"]["evaluations"] == b["lower_bound_search"]["evaluations"]


def test_work_is_a_function_of_the_model_and_options():
    loaded = load_model(FIXTURES / "mlp.onnx")
    graph, _ = build_graph(loaded)
    p1, p10 = Plan.for_model(graph, 1.0), Plan.for_model(graph, 10.0)
    assert p10.starts == 10 * p1.starts and p10.pool == 10 * p1.pool
    assert Plan.for_model(graph, 1.0, starts=4).starts == 4
    big = Graph("x", (4096,), [Node("d", Dense(torch.zeros(4096, 4096, dtype=torch.float64)), ["x"], (4096,))], "d")
    assert Plan.for_model(big).starts < p1.starts  # a larger model gets fewer (costlier) starts


def test_time_cap_is_optional_and_reported():
    cert = certify(FIXTURES / "mlp.onnx", CertifyOptions(method="product", lower_starts=4, lower_budget_s=1e-9))
    search = cert["lower_bound_search"]
    assert search["cut_by_budget"]  # the stage that was cut
    assert any("--lower-budget-s" in n and "cut" in n for n in cert["notes"])
    assert 0 <= cert["lower_bound"] <= cert["certified_bound"]
    uncut = certify(FIXTURES / "mlp.onnx", CertifyOptions(method="product", lower_starts=4))
    assert uncut["lower_bound_search"]["cut_by_budget"] is None
    with pytest.raises(UserInputError, match="lower-effort"):
        certify(FIXTURES / "mlp.onnx", CertifyOptions(lower_effort=0))


class SteepBump(nn.Module):
    """W x, plus a ramp of slope 1000 on x_0 > 3 (added to every output) that an extraction could miss."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.float())

    def forward(self, x):
        out = x @ self.weight.T
        return out + 1000.0 * torch.relu(x[:, :1] - 3.0)


def _linear_graph(weight: torch.Tensor) -> Graph:
    n_out, n_in = weight.shape
    return Graph("x", (n_in,), [Node("y", Dense(weight.double()), ["x"], (n_out,))], "y")


def test_a_file_steeper_than_its_graph_gets_the_files_lower_bound():
    torch.manual_seed(0)
    weight = torch.randn(3, 6) / 3
    module = SteepBump(weight).eval()
    loaded = SimpleNamespace(reference=_torch_reference(module), torch_module=None)
    graph = _linear_graph(weight)  # the "extraction" lost the ramp
    lb = lower_bound(loaded, graph, seed=0, starts=4)
    # the file's slope there (||W + 1000 * 1 e_0^T|| ~ 1000 sqrt 3), not the graph's ||W|| (about 1)
    assert lb.value > 1500
    assert lb.value > 100 * float(torch.linalg.matrix_norm(weight.double(), 2))
    out = np.asarray(loaded.reference(np.stack([lb.x, lb.y])), dtype=np.float64)
    raw = np.linalg.norm(out[0] - out[1]) / np.linalg.norm(lb.x.astype(np.float64) - lb.y.astype(np.float64))
    assert lb.value <= raw <= 1000 * math.sqrt(3) + 10


def test_certify_fails_loudly_when_the_file_is_steeper_than_the_graph(monkeypatch, tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(3, 6) / 3
    path = tmp_path / "bump.onnx"
    export_onnx(SteepBump(weight), (6,), path)
    honest_looking = _linear_graph(weight)
    monkeypatch.setattr("lipverify.certify.build_graph", lambda loaded: (honest_looking, {}))
    with pytest.raises(SoundnessError, match="lower bound"):
        certify(path, CertifyOptions(method="product", **FAST))


@pytest.mark.parametrize("bias", [0.0, 1e4])
def test_no_false_alarm_on_a_linear_layer_at_its_exact_constant(bias, tmp_path):
    torch.manual_seed(1)
    model = nn.Linear(12, 5)
    with torch.no_grad():
        model.bias.fill_(bias)  # large outputs: float32 rounding is large next to the differences
    path = export_onnx(model, (12,), tmp_path / "lin.onnx")
    exact = float(torch.linalg.matrix_norm(model.weight.detach().double(), 2))
    cert = certify(path, CertifyOptions(method="product", **FAST))
    assert cert["lower_bound"] <= cert["certified_bound"]
    assert cert["certified_bound"] == pytest.approx(exact, rel=1e-5)
    assert cert["lower_bound"] >= exact * (0.999 if bias == 0 else 0.99)


def test_no_false_alarm_on_a_relu_net_at_its_exact_constant(tmp_path):
    # f(x) = diag(3, 1, 1, 1) relu(x): Lip = 3 (x_0 > 0), and the product of norms is exactly 3
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[2].weight.copy_(torch.diag(torch.tensor([3.0, 1.0, 1.0, 1.0])))
    path = export_onnx(model, (4,), tmp_path / "relu.onnx")
    cert = certify(path, CertifyOptions(method="all", **FAST))
    assert all(cert["lower_bound"] <= v for v in cert["bounds"].values())
    assert cert["lower_bound"] >= 3 * 0.999


def test_fixed_batch_file_and_torch_source(tmp_path):
    """A file with a fixed batch size of 1 (like the VNN-COMP networks) and a TorchScript source
    (the torch module also proposes points)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    path = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 5),), str(path), dynamo=False, opset_version=17)
    cert = certify(path, CertifyOptions(method="product", **FAST))
    assert 0 < cert["lower_bound"] <= cert["certified_bound"]
    ts = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.randn(2, 5)), str(ts))
    cert_ts = certify(ts, CertifyOptions(method="product", input_shape=(5,), **FAST))
    assert "gradient ascent on the torch module" in cert_ts["lower_bound_search"]["stage_seconds"]
    assert cert_ts["lower_bound"] == pytest.approx(cert["lower_bound"], rel=0.05)


def test_rounding_allowance_covers_float32_error():
    """t(x) bounds the distance between the file's float32 outputs and the exact (float64) function."""
    loaded = load_model(FIXTURES / "cnn_bn.onnx")
    graph, _ = build_graph(loaded)
    rng = np.random.default_rng(0)
    x = np.concatenate([s * rng.standard_normal((8, 1, 8, 8)) for s in (1e-3, 1.0, 1e3)]).astype(np.float32)
    f32 = FileModel(loaded.reference, graph.input_shape)(x)
    t = OutputTolerance(graph)(x, f32)
    with torch.no_grad():
        exact = graph.forward(torch.from_numpy(x.astype(np.float64))).numpy().reshape(len(x), -1)
    assert np.all(np.linalg.norm(f32 - exact, axis=1) <= t)
    assert np.all(t <= 1e-3 * (1 + np.abs(f32).max(axis=1)))  # and is not uselessly large


def test_radius_check_is_decided_by_the_file():
    torch.manual_seed(0)
    W = torch.randn(3, 6, dtype=torch.float64)
    x = torch.randn(20, 6, dtype=torch.float64)
    f = (x @ W.T).numpy()
    y = f.argmax(axis=1)
    L = float(torch.linalg.matrix_norm(W, 2))
    r = compute_radii(f, y, L, None, [])
    graph_fn = lambda z: z @ W.T  # noqa: E731
    honest = lambda z: np.asarray(z, np.float64).reshape(len(z), -1) @ W.numpy().T  # noqa: E731
    assert not pgd_inside_radius(graph_fn, x, torch.from_numpy(y), r.radius, judge=honest, judge_tol=1e-6).any()

    def lying_file(z):  # predicts class (y + 1) % 3 as soon as the input moves at all
        z = np.asarray(z, np.float64).reshape(len(z), -1)
        out = z @ W.numpy().T
        moved = np.linalg.norm(z - x.numpy().astype(np.float32), axis=1) > 1e-6
        out[moved, (y[moved] + 1) % 3] += 1e3
        return out

    assert not pgd_inside_radius(graph_fn, x, torch.from_numpy(y), r.radius).any()  # the graph sees nothing
    assert pgd_inside_radius(graph_fn, x, torch.from_numpy(y), r.radius, judge=lying_file).all()


def test_cli_options(tmp_path):
    from typer.testing import CliRunner

    from lipverify.cli import app

    out = tmp_path / "c.json"
    r = CliRunner().invoke(app, ["certify", str(FIXTURES / "mlp.onnx"), "--method", "product", "--lower-starts", "2",
                                 "--lower-effort", "0.5", "--json", str(out), "-q"])
    assert r.exit_code == 0, r.output
    cert = json.loads(out.read_text())
    assert cert["lower_bound_search"]["plan"]["starts"] == 1
    bad = CliRunner().invoke(app, ["certify", str(FIXTURES / "mlp.onnx"), "--lower-effort", "-1", "-q"])
    assert bad.exit_code == 2 and "lower-effort" in bad.output
    assert math.isfinite(cert["lower_bound"])


@pytest.mark.parametrize("name", ["cnn_bn", "resmlp"])
def test_magnitude_pass_streams_in_chunks_without_changing_a_value(monkeypatch, name):
    """The magnitude pass (rounding allowance of the lower bound, the self-check and the radii) runs in
    chunks of samples sized by the graph's widest layer, dropping each tensor after its last use: the
    whole-batch pass kept every layer and took 23 GB on a 5-conv MNIST CNN. Chunks change no value."""
    from lipverify.graph import check

    graph, _ = build_graph(load_model(FIXTURES / f"{name}.onnx"))
    x = torch.randn((37,) + tuple(graph.input_shape), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    whole = check.magnitudes(graph, x)
    assert check.samples_per_chunk(graph) >= 37
    monkeypatch.setattr(check, "CHUNK_BYTES", 1)  # one sample per chunk
    assert check.samples_per_chunk(graph) == 1
    torch.testing.assert_close(check.magnitudes(graph, x), whole, rtol=1e-13, atol=0)
    assert torch.all(whole >= graph.forward(x).abs() * (1 - 1e-12))  # M bounds the output itself
