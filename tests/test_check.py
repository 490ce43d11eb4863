"""`lipverify check`: every honest certificate passes; every kind of tampering is caught."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import FIXTURES
from lipverify.certify import CertifyOptions, certify
from lipverify.verifier.certificate import CertificateInvalid, check_certificate
from lipverify.cli import app

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
