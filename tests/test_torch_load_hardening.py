"""Torch sources whose export would differ from the module, and ONNX graphs with several outputs.

Red-team findings a07 (factory modules that silence tracer warnings or branch on being traced,
stateful TorchScript) and a19 (only graph output 0 certified, silently). Each test builds what an
attacker could hand in and asserts a refusal naming the cause, or a bound at least the quotient
measured on the file; honest modules that use the same APIs harmlessly still load.
"""

import json
import random
import time
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from lipverify.certify import CertifyOptions, certify
from lipverify.cli import app
from lipverify.errors import UnsupportedModelError, UserInputError
from lipverify.load import load_model
from lipverify.load.model import torch_to_onnx
from lipverify.verifier.certificate import CertificateInvalid, check_certificate

runner = CliRunner()
FAST = dict(lower_starts=2, lower_budget_s=1)
BIG = 1e5  # the attacks switch on beyond every probe of the self-check


class Dense(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = torch.nn.Linear(4, 4)


def refused(module, match: str, shape=(4,)):
    with pytest.raises(UnsupportedModelError, match=match):
        torch_to_onnx(module.eval(), shape)


# ------------------------------------------------------------------------------------------------
# data-dependent Python control flow, whatever the warnings filters say


class Silenced(Dense):
    def forward(self, x):
        h = self.l(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            big = bool(x.abs().max() > BIG)
        return 1000 * h if big else h


class Swallowed(Dense):  # the refusal is not an exception the forward could catch
    def forward(self, x):
        h = self.l(x)
        try:
            big = float(x.norm()) > BIG
        except BaseException:
            big = False
        return 1000 * h if big else h


class ReadsNumpy(Dense):
    def forward(self, x):
        h = self.l(x)
        return 1000 * h if x.detach().numpy().max() > BIG else h


class ReadsList(Dense):
    def forward(self, x):
        h = self.l(x)
        return 1000 * h if max(x.data.reshape(-1).tolist()) > BIG else h


class ReadsShape(Dense):  # no number is read: the shape of a boolean mask is
    def forward(self, x):
        h = self.l(x)
        return 1000 * h if x[x.abs() > BIG].shape[0] > 0 else h


@pytest.mark.parametrize("cls", [Silenced, Swallowed, ReadsNumpy, ReadsList, ReadsShape])
def test_python_reads_of_input_values_are_refused_without_warnings(cls):
    torch._C._jit_set_tracer_state_warn(False)  # even with the tracer's own warnings off
    try:
        refused(cls(), "traced faithfully")
    finally:
        torch._C._jit_set_tracer_state_warn(True)


# ------------------------------------------------------------------------------------------------
# forward that behaves differently when traced


class Guarded(Dense):  # a07 (b): the data read happens only outside tracing
    def forward(self, x):
        h = self.l(x)
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            if x.abs().max() > BIG:
                return 1000 * h
        return h


class DuringExport(Dense):
    def forward(self, x):
        h = self.l(x)
        return h if torch.onnx.is_in_onnx_export() else 2 * h


class TellsByShapeType(Dense):  # no tracing API at all: under tracing, sizes are tensors
    def forward(self, x):
        h = self.l(x)
        return h if isinstance(x.shape[0], torch.Tensor) else h * 1.5


class BranchOnBatch(Dense):  # the trace runs at batch 2; single-sample queries take the other branch
    def forward(self, x):
        h = self.l(x)
        return 1000 * h if x.shape[0] == 1 else h


class SilencedBatchBranch(Dense):  # the tracer's warning about the size is the signal: it may not be silenced
    def forward(self, x):
        h = self.l(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            single = x.shape[0] == 1
        return 1000 * h if single else h


@pytest.mark.parametrize("cls, match", [(Guarded, "traced faithfully"), (DuringExport, "ONNX export"),
                                        (TellsByShapeType, "tracing"), (BranchOnBatch, "traced faithfully"),
                                        (SilencedBatchBranch, "catch_warnings")])
def test_forward_that_tells_tracing_apart_is_refused(cls, match):
    refused(cls(), match)


class HarmlessQueries(Dense):  # timm/torchvision style: the queries do not change what is computed
    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.arange(4.0))

    def forward(self, x):
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            assert x.dim() == 2
        h = self.l(x.view(x.size(0), -1))
        return torch.relu(h)[:, [3, 2, 1, 0]] + self.offset * 0.5


def test_honest_forward_using_the_same_apis_loads_and_matches():
    m = HarmlessQueries().eval()
    model, code_modules = torch_to_onnx(m, (4,))
    assert code_modules == (__name__,)  # forward's own code is part of what a certificate binds
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, m(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# state, randomness, clocks, escape hatches


class AttributeCounter(Dense):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.l(x) * (1000 if self.calls > 12 else 1)


COUNT = [0]


class GlobalCounter(Dense):
    def forward(self, x):
        COUNT[0] += 1
        return self.l(x) * (1000 if COUNT[0] > 12 else 1)


class _Tally:
    calls = 0


TALLY = _Tally()


class ObjectCounter(Dense):
    def forward(self, x):
        TALLY.calls += 1
        return self.l(x) * (1000 if TALLY.calls > 50 else 1)


class MutatesWeight(Dense):
    def forward(self, x):
        self.l.weight.data.mul_(1.5)
        return self.l(x)


class TorchRandom(Dense):
    def forward(self, x):
        return self.l(x) + torch.rand(4)


class PythonRandom(Dense):
    def forward(self, x):
        return self.l(x) * (1 + random.random())


class Clock(Dense):
    def forward(self, x):
        return self.l(x) * (1000 if time.time() > 4e9 else 1)


class DisablesTheWatch(Dense):
    def forward(self, x):
        h = self.l(x)
        with torch._C._DisableTorchDispatch():
            big = bool(x.abs().max() > BIG)
        return 1000 * h if big else h


class Tuple(Dense):
    def forward(self, x):
        return self.l(x), 1000 * x


@pytest.mark.parametrize("cls, match", [
    (AttributeCounter, "changed the module's state"), (GlobalCounter, "global 'COUNT'"),
    (ObjectCounter, "global 'TALLY'"),
    (MutatesWeight, "in place"), (TorchRandom, "random"), (PythonRandom, "random"), (Clock, "clock"),
    (DisablesTheWatch, "_DisableTorchDispatch"), (Tuple, "one tensor")])
def test_stateful_random_and_escaping_forwards_are_refused(cls, match):
    refused(cls(), match)


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 1000 * x

    @staticmethod
    def symbolic(g, x):
        return g.op("Identity", x)


class CustomFunction(Dense):
    def forward(self, x):
        return _Scale.apply(self.l(x))


def _routed(x):  # a model function that torch hands to the recorder as one call, hiding what it does
    if torch.overrides.has_torch_function((x,)):
        return torch.overrides.handle_torch_function(_routed, (x,), x)
    return x if torch.jit.is_tracing() else 1000 * x


class RoutedFunction(Dense):
    def forward(self, x):
        return _routed(self.l(x))


class LoudTensor(torch.Tensor):
    pass


class SubclassWeight(Dense):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(4).as_subclass(LoudTensor), requires_grad=False)

    def forward(self, x):
        return self.l(x) * self.scale


def test_code_hidden_from_the_record_is_refused():
    refused(RoutedFunction(), "routed through __torch_function__")
    refused(SubclassWeight(), "subclass LoudTensor")


def test_export_that_is_not_the_forward_is_refused():
    refused(CustomFunction(), "symbolic")

    def identity(g, x):
        return g.op("Identity", x)

    torch.onnx.register_custom_op_symbolic("aten::relu", identity, 17)
    try:
        refused(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), "custom ONNX symbolic")
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::relu", 17)


class CallOverride(Dense):  # runs before the module's hooks
    def __call__(self, x):
        return super().__call__(1000 * x if torch.onnx.is_in_onnx_export() else x)

    def forward(self, x):
        return self.l(x)


def test_code_that_runs_outside_forward_is_refused():
    refused(CallOverride(), "overrides __call__")

    def scale_during_export(module, args):
        return (1000 * args[0],) if torch.onnx.is_in_onnx_export() else None

    handle = torch.nn.modules.module.register_module_forward_pre_hook(scale_during_export)
    try:
        refused(torch.nn.Linear(4, 4), "global module hooks")
    finally:
        handle.remove()


def test_the_reference_does_not_overwrite_the_callers_array():
    m = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Linear(4, 2)).eval()
    x = -np.ones((2, 4), np.float32)
    from lipverify.load.model import _torch_reference

    _torch_reference(m)(x)
    assert (x == -1).all()


