"""Torch sources whose export would differ from the module, and ONNX graphs with several outputs.

Red-team findings a07 (factory modules that silence tracer warnings or branch on being traced,
stateful TorchScript) and a19 (only graph output 0 certified, silently). Each test builds what an
attacker could hand in and asserts a refusal naming the cause, or a bound at least the quotient
measured on the file; honest modules that use the same APIs harmlessly still load.
"""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from lipverify.certify import CertifyOptions, certify
from lipverify.cli import app
from lipverify.errors import UserInputError
from lipverify.load import load_model
from lipverify.verifier.certificate import CertificateInvalid, check_certificate

runner = CliRunner()
FAST = dict(lower_starts=2, lower_budget_s=1)


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
