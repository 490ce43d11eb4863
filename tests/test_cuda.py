"""CUDA paths (run by benchmarks/gpu.sh on a GPU machine; skipped without CUDA).

Every method path touched by issue 12 must give the CPU's certified numbers on ``--device cuda``:
the solver and the compositional tier run on the GPU in float64, repair and verification stay
float64 on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import export_onnx
from lipverify.bounds.compositional_core import compositional
from lipverify.bounds.lipsdp_core import lipsdp, verify_lipsdp
from lipverify.certify import CertifyOptions, certify

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _net(dims, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(dims[i + 1], dims[i])) / np.sqrt(dims[i]) for i in range(len(dims) - 1)]


@pytest.mark.parametrize("mode", ["neuron", "layer"])
def test_lipsdp_on_cuda_matches_cpu(mode):
    ws = _net([30, 40, 40, 40, 5])
    sl = [(-0.1, 1.1)] * 3
    cpu = lipsdp(ws, sl, mode)
    gpu = lipsdp(ws, sl, mode, device="cuda")
    assert gpu.info["device"].startswith("cuda") and gpu.converged
    assert abs(gpu.value - cpu.value) <= 1e-5 * cpu.value
    assert verify_lipsdp(ws, sl, gpu.T, gpu.rho)[0]


def test_compositional_on_cuda_matches_cpu():
    ws = _net([30, 50, 50, 5], seed=1)
    sl = [(0.0, 1.0)] * 2
    _, rho_cpu = compositional(ws, sl)
    _, rho_gpu = compositional(ws, sl, "cuda")
    assert abs(rho_gpu - rho_cpu) <= 1e-9 * rho_cpu


def test_certify_all_methods_on_cuda(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.GELU(),
                              torch.nn.Linear(16, 4))
    path = export_onnx(mlp, (12,), tmp_path / "mlp.onnx")
    fast = dict(lower_starts=4, lower_budget_s=5)
    cpu = certify(path, CertifyOptions(method="all", **fast))
    gpu = certify(path, CertifyOptions(method="all", device="cuda", **fast))
    assert gpu["device"] == "cuda" and set(gpu["bounds"]) == set(cpu["bounds"])
    for name in ("product", "lipsdp-neuron", "lipsdp-layer", "compositional"):
        assert abs(gpu["bounds"][name] - cpu["bounds"][name]) <= 1e-5 * cpu["bounds"][name]
