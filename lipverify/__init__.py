"""lipverify: certified Lipschitz bounds for trained neural networks (ONNX, safetensors, TorchScript)."""

__version__ = "0.1.0"
