"""`lipverify check`: every honest certificate passes; every kind of tampering is caught."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import FIXTURES
from lipverify.certify import CertifyOptions, certify
from lipverify.verifier.certificate import CertificateInvalid, check_certificate
from lipverify.cli import app
from lipverify.data import DataSpec
from lipverify.robustness import DataOptions
from test_verifier import METHOD_PACKAGES

runner = CliRunner()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    out = {}
    for name in ("mlp", "cnn_bn", "resmlp"):
        model = d / f"{name}.onnx"
        shutil.copy(FIXTURES / f"{name}.onnx", model)
        cert = certify(model, CertifyOptions(method="all", lower_starts=4, lower_budget_s=3))
        out[name] = (model, cert)
    return d, out


def _write(d, cert, name="c.json"):
    p = d / name
    p.write_text(json.dumps(cert))
    return p


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "resmlp"])
def test_honest_certificates_pass(certs, name):
    d, all_certs = certs
    model, cert = all_certs[name]
    report = check_certificate(_write(d, cert), model)
    assert report.steps[0][0] == "model file sha256"
    assert any(step.startswith("method ") for step, _ in report.steps)


CHECK_IN_A_FRESH_PROCESS = """
import json, sys
from lipverify.verifier.certificate import check_certificate
cert, model, data = sys.argv[1:4]
check_certificate(cert, model, data_path=data or None)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("lipverify"))))
"""


def _modules_loaded_by_check(cert_path, model, data=None) -> list[str]:
    run = subprocess.run([sys.executable, "-c", CHECK_IN_A_FRESH_PROCESS, str(cert_path), str(model), str(data or "")],
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "resmlp", "mlp with data"])
def test_check_never_loads_a_method_module(certs, name):
    """test_verifier's import rule at run time, through the lazy imports of loading, extraction and data:
    a whole `check` (every method's witness, the lower bound, results on data) runs in a fresh
    interpreter without one module of the methods it checks."""
    d, all_certs = certs
    data = None
    if name == "mlp with data":
        model, data = all_certs["mlp"][0], FIXTURES / "digits_test.npz"
        cert = certify(model, CertifyOptions(method="product", lower_starts=2, lower_effort=0.25,
                                             data=DataOptions(DataSpec(str(data), limit=40), eps=[0.1],
                                                              attack_samples=2)))
    else:
        model, cert = all_certs[name]
    loaded = _modules_loaded_by_check(_write(d, cert, "fresh.json"), model, data)
    assert "lipverify.verifier.certificate" in loaded and "lipverify.graph.build" in loaded
    assert data is None or "lipverify.radii" in loaded
    assert not [m for m in loaded if m.startswith(METHOD_PACKAGES)]


def _tampered_factor(cert, scale):
    c = copy.deepcopy(cert)
    factors = c["methods"]["product"]["witness"]["factors"]
    name = max(factors, key=factors.get)
    factors[name] *= scale
    return c


def test_lowered_tau_is_caught(certs):
    d, all_certs = certs
    model, cert = all_certs["mlp"]
    with pytest.raises(CertificateInvalid, match="not a verified upper bound"):
        check_certificate(_write(d, _tampered_factor(cert, 1 - 1e-6)), model)


def test_swapped_layers_are_caught(certs):
    d, all_certs = certs
    model, cert = all_certs["mlp"]
    c = copy.deepcopy(cert)
    factors = c["methods"]["product"]["witness"]["factors"]
    dense = sorted((v, k) for k, v in factors.items() if v not in (1.0,))
    (lo, a), (hi, b) = dense[0], dense[-1]
    factors[a], factors[b] = hi, lo
    with pytest.raises(CertificateInvalid):
        check_certificate(_write(d, c), model)


def test_lowered_headline_is_caught(certs):
    d, all_certs = certs
    model, cert = all_certs["mlp"]
    c = copy.deepcopy(cert)
    for name in c["methods"]:
        c["methods"][name]["value"] *= 0.5
        c["bounds"][name] = c["methods"][name]["value"]
    c["certified_bound"] *= 0.5
    with pytest.raises(CertificateInvalid):
        check_certificate(_write(d, c), model)


def test_another_models_file_is_caught(certs):
    d, all_certs = certs
    _, cert = all_certs["mlp"]
    other, _ = all_certs["resmlp"]
    with pytest.raises(CertificateInvalid, match="hash"):
        check_certificate(_write(d, cert), other)


def test_cli_exit_codes(certs, tmp_path):
    d, all_certs = certs
    model, cert = all_certs["mlp"]
    good = _write(tmp_path, cert, "good.json")
    assert runner.invoke(app, ["check", str(good), str(model)]).exit_code == 0
    bad = _write(tmp_path, _tampered_factor(cert, 0.9), "bad.json")
    r = runner.invoke(app, ["check", str(bad), str(model)])
    assert r.exit_code == 1 and "INVALID" in r.output
    (tmp_path / "junk.json").write_text("{not json")
    assert runner.invoke(app, ["check", str(tmp_path / "junk.json"), str(model)]).exit_code == 2
    assert runner.invoke(app, ["check", str(good), str(tmp_path / "missing.onnx")]).exit_code == 2
    old = dict(cert, schema_version="1.0")
    assert runner.invoke(app, ["check", str(_write(tmp_path, old, "old.json")), str(model)]).exit_code == 2
