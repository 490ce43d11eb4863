"""A loaded model -> its checked Lipschitz graph: extract, simplify (exact rewrites), self-check."""

from __future__ import annotations

import copy

import numpy as np

from lipverify.graph.check import self_check
from lipverify.graph.from_onnx import extract_onnx
from lipverify.graph.ir import Graph
from lipverify.graph.simplify import simplify


def build_graph(loaded, data=None) -> tuple[Graph, dict]:
    """Extract, simplify and self-check the IR of a ``LoadedModel`` (``data``: samples to probe with too)."""
    graph = extract_onnx(loaded.onnx_model, loaded.input_shape)
    as_file = copy.deepcopy(graph)
    graph = simplify(graph)
    graph.as_file = as_file
    check = self_check(graph, loaded.reference, data=None if data is None else np.asarray(data))
    return graph, check.as_dict()
