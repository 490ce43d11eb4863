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
FAST = ["--lower-starts", "4", "--lower-effort", "0.25"]  # a small deterministic lower-bound search
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


# ---------------------------------------------------------------------------------------------
# issue 14: quick, honest and reproducible to use
# ---------------------------------------------------------------------------------------------


def test_quiet_prints_one_summary_line(small_onnx):
    r = run("certify", small_onnx, "--max-L", "1e9", "-q", *FAST)
    assert r.exit_code == 0, r.output
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("PASS L ≤ ") and lines[0].endswith(" ≤ 1000000000"), lines


def test_gate_message_shows_why_it_failed(small_onnx, tmp_path):
    r = run("certify", small_onnx, "--method", "product", "--json", tmp_path / "c.json", *FAST)
    bound = json.loads((tmp_path / "c.json").read_text())["certified_bound"]
    threshold = float(f"{bound * (1 - 1e-9):.12g}")  # below the bound in the 10th digit
    r = run("certify", small_onnx, "--method", "product", "--max-L", repr(threshold), *FAST)
    assert r.exit_code == 1
    line = next(l for l in r.output.splitlines() if l.startswith("gate failed"))
    value, op, shown_threshold = line.split("max-L: ")[1].split(" ")
    assert op == ">" and float(shown_threshold) == threshold
    assert float(value) > threshold and float(value) >= bound  # enough digits, rounded up


def test_output_paths_are_checked_before_any_work(small_onnx, tmp_path, monkeypatch):
    import lipverify.certify as certify_module

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(certify_module, "load_model", must_not_load)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.html").mkdir()
    cases = [(["--report", tmp_path / "x.pdf"], "expected a .html or .md"),
             (["--per-sample", tmp_path / "r.csv"], "--per-sample needs --data"),
             (["--json", tmp_path / "a_file" / "c.json"], "is not a folder"),
             (["--report", tmp_path / "folder.html"], "is a directory"),
             (["--min-certified-acc", "0.5@0.1"], "needs --data")]
    for args, message in cases:
        r = run("certify", small_onnx, *args)
        assert r.exit_code == 2 and message in r.output, (args, r.output)


def test_errors_are_not_wrapped(tmp_path):
    missing = tmp_path / ("a_rather_long_folder_name_" * 3) / "model_that_does_not_exist.onnx"
    r = runner.invoke(app, ["certify", str(missing)], env={"COLUMNS": "60"})
    assert r.exit_code == 2
    assert any(str(missing) in line for line in r.output.splitlines()), r.output


def test_progress_lines_without_a_terminal(small_onnx):
    r = run("certify", small_onnx, *FAST)
    assert r.exit_code == 0
    for stage in ("load model", "extract graph + self-check", "bound: product", "sampled lower bound"):
        assert f"lipverify: {stage}: done in " in r.stderr, stage


def test_fast_mode(tmp_path):
    r = run("certify", FIXTURES / "mlp.onnx", "--fast", "--json", tmp_path / "c.json", "--data",
            FIXTURES / "digits_test.npz", "--limit", "50", *FAST)
    assert r.exit_code == 0, r.output
    cert = json.loads((tmp_path / "c.json").read_text())
    assert list(cert["bounds"]) == ["product"] and "--fast" in cert["method_reason"]
    assert cert["data"]["pairwise_methods"] == {"product": 45}
    assert run("certify", FIXTURES / "mlp.onnx", "--fast", "--method", "all").exit_code == 2


def test_audit_trail_and_report_from_the_certificate(tmp_path):
    import hashlib

    from lipverify import __version__

    r = run("certify", FIXTURES / "mlp.onnx", "--method", "product", "--data", FIXTURES / "digits_test.npz",
            "--limit", "30", "--json", tmp_path / "c.json", *FAST)
    assert r.exit_code == 0, r.output
    cert = json.loads((tmp_path / "c.json").read_text())
    run_block = cert["run"]
    assert run_block["lipverify_version"] == __version__
    assert run_block["timestamp_utc"].endswith("Z") and run_block["host"] and run_block["device"] == "cpu"
    assert run_block["options"]["method"] == "product" and run_block["options"]["data"]["limit"] == 30
    # no --budget-s: nothing is cut but what the explicit --lower-budget-s cap of FAST may cut on a busy machine
    assert run_block["budget_s"] is None
    assert all(c.startswith("sampled lower bound: --lower-budget-s") for c in run_block["cut_by_budget"])
    digest = hashlib.sha256((FIXTURES / "digits_test.npz").read_bytes()).hexdigest()
    assert cert["data"]["sha256"] == digest
    assert {"load_s", "extract_s", "bound_s", "lower_s", "data_s", "total_s"} <= set(cert["timings"])

    r = run("report", tmp_path / "c.json", "--html", tmp_path / "r.html", "--md", tmp_path / "r.md")
    assert r.exit_code == 0, r.output
    html, md = (tmp_path / "r.html").read_text(), (tmp_path / "r.md").read_text()
    for text in (html, md):
        assert "Audit trail" in text and digest in text and "pairwise radii" in text
    assert "output_shape" not in html.split("Full certificate")[0]  # labels, not raw JSON keys
    assert "load_s" not in html.split("Full certificate")[0]
    assert run("report", tmp_path / "c.json").exit_code == 2  # nothing to write
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert run("report", tmp_path / "bad.json", "--md", tmp_path / "x.md").exit_code == 2
    assert not (tmp_path / "x.md").exists()


def test_version():
    from lipverify import __version__

    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith(f"lipverify {__version__}")


def test_every_option_of_every_command_has_help():
    import inspect as pyinspect

    import typer.models

    missing = []
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        for pname, param in pyinspect.signature(command.callback).parameters.items():
            info = param.default
            if isinstance(info, typer.models.ParameterInfo) and not (info.help or "").strip():
                missing.append(f"{name} {pname}")
    assert len(app.registered_commands) >= 6  # certify, inspect, check, report, methods, fine-tune
    assert not missing, missing
