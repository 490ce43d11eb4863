"""Known answers from published weights (../shared/external; skipped when absent).

Layouts (converting them into model files is test code):
- LipSDP random_weights.mat: cell `weights` of (out, in) float64 matrices, no biases, ReLU.
- ECLipsE lyr2n80test1.npz: w1 (80, 4), w2 (1, 80), (out, in), no biases, ReLU.
- GLipSDP Comparison fnn/cnn .mat: Linear weights TRANSPOSED (in, out); conv weights (kh, kw, c_in, c_out);
  biases (1, n); the published numbers bound logit 7 only, w.r.t. the standardized input.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io as sio
import torch
import torch.nn as nn

from conftest import export_onnx, external, sequential_from_weights
from lipverify.certify import CertifyOptions, certify

FAST = dict(lower_starts=8, lower_budget_s=5)


def test_lipsdp_random_weights_product(tmp_path):
    w = sio.loadmat(external("LipSDP", "random_weights.mat"))["weights"]
    weights = [np.asarray(w[0, i], dtype=np.float64) for i in range(w.shape[1])]
    path = export_onnx(sequential_from_weights(weights), (2,), tmp_path / "random.onnx")
    cert = certify(path, CertifyOptions(method="product", **FAST))
    assert cert["certified_bound"] == pytest.approx(43.306, abs=1e-3)
    assert cert["certified_bound"] >= 43.30557  # never below the exact product


def test_eclipse_product(tmp_path):
    d = np.load(external("ECLipsE", "lyr2n80test1.npz"))
    path = export_onnx(sequential_from_weights([d["w1"], d["w2"]]), (4,), tmp_path / "e.onnx")
    cert = certify(path, CertifyOptions(method="product", **FAST))
    assert cert["certified_bound"] == pytest.approx(0.87498, abs=1e-5)


def _glipsdp(name):
    return sio.loadmat(external("GLipSDP", "Comparison", "exports", f"{name}_weights.mat"))


def test_glipsdp_fnn2_seed0_logit7(tmp_path):
    d = _glipsdp("fnn2_seed0")
    weights = [d["fc1_weight"].T, d["fc2_weight"].T]
    biases = [d["fc1_bias"], d["fc2_bias"]]
    path = export_onnx(sequential_from_weights(weights, biases), (64,), tmp_path / "fnn2.onnx")
    cert = certify(path, CertifyOptions(method="product", output=7, **FAST))
    assert 7.09225 * (1 - 1e-5) <= cert["certified_bound"] <= 7.09225 * 1.005


def test_glipsdp_cnn2_seed0_logit7(tmp_path):
    d = _glipsdp("cnn2_seed0")
    conv = nn.Conv2d(1, 8, 3, padding=1)
    fc = nn.Linear(512, 10)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.transpose(d["conv1_weight"], (3, 2, 0, 1)).copy()))
        conv.bias.copy_(torch.from_numpy(d["conv1_bias"].reshape(-1)))
        fc.weight.copy_(torch.from_numpy(d["fc1_weight"].T.copy()))
        fc.bias.copy_(torch.from_numpy(d["fc1_bias"].reshape(-1)))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc)
    path = export_onnx(model, (1, 8, 8), tmp_path / "cnn2.onnx")
    cert = certify(path, CertifyOptions(method="product", output=7, **FAST))
    # published product column (valid for the real network): never below, within 0.5 %
    assert 11.60371 * (1 - 1e-5) <= cert["certified_bound"] <= 11.60371 * 1.005
    # the published LipSDP value 5.11109 belongs to a scrambled network: our sampled lower bound beats it
    assert cert["lower_bound"] <= cert["certified_bound"]


GLIPSDP_ONNX = ["mlp_L3_W16", "mlp_L5_W32", "mlp_L9_W64", "cnn_C3_CH8", "cnn_C5_CH16"]


@pytest.mark.parametrize("name", GLIPSDP_ONNX)
def test_glipsdp_onnx_files_load_and_certify(name):
    path = external("GLipSDP", "Scalability", "exported_mnist_models", f"{name}.onnx")
    cert = certify(path, CertifyOptions(method="product", **FAST))
    assert cert["model"]["input_shape"] == [1, 28, 28]
    assert cert["self_check"]["worst_ratio"] <= 1.0
    assert 0 < cert["lower_bound"] <= cert["certified_bound"]
    assert cert["model"]["data_files"]  # the external .onnx.data file was read and hashed


def test_glipsdp_fnn_lipsdp_through_the_pipeline(tmp_path):
    """The published LipSDP-Neuron column (logit 7), reached from an exported ONNX model."""
    for name, published in (("fnn2_seed0", 5.10971), ("fnn3_seed0", 9.72861)):
        d = _glipsdp(name)
        keys = sorted(k for k in d if k.startswith("fc") and k.endswith("_weight"))
        weights = [d[k].T for k in keys]
        biases = [d[k.replace("weight", "bias")] for k in keys]
        path = export_onnx(sequential_from_weights(weights, biases), (64,), tmp_path / f"{name}.onnx")
        cert = certify(path, CertifyOptions(method="lipsdp-neuron", output=7, **FAST))
        assert cert["certified_bound"] == pytest.approx(published, rel=1e-4)
        assert cert["lower_bound"] <= cert["certified_bound"]


def test_eclipse_lipsdp_with_negative_slopes(tmp_path):
    """Slopes [-0.13, 1.13] must give 0.83310 (a tool printing 0.7373 is unsound)."""
    d = np.load(external("ECLipsE", "lyr2n80test1.npz"))
    from lipverify.bounds.lipsdp_core import lipsdp

    assert lipsdp([d["w1"], d["w2"]], [(0.0, 1.0)]).value == pytest.approx(0.73726, abs=1e-5)
    assert lipsdp([d["w1"], d["w2"]], [(-0.13, 1.13)]).value == pytest.approx(0.83310, abs=1e-5)
    path = export_onnx(sequential_from_weights([d["w1"], d["w2"]]), (4,), tmp_path / "e.onnx")
    cert = certify(path, CertifyOptions(method="lipsdp-neuron", **FAST))
    assert cert["certified_bound"] == pytest.approx(0.73726, abs=1e-5)
