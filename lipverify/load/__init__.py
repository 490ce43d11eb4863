"""Loaders: every model format becomes an ONNX graph (for extraction) plus a reference forward
function that computes exactly what the user's file computes (for the self-check)."""

from lipverify.load.model import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
