"""Data-parallel fine-tuning: 2 CPU processes (torchrun, gloo) export the weights one process exports.

The two runs differ only in the order of float additions (each rank sums half of every batch and
DDP averages the two halves' gradients), so the weights agree to float tolerance, not bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

FIX = Path(__file__).resolve().parents[1] / "fixtures"
pytestmark = pytest.mark.skipif(not (FIX / "mlp.onnx").exists(), reason="fixtures not generated")


def _weights(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    return [numpy_helper.to_array(t) for t in sorted(model.graph.initializer, key=lambda t: t.name)
            if numpy_helper.to_array(t).ndim >= 1 and numpy_helper.to_array(t).size > 1]


def _cli_args(d: Path, out: Path) -> list[str]:
    return ["fine-tune", str(d / "mlp.onnx"), "--target-L", "3", "--data", str(d / "train.npz"),
            "--val", str(d / "val.npz"), "--epochs", "2", "--batch-size", "64", "--seed", "1",
            "--certify-method", "product", "--sketch-every", "2", "--out", str(out), "-q"]


def test_two_gloo_processes_export_the_weights_of_one(tmp_path):
    tr, te = np.load(FIX / "digits_train.npz"), np.load(FIX / "digits_test.npz")
    np.savez(tmp_path / "train.npz", x=tr["x"][:256], y=tr["y"][:256])
    np.savez(tmp_path / "val.npz", x=te["x"][:64], y=te["y"][:64])
    (tmp_path / "mlp.onnx").write_bytes((FIX / "mlp.onnx").read_bytes())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    single = subprocess.run([sys.executable, "-m", "lipverify", *_cli_args(tmp_path, one)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "lipverify", *_cli_args(tmp_path, two)]
    dual = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert dual.returncode == 0, dual.stdout + dual.stderr
    a, b = _weights(one), _weights(two)
    assert len(a) == len(b) == 6
    for wa, wb in zip(a, b):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)
    # the certificate was written once, by rank 0, for the exported file
    cert = json.loads((tmp_path / "two.certificate.json").read_text())
    assert cert["certified_bound"] <= 3.0 and cert["fine_tune"]["target_met"]
    assert not (tmp_path / "two.onnx.ckpt").exists()
