"""A small JSON architecture spec for weights stored in a .safetensors file.

A .safetensors file holds named tensors but not the network that uses them. The spec
(docs/spec-format.md) says which layers, in which order, read which tensors:

    {"format": "lipverify-spec", "version": 1, "input_shape": [1, 8, 8],
     "layers": [{"type": "flatten"}, {"type": "linear", "weight": "fc1.weight", "bias": "fc1.bias"},
                {"type": "relu"}, ...]}

Without a spec, :func:`infer_mlp_spec` recognises the common case (a chain of dense layers
``*.weight``/``*.bias``) and says exactly what it assumed, because an unstated guess (say, ReLU
where the model used tanh) would certify a different network.

The built module uses only standard torch modules (``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.ZeroPad2d``, ...) plus :class:`Residual`, so it exports to ONNX like any torch model. Each
spec layer is exactly one child of an ``nn.Sequential``, which lets :func:`module_spec_tensors`
map a (fine-tuned) module back to the spec's tensor names without any stored bookkeeping.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from lipverify.errors import UserInputError

FORMAT = "lipverify-spec"
VERSION = 1

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "elu", "gelu", "silu", "softplus")

# type -> {key: (kind, required, default)}; kinds: "tensor", "int", "float", "padding", "str"
_INT_POS = "int>0"
_INT_NONNEG = "int>=0"
_SCHEMA: dict[str, dict[str, tuple[str, bool, Any]]] = {
    "flatten": {},
    "linear": {"weight": ("tensor", True, None), "bias": ("tensor", False, None)},
    "conv1d": {
        "weight": ("tensor", True, None), "bias": ("tensor", False, None),
        "stride": (_INT_POS, False, 1), "padding": ("padding", False, 0),
        "dilation": (_INT_POS, False, 1), "groups": (_INT_POS, False, 1),
    },
    "conv2d": {
        "weight": ("tensor", True, None), "bias": ("tensor", False, None),
        "stride": ("pair>0", False, 1), "padding": ("padding", False, 0),
        "dilation": ("pair>0", False, 1), "groups": (_INT_POS, False, 1),
    },
    "batchnorm": {
        "weight": ("tensor", False, None), "bias": ("tensor", False, None),
        "running_mean": ("tensor", True, None), "running_var": ("tensor", True, None),
        "eps": ("float>0", False, 1e-5),
    },
    "maxpool2d": {"kernel_size": ("pair>0", True, None), "stride": ("pair>0", False, None),
                  "padding": ("pair>=0", False, 0)},
    "avgpool2d": {"kernel_size": ("pair>0", True, None), "stride": ("pair>0", False, None),
                  "padding": ("pair>=0", False, 0), "count_include_pad": ("bool", False, True)},
    "global_avgpool": {},
    "residual": {"layers": ("layers", True, None)},
    "relu": {},
    "leaky_relu": {"negative_slope": ("float", False, 0.01)},
    "tanh": {},
    "sigmoid": {},
    "elu": {"alpha": ("float>0", False, 1.0)},
    "gelu": {"approximate": ("str:none|tanh", False, "none")},
    "silu": {},
    "softplus": {"beta": ("float>0", False, 1.0), "threshold": ("float>0", False, 20.0)},
}
LAYER_TYPES = tuple(_SCHEMA)


class Residual(nn.Module):
    """``y = x + body(x)``; ``body`` is an ``nn.Sequential`` built from the nested layers."""

    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_value(where: str, key: str, kind: str, value: Any) -> Any:
    bad = UserInputError(f"spec {where}: {key!r} = {value!r} is not {_describe(kind)}")
    if kind == "tensor":
        if not isinstance(value, str) or not value:
            raise bad
        return value
    if kind in (_INT_POS, _INT_NONNEG):
        if not _is_int(value) or value < (1 if kind == _INT_POS else 0):
            raise bad
        return value
    if kind in ("pair>0", "pair>=0"):
        low = 1 if kind == "pair>0" else 0
        items = [value] if _is_int(value) else value
        if not isinstance(items, list) or len(items) not in (1, 2) or not all(_is_int(v) and v >= low for v in items):
            raise bad
        return value
    if kind == "padding":
        items = [value] if _is_int(value) else value
        if not isinstance(items, list) or len(items) not in (1, 2, 4) or not all(_is_int(v) and v >= 0 for v in items):
            raise bad
        return value
    if kind == "float":
        if not _is_num(value):
            raise bad
        return float(value)
    if kind == "float>0":
        if not _is_num(value) or value <= 0:
            raise bad
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind.startswith("str:"):
        if value not in kind[4:].split("|"):
            raise bad
        return value
    raise AssertionError(kind)


def _describe(kind: str) -> str:
    return {
        "tensor": "a tensor name (non-empty string)",
        _INT_POS: "an integer >= 1",
        _INT_NONNEG: "an integer >= 0",
        "pair>0": "an integer >= 1 or a list of 1-2 such integers",
        "pair>=0": "an integer >= 0 or a list of 1-2 such integers",
        "padding": "an integer >= 0 or a list of 1, 2 or 4 (ONNX order: begins then ends) such integers",
        "float": "a finite number",
        "float>0": "a finite number > 0",
        "bool": "true or false",
    }.get(kind, "one of " + ", ".join(repr(s) for s in kind[4:].split("|")) if kind.startswith("str:") else kind)


def _validate_layers(layers: Any, where: str) -> list[dict]:
    if not isinstance(layers, list) or not layers:
        raise UserInputError(f"spec {where}: 'layers' must be a non-empty list")
    out = []
    for i, layer in enumerate(layers):
        here = f"{where}layers[{i}]"
        if not isinstance(layer, dict):
            raise UserInputError(f"spec {here}: each layer must be a JSON object, got {layer!r}")
        kind = layer.get("type")
        if kind not in _SCHEMA:
            raise UserInputError(
                f"spec {here}: unknown layer type {kind!r}; known types: {', '.join(LAYER_TYPES)}"
            )
        here = f"{here} ({kind})"
        schema = _SCHEMA[kind]
        unknown = sorted(set(layer) - set(schema) - {"type"})
        if unknown:
            allowed = ", ".join(sorted(schema)) or "none"
            raise UserInputError(f"spec {here}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: {allowed})")
        norm: dict[str, Any] = {"type": kind}
        for key, (vkind, required, default) in schema.items():
            if key not in layer or layer[key] is None:
                if required:
                    raise UserInputError(f"spec {here}: missing required key {key!r}")
                if default is not None:
                    norm[key] = default
                continue
            if vkind == "layers":
                norm[key] = _validate_layers(layer[key], f"{here}.")
            else:
                norm[key] = _check_value(here, key, vkind, layer[key])
        out.append(norm)
    return out


def validate_spec(spec: Any) -> dict:
    """Check the structure of a spec (no tensors needed); returns a copy with defaults filled in."""
    if not isinstance(spec, dict):
        raise UserInputError("spec: the top level must be a JSON object")
    if spec.get("format") != FORMAT:
        raise UserInputError(f"spec: 'format' must be {FORMAT!r}, got {spec.get('format')!r}")
    if spec.get("version") != VERSION:
        raise UserInputError(f"spec: unsupported 'version' {spec.get('version')!r} (this lipverify reads {VERSION})")
    unknown = sorted(set(spec) - {"format", "version", "input_shape", "layers", "description"})
    if unknown:
        raise UserInputError(f"spec: unknown top-level key(s) {', '.join(map(repr, unknown))}")
    shape = spec.get("input_shape")
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d >= 1 for d in shape):
        raise UserInputError(
            f"spec: 'input_shape' must be a non-empty list of positive integers (one sample, no batch axis), got {shape!r}"
        )
    out = {"format": FORMAT, "version": VERSION, "input_shape": list(shape),
           "layers": _validate_layers(spec.get("layers"), "")}
    if "description" in spec:
        out["description"] = str(spec["description"])
    return out


def load_spec(path) -> dict:
    """Read and validate a spec file; every problem is a UserInputError naming the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"spec {str(path)!r} is not a UTF-8 text (JSON) file: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise UserInputError(f"cannot read spec {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"spec {str(path)!r} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except RecursionError:
        raise UserInputError(f"spec {str(path)!r} is nested too deeply to read") from None
    try:
        return validate_spec(spec)
    except UserInputError as exc:
        raise UserInputError(f"{path.name}: {exc}") from None
    except RecursionError:
        raise UserInputError(f"spec {str(path)!r}: residual blocks are nested too deeply") from None


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    if _is_int(v):
        return (v, v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _tensor_slots(layer: dict) -> list[tuple[str, str]]:
    """(spec key, torch attribute path inside the layer's module) for every tensor a layer reads."""
    kind = layer["type"]
    if kind == "linear":
        slots = [("weight", "weight"), ("bias", "bias")]
    elif kind in ("conv1d", "conv2d"):
        conv = "1." if _needs_explicit_pad(layer) else ""
        slots = [("weight", conv + "weight"), ("bias", conv + "bias")]
    elif kind == "batchnorm":
        slots = [("weight", "weight"), ("bias", "bias"), ("running_mean", "running_mean"),
                 ("running_var", "running_var")]
    else:
        slots = []
    return [(k, attr) for k, attr in slots if k in layer]


def _walk(layers: Sequence[dict], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(tensor name, state_dict key) for every tensor the spec reads, in order."""
    for i, layer in enumerate(layers):
        if layer["type"] == "residual":
            yield from _walk(layer["layers"], f"{prefix}{i}.body.")
        for key, attr in _tensor_slots(layer):
            yield layer[key], f"{prefix}{i}.{attr}"


def _needs_explicit_pad(layer: dict) -> bool:
    pad = layer.get("padding", 0)
    if _is_int(pad):
        return False
    if layer["type"] == "conv1d":
        return len(pad) == 2 and pad[0] != pad[1]
    return len(pad) == 4 and not (pad[0] == pad[2] and pad[1] == pad[3])


def _conv_padding(layer: dict):
    """Symmetric padding for the conv itself, and the explicit ZeroPad module (or None)."""
    pad = layer.get("padding", 0)
    if _is_int(pad):
        return pad, None
    if layer["type"] == "conv1d":
        if len(pad) == 1 or pad[0] == pad[1]:
            return pad[0], None
        if len(pad) != 2:
            raise UserInputError("conv1d padding must be an integer or [begin, end]")
        return 0, nn.ConstantPad1d((pad[0], pad[1]), 0.0)
    if len(pad) in (1, 2):
        return _pair(pad), None
    top, left, bottom, right = pad  # ONNX order: H begin, W begin, H end, W end
    if top == bottom and left == right:
        return (top, left), None
    return 0, nn.ZeroPad2d((left, right, top, bottom))


class _Builder:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.used: set[str] = set()

    def get(self, where: str, layer: dict, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        name = layer[key]
        if name not in self.tensors:
            close = _close_names(name, self.tensors)
            hint = f"; similar names: {', '.join(close)}" if close else ""
            raise UserInputError(f"spec {where}: {key} tensor {name!r} is not in the weights file{hint}")
        t = self.tensors[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise UserInputError(f"spec {where}: tensor {name!r} has dtype {getattr(t, 'dtype', type(t))}, expected floating point")
        if tuple(t.shape) != tuple(shape):
            raise UserInputError(
                f"spec {where}: {key} tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}"
            )
        if not torch.isfinite(t).all():
            raise UserInputError(f"spec {where}: tensor {name!r} contains NaN or Inf; nothing to certify")
        t32 = t.detach().to(torch.float32)
        if not torch.isfinite(t32).all():
            raise UserInputError(f"spec {where}: tensor {name!r} overflows float32")
        self.used.add(name)
        return t32.clone()

    def layers(self, layers: Sequence[dict], shape: tuple[int, ...], where: str) -> tuple[nn.Sequential, tuple[int, ...]]:
        modules = []
        for i, layer in enumerate(layers):
            here = f"{where}layers[{i}] ({layer['type']})"
            module, shape = self.layer(layer, shape, here)
            modules.append(module)
        return nn.Sequential(*modules), shape

    def layer(self, layer: dict, shape: tuple[int, ...], where: str) -> tuple[nn.Module, tuple[int, ...]]:
        kind = layer["type"]
        if kind == "residual":
            body, out = self.layers(layer["layers"], shape, where + ".")
            if out != shape:
                raise UserInputError(
                    f"spec {where}: the residual body maps shape {list(shape)} to {list(out)}; they must be equal"
                )
            return Residual(body), shape
        # eval() before the shape probe: in train mode BatchNorm would overwrite its running stats
        module = self.make(layer, shape, where).eval()
        try:
            with torch.no_grad():
                out = module(torch.zeros((1,) + shape))
        except RuntimeError as exc:
            msg = str(exc).split("\n")[0]
            raise UserInputError(f"spec {where}: cannot apply to input of shape {list(shape)}: {msg}") from None
        if out.numel() == 0:
            raise UserInputError(f"spec {where}: output for input shape {list(shape)} is empty ({list(out.shape[1:])})")
        return module, tuple(out.shape[1:])

    def make(self, layer: dict, shape: tuple[int, ...], where: str) -> nn.Module:
        kind = layer["type"]
        if kind == "flatten":
            return nn.Flatten()
        if kind == "linear":
            if len(shape) != 1:
                raise UserInputError(
                    f"spec {where}: needs a flat input but gets shape {list(shape)}; add a {{\"type\": \"flatten\"}} layer before it"
                )
            w = self.tensors.get(layer["weight"])
            if isinstance(w, torch.Tensor) and w.dim() != 2:
                raise UserInputError(f"spec {where}: weight tensor {layer['weight']!r} must be 2-D "
                                     f"(out_features, in_features), got shape {list(w.shape)}")
            out_features = int(w.shape[0]) if isinstance(w, torch.Tensor) else 0
            weight = self.get(where, layer, "weight", (out_features, shape[0]))
            m = nn.Linear(shape[0], out_features, bias="bias" in layer)
            with torch.no_grad():
                m.weight.copy_(weight)
                if "bias" in layer:
                    m.bias.copy_(self.get(where, layer, "bias", (out_features,)))
            return m
        if kind in ("conv1d", "conv2d"):
            return self.conv(layer, shape, where)
        if kind == "batchnorm":
            if len(shape) not in (1, 2, 3):
                raise UserInputError(f"spec {where}: batchnorm needs input of rank 1-3 per sample, got {list(shape)}")
            c = shape[0]
            m = (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(
                c, eps=layer["eps"], affine="weight" in layer or "bias" in layer)
            with torch.no_grad():
                m.running_mean.copy_(self.get(where, layer, "running_mean", (c,)))
                var = self.get(where, layer, "running_var", (c,))
                if (var + layer["eps"] <= 0).any():
                    raise UserInputError(f"spec {where}: running_var + eps must be > 0")
                m.running_var.copy_(var)
                if m.affine:
                    m.weight.copy_(self.get(where, layer, "weight", (c,)) if "weight" in layer else torch.ones(c))
                    m.bias.copy_(self.get(where, layer, "bias", (c,)) if "bias" in layer else torch.zeros(c))
            return m
        if kind in ("maxpool2d", "avgpool2d"):
            if len(shape) != 3:
                raise UserInputError(f"spec {where}: needs input (channels, height, width), got {list(shape)}")
            k = _pair(layer["kernel_size"])
            s = _pair(layer.get("stride", layer["kernel_size"]))
            p = _pair(layer.get("padding", 0))
            if p[0] * 2 > k[0] or p[1] * 2 > k[1]:
                raise UserInputError(f"spec {where}: padding {list(p)} must be at most half the kernel {list(k)}")
            if kind == "maxpool2d":
                return nn.MaxPool2d(k, s, p)
            return nn.AvgPool2d(k, s, p, count_include_pad=layer["count_include_pad"])
        if kind == "global_avgpool":
            if len(shape) == 3:
                return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            if len(shape) == 2:
                return nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten())
            raise UserInputError(f"spec {where}: needs input (channels, length) or (channels, h, w), got {list(shape)}")
        return activation_module(layer)

    def conv(self, layer: dict, shape: tuple[int, ...], where: str) -> nn.Module:
        two_d = layer["type"] == "conv2d"
        rank = 3 if two_d else 2
        if len(shape) != rank:
            expected = "(channels, height, width)" if two_d else "(channels, length)"
            raise UserInputError(f"spec {where}: needs input {expected}, got {list(shape)}")
        c_in, groups = shape[0], layer["groups"]
        w = self.tensors.get(layer["weight"])
        if not isinstance(w, torch.Tensor) or w.dim() != rank + 1:
            got = list(w.shape) if isinstance(w, torch.Tensor) else None
            if w is None:
                self.get(where, layer, "weight", ())  # raises "not in the weights file"
            raise UserInputError(
                f"spec {where}: weight tensor {layer['weight']!r} must have {rank + 1} dimensions "
                f"(out_channels, in_channels/groups, kernel...), got shape {got}"
            )
        c_out, kernel = int(w.shape[0]), tuple(int(k) for k in w.shape[2:])
        if c_in % groups or c_out % groups:
            raise UserInputError(f"spec {where}: groups={groups} must divide in_channels={c_in} and out_channels={c_out}")
        weight = self.get(where, layer, "weight", (c_out, c_in // groups) + kernel)
        padding, pad_module = _conv_padding(layer)
        cls = nn.Conv2d if two_d else nn.Conv1d
        stride = _pair(layer["stride"]) if two_d else layer["stride"]
        dilation = _pair(layer["dilation"]) if two_d else layer["dilation"]
        conv = cls(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                   groups=groups, bias="bias" in layer)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if "bias" in layer:
                conv.bias.copy_(self.get(where, layer, "bias", (c_out,)))
        return nn.Sequential(pad_module, conv) if pad_module is not None else conv


def activation_module(layer: dict) -> nn.Module:
    kind = layer["type"]
    if kind == "relu":
        return nn.ReLU()
    if kind == "leaky_relu":
        return nn.LeakyReLU(layer.get("negative_slope", 0.01))
    if kind == "tanh":
        return nn.Tanh()
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "elu":
        return nn.ELU(layer.get("alpha", 1.0))
    if kind == "gelu":
        return nn.GELU(approximate=layer.get("approximate", "none"))
    if kind == "silu":
        return nn.SiLU()
    if kind == "softplus":
        return nn.Softplus(beta=layer.get("beta", 1.0), threshold=layer.get("threshold", 20.0))
    raise UserInputError(f"unknown layer type {kind!r}")


def _close_names(name: str, tensors: dict) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, list(tensors), n=3, cutoff=0.6)


def build_module(spec: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """An eval-mode float32 ``nn.Sequential`` computing the spec with the given tensors.

    Every named tensor must exist, be finite and have the shape its layer needs given the
    shapes flowing through the network from ``input_shape``; otherwise UserInputError naming the
    layer (e.g. ``layers[3] (conv2d)``) and the tensor.
    """
    spec = validate_spec(spec)
    builder = _Builder(tensors)
    module, _ = builder.layers(spec["layers"], tuple(spec["input_shape"]), "")
    return module.float().eval()


def spec_tensor_names(spec: dict) -> list[str]:
    """The tensor names a spec reads, in layer order (each once)."""
    spec = validate_spec(spec)
    return list(dict.fromkeys(name for name, _ in _walk(spec["layers"])))


def module_spec_tensors(module: nn.Module, spec: dict) -> dict[str, torch.Tensor]:
    """The tensors to save for ``module`` (built by :func:`build_module` from ``spec`` and maybe
    fine-tuned since), under the spec's names: ``save_file(module_spec_tensors(m, spec), path)``."""
    spec = validate_spec(spec)
    state = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, key in _walk(spec["layers"]):
        if key not in state:
            raise UserInputError(f"module has no tensor {key!r} for spec tensor {name!r}: was it built from this spec?")
        value = state[key].detach().to("cpu", torch.float32).contiguous().clone()
        if name in out and not torch.equal(out[name], value):
            raise UserInputError(f"spec tensor {name!r} is used twice and the two copies now differ")
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------------
# inference of a dense chain
# ----------------------------------------------------------------------------------------------

_WEIGHT = re.compile(r"^(?P<prefix>.*?)(?:^|(?<=[._/]))weight$")


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _find_chains(items: list[tuple[str, int, int]], limit: int = 2, budget: int = 200_000) -> tuple[list[list[int]], bool]:
    """Orderings of all dense layers whose shapes chain, up to ``limit`` of them; also whether
    the search finished within ``budget`` steps (False: too many equal shapes to decide)."""
    found: list[list[int]] = []
    steps = 0
    n = len(items)

    def extend(path: list[int], used: list[bool]) -> bool:
        nonlocal steps
        steps += 1
        if steps > budget:
            return False
        if len(path) == n:
            found.append(list(path))
            return len(found) < limit
        last_out = items[path[-1]][1] if path else None
        for j in range(n):
            if used[j] or (last_out is not None and items[j][2] != last_out):
                continue
            used[j] = True
            path.append(j)
            go_on = extend(path, used)
            path.pop()
            used[j] = False
            if not go_on:
                return False
        return True

    finished = extend([], [False] * n)
    return found, finished or len(found) >= limit


def infer_mlp_spec(tensors: dict[str, torch.Tensor], activation: str = "relu",
                   input_shape: Optional[Sequence[int]] = None) -> tuple[dict, list[str]]:
    """Guess a dense network from ``*.weight`` (2-D) and ``*.bias`` (1-D) tensors.

    Layers are ordered by natural sort of their names ("fc2" before "fc10") when the shapes chain
    in that order (out_k == in_{k+1}); otherwise by shape if exactly one ordering chains. Every
    floating-point tensor must be used: leftovers (conv kernels, BatchNorm statistics, ...) mean
    the network is not a plain MLP, and guessing would certify a different network.
    Returns the spec and notes saying what was inferred and assumed.
    """
    if activation not in ACTIVATIONS:
        raise UserInputError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    dense: list[tuple[str, int, int]] = []  # (prefix, out, in)
    for name, t in tensors.items():
        m = _WEIGHT.match(name)
        if m and isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point():
            dense.append((m.group("prefix"), int(t.shape[0]), int(t.shape[1])))
    if not dense:
        raise UserInputError(
            "cannot infer the architecture: no 2-D '*.weight' tensors in the file; "
            "write a spec (docs/spec-format.md) and pass it with --spec"
        )
    biases = {}
    for prefix, out, _ in dense:
        b = tensors.get(prefix + "bias")
        if isinstance(b, torch.Tensor):
            if tuple(b.shape) != (out,):
                raise UserInputError(
                    f"cannot infer the architecture: {prefix + 'bias'!r} has shape {list(b.shape)}, "
                    f"but {prefix + 'weight'!r} has {out} outputs"
                )
            biases[prefix] = prefix + "bias"
    used = {p + "weight" for p, _, _ in dense} | set(biases.values())
    leftovers = sorted(n for n, t in tensors.items()
                       if n not in used and isinstance(t, torch.Tensor) and t.is_floating_point())
    if leftovers:
        shown = ", ".join(f"{n} {list(tensors[n].shape)}" for n in leftovers[:6])
        more = f" and {len(leftovers) - 6} more" if len(leftovers) > 6 else ""
        raise UserInputError(
            f"cannot infer the architecture: tensors {shown}{more} do not belong to a chain of dense "
            "layers; write a spec (docs/spec-format.md) and pass it with --spec"
        )

    by_name = sorted(dense, key=lambda d: _natural_key(d[0]))
    chains_by_name = all(a[1] == b[2] for a, b in zip(by_name, by_name[1:]))
    if chains_by_name:
        ordered, how = by_name, "by name (natural sort)"
    else:
        chains, finished = _find_chains(by_name)
        if not finished:
            raise UserInputError("cannot infer the layer order: too many layers of equal shape; write a spec")
        if not chains:
            desc = ", ".join(f"{p + 'weight'} {o}x{i}" for p, o, i in by_name)
            raise UserInputError(f"cannot infer the architecture: the weight shapes do not chain ({desc}); write a spec")
        if len(chains) > 1:
            raise UserInputError(
                "cannot infer the layer order: names do not give a consistent order and several orders "
                "fit the shapes; write a spec (docs/spec-format.md)"
            )
        ordered, how = [by_name[j] for j in chains[0]], "by shape (the name order does not chain)"

    notes = []
    in_features = ordered[0][2]
    if input_shape is None:
        shape = [in_features]
    else:
        shape = [int(d) for d in input_shape]
        if math.prod(shape) != in_features:
            raise UserInputError(
                f"input shape {shape} has {math.prod(shape)} values but the first layer "
                f"{ordered[0][0] + 'weight'!r} takes {in_features}"
            )
    layers: list[dict] = [{"type": "flatten"}] if len(shape) > 1 else []
    act: dict = {"type": activation}
    if activation == "leaky_relu":
        act["negative_slope"] = 0.01
    for k, (prefix, _, _) in enumerate(ordered):
        layer = {"type": "linear", "weight": prefix + "weight"}
        if prefix in biases:
            layer["bias"] = biases[prefix]
        layers.append(layer)
        if k < len(ordered) - 1:
            layers.append(dict(act))
    spec = validate_spec({"format": FORMAT, "version": VERSION, "input_shape": shape, "layers": layers})
    widths = " -> ".join([str(in_features)] + [str(o) for _, o, _ in ordered])
    notes.append(
        f"no spec given: inferred a {len(ordered)}-layer dense network {widths} from "
        f"{', '.join(p + 'weight' for p, _, _ in ordered)}, ordered {how}"
    )
    act_text = activation + (" (negative_slope 0.01)" if activation == "leaky_relu" else "")
    if len(ordered) > 1:
        notes.append(
            f"assumed activation: {act_text} after every layer but the last; if the model uses another, "
            "pass --activation or write a spec (docs/spec-format.md)"
        )
    missing = [p + "weight" for p, _, _ in ordered if p not in biases]
    if missing:
        notes.append(f"no bias for {', '.join(missing)}")
    if len(shape) > 1:
        notes.append(f"input shape {shape} is flattened before the first layer")
    return spec, notes


# ----------------------------------------------------------------------------------------------
# file loading
# ----------------------------------------------------------------------------------------------


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a missing or corrupt file is a UserInputError."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"weights file {str(path)!r} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ValueError: all "bad file"
        raise UserInputError(f"cannot read {path.name} as safetensors: {type(exc).__name__}: {exc}") from exc


def load_safetensors_model(path, spec_path=None, activation: str = "relu",
                           input_shape: Optional[Sequence[int]] = None) -> tuple[nn.Module, dict, list[str]]:
    """Build the network stored in a .safetensors file.

    The architecture comes from ``spec_path``, else ``<stem>.json`` beside the weights, else
    :func:`infer_mlp_spec` (with ``activation``). ``input_shape`` overrides the spec's (e.g. a
    fully convolutional network applied to larger images). Returns (module, spec, notes).
    """
    path = Path(path)
    tensors = read_safetensors(path)
    notes: list[str] = []
    beside = path.with_suffix(".json")
    if spec_path is not None:
        spec = load_spec(spec_path)
        notes.append(f"architecture from spec {Path(spec_path).name}")
    elif beside.is_file():
        spec = load_spec(beside)
        notes.append(f"architecture from spec {beside.name} found beside the weights")
    else:
        spec, inferred = infer_mlp_spec(tensors, activation=activation, input_shape=input_shape)
        notes.extend(inferred)
    if input_shape is not None and list(input_shape) != spec["input_shape"]:
        notes.append(f"input shape {list(input_shape)} given; the spec says {spec['input_shape']}; using {list(input_shape)}")
        spec = dict(spec, input_shape=[int(d) for d in input_shape])
    module = build_module(spec, tensors)
    used = set(spec_tensor_names(spec))
    unused = sorted(n for n in tensors if n not in used)
    if unused:
        notes.append(f"tensors in the file not used by the spec: {', '.join(unused[:8])}"
                     + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
    converted = sorted({str(tensors[n].dtype).replace("torch.", "") for n in used if tensors[n].dtype != torch.float32})
    if converted:
        notes.append(f"weights stored as {', '.join(converted)} were converted to float32; the certificate is for the float32 network")
    return module, spec, notes
