"""The Lipschitz graph IR, its extraction from ONNX, exact simplifications and the self-check."""

from lipverify.graph.ir import Graph, Node

__all__ = ["Graph", "Node"]
