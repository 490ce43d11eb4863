"""Shared test helpers: build small torch models, export them, and locate external data."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
EXTERNAL = REPO.parent / "shared" / "external"
FIXTURES = REPO / "fixtures"


def external(*parts) -> Path:
    path = EXTERNAL.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"external data not available: {path}")
    return path


def export_onnx(module: torch.nn.Module, input_shape, path: Path, opset: int = 17, dynamo: bool = False) -> Path:
    module.eval()
    example = torch.randn((2,) + tuple(input_shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                              input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=False)
        else:
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return path


def save_torchscript(module: torch.nn.Module, input_shape, path: Path) -> Path:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(module, torch.randn((2,) + tuple(input_shape))), str(path))
    return path


class Residual(torch.nn.Module):
    def __init__(self, body: torch.nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def sequential_from_weights(weights, biases=None, activation=torch.nn.ReLU) -> torch.nn.Sequential:
    """Dense chain W_0, act, W_1, ..., W_l from (out, in) matrices (float64 arrays)."""
    layers = []
    for k, w in enumerate(weights):
        w = torch.as_tensor(w, dtype=torch.float32)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=biases is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if biases is not None:
                lin.bias.copy_(torch.as_tensor(biases[k], dtype=torch.float32).reshape(-1))
        layers.append(lin)
        if k < len(weights) - 1:
            layers.append(activation())
    return torch.nn.Sequential(*layers)


def graph_as_file(graph):
    """A hand-built graph in the role of the user's file (float32 inputs, float64 outputs), for the
    file-based lower bound in tests of bound methods that have no model file."""
    import numpy as np
    from types import SimpleNamespace

    def reference(x):
        with torch.no_grad():
            return graph.forward(torch.from_numpy(np.asarray(x, dtype=np.float32).astype(np.float64))).numpy()

    return SimpleNamespace(reference=reference, torch_module=None)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def onnx_bytes(module, input_shape, opset=17) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn((2,) + tuple(input_shape)),), buf, dynamo=False,
                          opset_version=opset, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return buf.getvalue()
