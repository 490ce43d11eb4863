"""Write the fine-tuned network in the format it came in, atomically, never over the input.

- ONNX in -> ONNX out: the trained lipverify IR (a torch module) exported with the legacy
  TorchScript-based exporter (``dynamo=False``, opset 17, dynamic batch axis), input ``input``,
  output ``output``. The graph is the IR's (BatchNorm folded), not the original node names.
  Convolutions with symmetric padding are written as one Conv node with its ``pads`` (the IR's
  own forward pads explicitly, which would export a Pad node and a Conv on the padded grid: the
  same function, but certify would then bound the convolution on the larger padded input, a
  looser norm than the one training aimed at).
- TorchScript in -> TorchScript out: ``torch.jit.trace`` of the same module.
- safetensors (+ spec) in -> safetensors + the same spec out: the trained weights are written back
  under the spec's tensor names (every other tensor and the file metadata are kept). A spec
  ``conv/linear -> batchnorm`` pair, folded for training, is written back as the trained layer
  and a BatchNorm set to the identity (mean 0, weight sqrt(var + eps), bias 0).

Everything goes through ``lipverify.fileio.atomic_write_bytes``: a crash never leaves a partial file.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path

import torch

from lipverify.errors import UserInputError
from lipverify.fileio import atomic_write_bytes, atomic_write_text
from lipverify.load.model import EXPORT_OPSET, SAFETENSORS_SUFFIXES, TORCHSCRIPT_SUFFIXES
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense


def same_file(a: Path, b: Path) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def default_out_path(model_path: Path, target: float) -> Path:
    tag = f"{target:g}".replace(".", "p")
    return model_path.with_name(f"{model_path.stem}_L{tag}{model_path.suffix}")


def spec_path_for(out: Path) -> Path:
    """Where ``load_safetensors_model`` looks for the spec of ``out`` (``<stem>.json``)."""
    return out.with_suffix(".json")


def certificate_path_for(out: Path) -> Path:
    return out.with_suffix(".certificate.json")


def check_out_paths(model_path: Path, fmt: str, out: Path, certificate: Path, checkpoint: Path,
                    spec_in: Path | None = None, data: tuple = ()) -> None:
    """Refuse, whatever the options, any write over the input model, its spec or the data files,
    written paths that collide with each other, and an output in another format than the input."""
    suffix = out.suffix.lower()
    ok = {"onnx": suffix == ".onnx", "torchscript": suffix in TORCHSCRIPT_SUFFIXES,
          "safetensors": suffix in SAFETENSORS_SUFFIXES}.get(fmt, False)
    if not ok:
        raise UserInputError(f"--out {out}: the output keeps the input's format ({fmt}); use a "
                             f"{'.onnx' if fmt == 'onnx' else '.safetensors' if fmt == 'safetensors' else '.pt'} path")
    if out.exists() and out.is_dir():
        raise UserInputError(f"--out {out} is a directory")
    protected = [("the input model", Path(model_path))]
    if fmt == "safetensors":
        protected.append(("the input's spec", Path(spec_in) if spec_in else spec_path_for(Path(model_path))))
    protected += [("a data file", Path(d)) for d in data if d]
    written = [("--out", out)]
    if fmt == "safetensors":
        written.append(("the output's spec", spec_path_for(out)))
    written += [("the certificate (--json)", Path(certificate)), ("the checkpoint (--checkpoint)", Path(checkpoint))]
    for what, path in written:
        for name, keep in protected:
            if same_file(path, keep):
                raise UserInputError(f"{what} {path} is {name}; refusing to overwrite it (choose another path)")
    for i, (what, path) in enumerate(written):
        for other, path2 in written[i + 1:]:
            if same_file(path, path2):
                raise UserInputError(f"{what} and {other} are the same file {path}; choose different paths")


class ExportForward(torch.nn.Module):
    """The trainable graph's forward with each symmetric-padded convolution as one native conv."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.module.graph
        values = {g.input_name: x}
        for n in g.nodes:
            args = [values[a] for a in n.inputs]
            values[n.name] = _native_conv(n.op, args[0]) if _symmetric_conv(n.op) else n.op.forward(*args)
        return values[g.output]


def _symmetric_conv(op) -> bool:
    if not isinstance(op, Conv) or op.weight.dim() not in (3, 4, 5):
        return False
    d = len(op.pads) // 2
    return tuple(op.pads[:d]) == tuple(op.pads[d:])


def _native_conv(op, x: torch.Tensor) -> torch.Tensor:
    from torch.nn import functional as F

    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[op.weight.dim()]
    d = len(op.pads) // 2
    return conv(x, op.weight, op.bias, stride=op.stride, padding=tuple(op.pads[:d]), dilation=op.dilation,
                groups=op.groups)


def _example(input_shape) -> torch.Tensor:
    return torch.zeros((2,) + tuple(input_shape), dtype=torch.float32)


def onnx_bytes(module: torch.nn.Module, input_shape) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (_example(input_shape),), buf, dynamo=False, opset_version=EXPORT_OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buf.getvalue()