# ------------------------------------------------------------------------------------------------
# TorchScript archives: checked on their graph


class ScriptedIf(Dense):
    def forward(self, x):
        h = self.l(x)
        if bool(x.abs().max() > 1e5):
            h = 1000 * h
        return h


class ScriptedCounter(Dense):  # a07 (d)
    calls: int

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.l(x)
        if self.calls > 12:
            h = 1000 * h
        return h


class ScriptedInPlace(Dense):
    def forward(self, x):
        self.l.weight.mul_(1.5)
        return self.l(x)


class ScriptedBatchBranch(Dense):
    def forward(self, x):
        h = self.l(x)
        if x.size(0) == 1:
            h = 1000 * h
        return h


class ScriptedShapeCheck(Dense):  # honest: a per-sample dimension is fixed by the input shape
    def forward(self, x):
        if x.size(1) != 4 or x.dim() != 2:
            raise ValueError("expected (N, 4)")
        return self.l(x)


@pytest.mark.parametrize("cls, match", [(ScriptedIf, "prim::If"), (ScriptedCounter, "prim::SetAttr"),
                                        (ScriptedInPlace, "in place"), (ScriptedBatchBranch, "prim::If")])
def test_torchscript_state_and_branches_are_refused(tmp_path, cls, match):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(cls().eval()), str(path))
    with pytest.raises(UnsupportedModelError, match=match):
        load_model(path, "4")
    r = runner.invoke(app, ["certify", str(path), "--input-shape", "4", "--quiet"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def _scale_output(module: torch.nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return output * 1000


def test_torchscript_with_hooks_of_its_own_is_refused(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    m.register_forward_hook(_scale_output)  # run by a call of the archive, not exported
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(m), str(path))
    with pytest.raises(UnsupportedModelError, match="forward hooks"):
        load_model(path, "4")


def test_torchscript_with_a_shape_check_loads(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(ScriptedShapeCheck()).eval()), str(path))
    assert load_model(path, "4").format == "torchscript"


class WithScriptedPart(Dense):
    def __init__(self):
        super().__init__()
        self.part = torch.jit.script(ScriptedIf())

    def forward(self, x):
        return self.part(self.l(x))


def test_scripted_part_of_a_python_module_is_checked():
    refused(WithScriptedPart(), "prim::If")


def test_factory_attack_is_refused_by_the_cli(tmp_path, monkeypatch):
    (tmp_path / "rt_guarded.py").write_text("from test_torch_load_hardening import Guarded\n\n"
                                            "def build():\n    return Guarded()\n")
    torch.save(Guarded().state_dict(), tmp_path / "w.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["certify", "w.pt", "--factory", "rt_guarded:build", "--input-shape", "4", "--quiet"])
    assert r.exit_code == 2, r.output
    assert "traced faithfully" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------------------
# ONNX graphs with several outputs (a19)


def _two_outputs(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")]
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Mul", ["x", "k"], ["z"])]
    g = helper.make_graph(nodes, "g", [x], outs, [numpy_helper.from_array(np.float32(1000), "k")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_several_graph_outputs_are_refused_unless_one_is_chosen(tmp_path):
    path = _two_outputs(tmp_path / "two.onnx")
    with pytest.raises(UserInputError, match=r"2 outputs \('y', 'z'\).*--graph-output"):
        load_model(path)
    with pytest.raises(UserInputError, match="no such output"):
        load_model(path, graph_output="w")
    cert = certify(path, CertifyOptions(graph_output="z", **FAST))
    assert cert["model"]["graph_output"] == "z" and cert["certified_bound"] >= 1000 * (1 - 1e-6)
    assert any("only graph output 'z'" in n for n in cert["notes"])
    r = runner.invoke(app, ["certify", str(path), "--quiet"])
    assert r.exit_code == 2 and "--graph-output" in r.output


def test_check_compares_the_graph_output(tmp_path):
    path = _two_outputs(tmp_path / "two.onnx")
    cert = certify(path, CertifyOptions(graph_output="y", **FAST))
    good = tmp_path / "c.json"
    good.write_text(json.dumps(cert))
    assert any(step == "graph output" for step, _ in check_certificate(good, path).steps)
    with pytest.raises(CertificateInvalid, match="graph output 'y', not 'z'"):
        check_certificate(good, path, graph_output="z")
    forged = dict(cert, model=dict(cert["model"], graph_output="z"))  # y's bound claimed for z = 1000 x
    (tmp_path / "f.json").write_text(json.dumps(forged))
    with pytest.raises(CertificateInvalid):
        check_certificate(tmp_path / "f.json", path)
    unnamed = dict(cert, model={k: v for k, v in cert["model"].items() if k != "graph_output"})
    (tmp_path / "u.json").write_text(json.dumps(unnamed))
    with pytest.raises(UserInputError, match="--graph-output"):
        check_certificate(tmp_path / "u.json", path)


def test_graph_input_with_a_default_is_noted(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    w = helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 3])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x, w],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.eye(3, dtype=np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "w.onnx"))
    cert = certify(tmp_path / "w.onnx", CertifyOptions(**FAST))
    assert any("certified at that value" in n and "W" in n for n in cert["notes"])
