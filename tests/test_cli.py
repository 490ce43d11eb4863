"""The CLI contract: exit codes, JSON schema keys, messages instead of tracebacks, nothing written on error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from conftest import FIXTURES, export_onnx
from lipverify.cli import app

runner = CliRunner()
FAST = ["--lower-starts", "4", "--lower-budget-s", "2"]
REQUIRED_KEYS = {"schema_version", "model", "method", "certified_bound", "lower_bound", "bounds", "layers",
                 "timings", "versions"}


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return export_onnx(m, (4,), tmp_path_factory.mktemp("m") / "small.onnx")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_certify_json_contract(small_onnx, tmp_path):
    out = tmp_path / "cert.json"
    r = run("certify", small_onnx, "--json", out, *FAST)
    assert r.exit_code == 0, r.output
    cert = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(cert)
    assert set(cert["model"]) >= {"path", "sha256", "format", "input_shape"}
    assert cert["bounds"][cert["method"]] == cert["certified_bound"]
    for layer in cert["layers"]:
        assert {"name", "op", "factor", "tau", "lower"} <= set(layer)
        assert layer["tau"] == pytest.approx(layer["factor"] ** 2)
    assert "Certified global L2 Lipschitz bound" in r.output


def test_max_l_gate(small_onnx):
    assert run("certify", small_onnx, "--max-L", "1e9", *FAST).exit_code == 0
    r = run("certify", small_onnx, "--max-L", "1e-9", *FAST)
    assert r.exit_code == 1
    assert "gate failed" in r.output


def test_inspect(small_onnx, tmp_path):
    r = run("inspect", small_onnx, "--json", tmp_path / "g.json")
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "g.json").read_text())
    assert [n["kind"] for n in info["nodes"]] == ["Dense", "Activation", "Dense"] or \
        [n["kind"] for n in info["nodes"]][0] == "Dense"
    assert "self-check" in r.output


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", bytes(range(256)) * 10])
def test_corrupt_files_exit_2_without_traceback(content, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    r = run("certify", bad, "--json", tmp_path / "out.json")
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    assert not (tmp_path / "out.json").exists()


def test_truncated_onnx(small_onnx, tmp_path):
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(small_onnx.read_bytes()[: len(small_onnx.read_bytes()) // 2])
    r = run("certify", bad)
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_nan_weights(small_onnx, tmp_path):
    model = onnx.load(str(small_onnx))
    init = model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    r = run("certify", path, "--json", tmp_path / "o.json")
    assert r.exit_code == 2 and "NaN" in r.output
    assert not (tmp_path / "o.json").exists()


def test_unsupported_op_names_node(tmp_path):
    class Floor(nn.Module):
        def forward(self, x):
            return torch.floor(x)

    path = export_onnx(nn.Sequential(nn.Linear(3, 3), Floor()), (3,), tmp_path / "f.onnx")
    r = run("certify", path)
    assert r.exit_code == 2
    assert "Floor" in r.output and "node" in r.output


def test_missing_external_data(tmp_path):
    src = FIXTURES.parent.parent / "shared" / "external" / "GLipSDP" / "Scalability" / "exported_mnist_models"
    if not src.exists():
        pytest.skip("external data absent")
    shutil.copy(src / "mlp_L3_W16.onnx", tmp_path / "m.onnx")  # without its .onnx.data
    r = run("certify", tmp_path / "m.onnx")
    assert r.exit_code == 2 and "external data" in r.output


def test_shape_mismatch(small_onnx):
    r = run("certify", small_onnx, "--input-shape", "5")
    assert r.exit_code == 2 and "input-shape" in r.output
    r = run("certify", small_onnx, "--input-shape", "a,b")
    assert r.exit_code == 2


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "m.xyz").write_text("hi")
    assert run("certify", tmp_path / "m.xyz").exit_code == 2
    assert run("certify", tmp_path / "nope.onnx").exit_code == 2


def test_unknown_method(small_onnx):
    r = run("certify", small_onnx, "--method", "magic")
    assert r.exit_code == 2 and "unknown method" in r.output


def test_refuses_to_overwrite_model(tmp_path):
    path = FIXTURES / "mlp.onnx"
    copy = tmp_path / "mlp.onnx"
    shutil.copy(path, copy)
    before = copy.read_bytes()
    r = run("certify", copy, "--data", FIXTURES / "digits_test.npz", "--report", copy)
    assert r.exit_code == 2
    assert copy.read_bytes() == before


def test_fixture_formats_agree(tmp_path):
    certs = {}
    for suffix in ("onnx", "pt", "safetensors"):
        r = run("certify", FIXTURES / f"mlp.{suffix}", "--method", "product", "--json", tmp_path / "c.json", "-q",
                "--input-shape", "1,8,8", *FAST)
        assert r.exit_code == 0, r.output
        certs[suffix] = json.loads((tmp_path / "c.json").read_text())["certified_bound"]
    assert certs["onnx"] == pytest.approx(certs["pt"], rel=1e-9)
    assert certs["onnx"] == pytest.approx(certs["safetensors"], rel=1e-9)


def test_data_radii_reports_and_gates(tmp_path):
    args = ["certify", FIXTURES / "mlp.onnx", "--data", FIXTURES / "digits_test.npz", "--eps", "0.05,0.1",
            "--per-sample", tmp_path / "r.csv", "--report", tmp_path / "a.html", "--report", tmp_path / "a.md",
            "--json", tmp_path / "a.json", "--limit", "120", *FAST]
    r = run(*args, "--min-certified-acc", "0.01@0.05")
    assert r.exit_code == 0, r.output
    cert = json.loads((tmp_path / "a.json").read_text())
    assert cert["data"]["n"] == 120
    assert cert["data"]["pgd_check"]["successes"] == 0
    assert (tmp_path / "a.html").read_text().count("<svg") >= 2
    assert "|" in (tmp_path / "a.md").read_text()
    from lipverify.radii import read_csv

    csv = read_csv(tmp_path / "r.csv")
    assert len(csv["radius"]) == 120
    r = run(*args, "--method", "product", "--min-certified-acc", "0.999@0.1")
    assert r.exit_code == 1


@pytest.mark.parametrize("problem", ["labels", "shape", "empty", "csv"])
def test_bad_data_exit_2(problem, tmp_path):
    x = np.random.rand(10, 1, 8, 8).astype(np.float32)
    y = np.arange(10) % 10
    if problem == "labels":
        np.savez(tmp_path / "d.npz", x=x, y=y + 5)
        path = tmp_path / "d.npz"
    elif problem == "shape":
        np.savez(tmp_path / "d.npz", x=np.random.rand(10, 3, 5).astype(np.float32), y=y)
        path = tmp_path / "d.npz"
    elif problem == "empty":
        np.savez(tmp_path / "d.npz", x=x[:0], y=y[:0])
        path = tmp_path / "d.npz"
    else:
        path = tmp_path / "d.csv"
        path.write_text("a,b,label\n1,x,2\n")
    r = run("certify", FIXTURES / "mlp.onnx", "--data", path, *FAST)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output


def test_memory_guard_refuses_before_allocation(small_onnx):
    r = run("certify", small_onnx, "--budget-mem", "1K")
    assert r.exit_code == 2 and "budget-mem" in r.output
    assert run("certify", small_onnx, "--budget-mem", "2G", *FAST).exit_code == 0
    assert run("certify", small_onnx, "--budget-mem", "plenty").exit_code == 2


def test_module_factory_with_state_dict(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_models

    torch.manual_seed(3)
    model = my_models.build()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    r = run("certify", tmp_path / "weights.pt", "--factory", "my_models:build", "--json", tmp_path / "c.json", *FAST)
    assert r.exit_code == 0, r.output
    cert = json.loads((tmp_path / "c.json").read_text())
    assert cert["model"]["format"] == "module"
    w1, w2 = (np.linalg.norm(l.weight.detach().double().numpy(), 2) for l in (model[0], model[2]))
    assert cert["bounds"]["product"] == pytest.approx(w1 * w2, rel=1e-7)
    assert run("certify", tmp_path / "weights.pt", "--factory", "my_models:nope").exit_code == 2
    assert run("certify", tmp_path / "weights.pt", "--factory", "json:loads").exit_code == 2


@pytest.mark.regression
def test_huge_seed_with_data_is_refused(small_onnx):
    """Found by fuzzing: the seed was used before it was validated."""
    r = run("certify", FIXTURES / "mlp.onnx", "--seed", str(2**70), "--data", FIXTURES / "digits_test.npz")
    assert r.exit_code == 2 and "--seed" in r.output
    assert run("certify", FIXTURES / "mlp.onnx", "--data", FIXTURES / "digits_test.npz", "--batch-size", "-1").exit_code == 2