def torchscript_bytes(module: torch.nn.Module, input_shape) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), (_example(input_shape),), check_trace=False)
        torch.jit.save(traced, buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# safetensors: map the IR's trainable nodes back to the spec's tensors
# ------------------------------------------------------------------------------------------------

def _spec_layers(layers):
    """Spec layers in forward order, residual bodies inlined (the IR order of trainable nodes)."""
    for layer in layers:
        if layer.get("type") == "residual":
            yield from _spec_layers(layer.get("layers", []))
        else:
            yield layer


def bn_scale(layer: dict, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm spec layer, in float64."""
    var = tensors[layer["running_var"]].double()
    mean = tensors[layer["running_mean"]].double()
    w = tensors[layer["weight"]].double() if layer.get("weight") else torch.ones_like(var)
    b = tensors[layer["bias"]].double() if layer.get("bias") else torch.zeros_like(var)
    scale = w / torch.sqrt(var + float(layer.get("eps", 1e-5)))
    return scale, b - mean * scale


def map_spec(trainable, spec: dict, tensors: dict) -> list[dict]:
    """For each trainable IR node (in order): the spec tensors it came from, checked by value.

    Returns entries {"layer": spec layer, "bn": following batchnorm layer or None}. Raises
    UserInputError when the correspondence cannot be established (e.g. layers merged by the IR).
    """
    flat = list(_spec_layers(spec["layers"]))
    entries = []
    for i, layer in enumerate(flat):
        if layer.get("type") in ("linear", "conv1d", "conv2d"):
            nxt = flat[i + 1] if i + 1 < len(flat) else None
            entries.append({"layer": layer, "bn": nxt if nxt is not None and nxt.get("type") == "batchnorm" else None})
    if len(entries) != len(trainable):
        raise UserInputError(f"cannot map the {len(trainable)} trained layers back onto the spec's "
                             f"{len(entries)} linear/conv layers; fine-tune the ONNX or TorchScript file instead")
    for node, e in zip(trainable, entries):
        w = tensors[e["layer"]["weight"]].double()
        if e["bn"] is not None:
            s, _ = bn_scale(e["bn"], tensors)
            w = w * s.reshape((-1,) + (1,) * (w.dim() - 1))
        w_ir = node.op.weight.detach().double()
        if w.shape != w_ir.shape or not torch.allclose(w, w_ir, rtol=1e-5, atol=1e-7 * float(w.abs().max() or 1)):
            raise UserInputError(f"spec layer {e['layer']['weight']!r} does not match the extracted network; "
                                 "fine-tune the ONNX or TorchScript file instead")
    return entries


def safetensors_bytes(trainable, entries, tensors: dict, metadata: dict | None) -> bytes:
    from safetensors.torch import save

    out = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    for node, e in zip(trainable, entries):
        layer, bn = e["layer"], e["bn"]
        dtype = tensors[layer["weight"]].dtype
        out[layer["weight"]] = node.op.weight.detach().to(dtype).contiguous().clone()
        bias = node.op.bias.detach() if node.op.bias is not None else None
        if bn is not None:  # identity BatchNorm; the folded bias goes to the layer, or to BN when the layer has none
            var = tensors[bn["running_var"]]
            eps = float(bn.get("eps", 1e-5))
            out[bn["running_mean"]] = torch.zeros_like(var)
            if not bn.get("weight"):
                raise UserInputError("a spec BatchNorm without a weight tensor cannot be written back as the identity")
            out[bn["weight"]] = torch.sqrt(var.double() + eps).to(var.dtype)
            if layer.get("bias"):
                if bn.get("bias"):
                    out[bn["bias"]] = torch.zeros_like(var)
            elif bn.get("bias"):
                out[bn["bias"]] = (bias if bias is not None else torch.zeros_like(var)).to(var.dtype).clone()
                bias = None
            elif bias is not None and bool((bias != 0).any()):
                raise UserInputError("the trained layer has a bias but the spec has nowhere to store it")
        if layer.get("bias") and bias is not None:
            out[layer["bias"]] = bias.to(tensors[layer["bias"]].dtype).contiguous().clone()
        elif bias is not None and not layer.get("bias") and bn is None and bool((bias != 0).any()):
            raise UserInputError(f"layer {layer['weight']!r} has no bias in the spec but the trained network has one")
    return save(out, metadata=metadata or None)


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def write_model(fmt: str, module, input_shape, out: Path, *, tensors=None, entries=None, spec=None,
                metadata=None) -> list[Path]:
    """Write ``module`` (a TrainableGraph) to ``out`` in ``fmt``; returns the files written."""
    if fmt == "onnx":
        atomic_write_bytes(out, onnx_bytes(ExportForward(module), input_shape))
        return [out]
    if fmt == "torchscript":
        atomic_write_bytes(out, torchscript_bytes(ExportForward(module), input_shape))
        return [out]
    if fmt == "safetensors":
        atomic_write_bytes(out, safetensors_bytes(module.trainable, entries, tensors, metadata))
        sp = spec_path_for(out)
        atomic_write_text(sp, json.dumps(spec, indent=2) + "\n")
        return [out, sp]
    raise UserInputError(f"fine-tune cannot write the {fmt!r} format (supported: ONNX, TorchScript, safetensors)")


def scale_last_layer(module, factor: float) -> str:
    """Exact final correction: multiply the output layer (weight and bias) by ``factor``.

    When the IR's output is produced by a trainable layer followed only by shape ops, f scales by
    ``factor`` exactly: every certified bound scales with it and the predicted class (argmax) is
    unchanged. Otherwise every trainable layer is scaled by factor^(1/n) (exact for positively
    homogeneous networks without biases; the caller re-certifies either way).
    """
    g = module.graph
    node = g.node(g.output)
    while not isinstance(node.op, (Dense, Conv)) and node.op.kind in ("Reshape", "Transpose") and node.inputs:
        if node.inputs[0] == g.input_name:
            break
        node = g.node(node.inputs[0])
    with torch.no_grad():
        if isinstance(node.op, (Dense, Conv)) and node in module.trainable:
            node.op.weight.mul_(factor)
            if node.op.bias is not None:
                node.op.bias.mul_(factor)
            return f"output layer scaled by {factor:.6g}"
        c = factor ** (1.0 / len(module.trainable))
        for n in module.trainable:
            n.op.weight.mul_(c)
        return f"every layer scaled by {c:.6g}"


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
