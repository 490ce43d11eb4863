"""onnx2torch 1.5.15, made usable here: no torchvision needed, and the converters it lacks.

Optional: lipverify's own pipeline (extraction, bounds, fine-tuning) never uses onnx2torch. It is not
a dependency because pip would install its torchvision requirement, and the torchvision that matches
torch 2.13.0 on PyPI fails on import ("operator torchvision::nms does not exist"), breaking other code
in the user's environment. Install it with ``pip install --no-deps onnx2torch`` to use this module.

Two problems with onnx2torch as installed by the project's pins (design notes, section 7):

1. ``import onnx2torch`` imports torchvision, only for its NonMaxSuppression and RoiAlign
   converters. With the torch pin, pip picks a torchvision whose import raises
   ``RuntimeError: operator torchvision::nms does not exist``; elsewhere torchvision may be
   missing. A Lipschitz bound never involves NMS or RoiAlign (they are not even continuous), so
   :func:`import_onnx2torch` lets onnx2torch import against a stand-in whose functions raise.

2. Its converter registry stops at older opsets: ReduceMean-18 (axes moved to an input),
   Reshape-19/21 and ``allowzero=1``, Gelu-20, Pad-18 (``axes`` input) and the many
   "type-only" version bumps at opsets 19-25 (Constant-19, Shape-19, Flatten-21, ...), so
   models written by current torch exporters at opset >= 18 do not convert. We register those
   converters in onnx2torch's own registry (``onnx2torch.node_converters.registry``), reusing
   onnx2torch's module classes where the semantics are unchanged so that later stages see one
   vocabulary of modules.

:func:`convert_onnx` is the entry point: it always returns a module in eval mode (onnx2torch
returns train mode, which would make BatchNorm update its running statistics and Dropout
drop), and turns "no converter" failures into :class:`UnsupportedOperationError` naming the node.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Any, List, Optional, Union

import onnx
import torch
from torch import nn

from lipverify.errors import UnsupportedOperationError, UserInputError

_LOCK = threading.Lock()
_TORCHVISION_STATUS: Optional[str] = None
_REGISTERED = False

# The newest opset whose converters we register. Versions above it are left to onnx2torch and
# fail with a clear UnsupportedOperationError instead of being guessed.
MAX_ALIASED_OPSET = 25


# ----------------------------------------------------------------------------------------------
# 1. Importing onnx2torch without a working torchvision
# ----------------------------------------------------------------------------------------------


def _stand_in_torchvision(reason: str) -> types.ModuleType:
    """A minimal ``torchvision`` with exactly what onnx2torch 1.5.15 touches.

    onnx2torch/node_converters/nms.py does ``import torchvision`` and, inside a forward pass,
    calls ``torchvision.ops.nms`` and ``torchvision.ops.box_convert``; roialign.py does
    ``from torchvision.ops import roi_align`` at import time. Nothing else. Each function here
    raises, so a model that really contains NMS/RoiAlign fails loudly instead of computing garbage.
    """

    def _unavailable(name: str):
        def fn(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(
                f"torchvision.ops.{name} is unavailable ({reason}); lipverify only loaded a "
                "stand-in so that onnx2torch could be imported. Lipschitz bounds never need "
                "NonMaxSuppression or RoiAlign."
            )

        fn.__name__ = name
        return fn

    package = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    for name in ("nms", "roi_align", "box_convert"):
        setattr(ops, name, _unavailable(name))
    # A spec keeps importlib.util.find_spec("torchvision") from raising ValueError while the
    # stand-in is in sys.modules (the dynamo ONNX exporter calls it).
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    ops.__spec__ = importlib.machinery.ModuleSpec("torchvision.ops", None)
    package.__path__ = []
    package.ops = ops
    package.__lipverify_stand_in__ = True
    return package


def _forget_torchvision() -> None:
    """Drop every ``torchvision*`` entry from sys.modules (a failed import leaves some behind)."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_onnx2torch() -> types.ModuleType:
    """Return the ``onnx2torch`` module, whether torchvision is missing, broken or fine.

    If ``import torchvision`` fails for any reason, onnx2torch is imported against a stand-in
    (see :func:`_stand_in_torchvision`), and the stand-in is removed from ``sys.modules`` right
    after, so other code importing torchvision still sees the truth. Also registers our extra
    converters (idempotent).
    """
    global _TORCHVISION_STATUS
    if importlib.util.find_spec("onnx2torch") is None:
        raise UserInputError("onnx2torch is not installed (it is optional: lipverify itself never needs it); install "
                             "it without its torchvision requirement: pip install --no-deps onnx2torch")
    with _LOCK:
        if "onnx2torch" not in sys.modules:
            try:
                import torchvision  # noqa: F401  (only to learn whether it imports)
            except Exception as exc:  # noqa: BLE001 - "broken" comes in many exception types
                if isinstance(exc, ModuleNotFoundError) and exc.name == "torchvision":
                    reason = "torchvision is not installed"
                else:
                    reason = f"torchvision failed to import: {type(exc).__name__}: {exc}"
            else:
                reason = None
            if reason is None:
                _TORCHVISION_STATUS = "ok"
                import onnx2torch  # noqa: F401
            else:
                _TORCHVISION_STATUS = reason
                _forget_torchvision()
                stand_in = _stand_in_torchvision(reason)
                sys.modules["torchvision"] = stand_in
                sys.modules["torchvision.ops"] = stand_in.ops
                try:
                    import onnx2torch  # noqa: F401
                finally:
                    # onnx2torch keeps its own references; everyone else sees the truth again
                    if sys.modules.get("torchvision") is stand_in:
                        del sys.modules["torchvision"]
                    if sys.modules.get("torchvision.ops") is stand_in.ops:
                        del sys.modules["torchvision.ops"]
        elif _TORCHVISION_STATUS is None:
            _TORCHVISION_STATUS = "unknown (onnx2torch was imported before lipverify)"
        _register_converters()
        return sys.modules["onnx2torch"]


def torchvision_status() -> str:
    """``"ok"`` or why the stand-in was used; for diagnostics (e.g. a ``--version`` report)."""
    import_onnx2torch()
    return _TORCHVISION_STATUS or "unknown"


# ----------------------------------------------------------------------------------------------
# 2. Extra converters
# ----------------------------------------------------------------------------------------------


class OnnxGelu(nn.GELU):
    """ONNX Gelu-20 (``approximate`` = "none" or "tanh"): exactly ``torch.nn.GELU``."""


def _const_ints(name: str, graph) -> Optional[List[int]]:
    """The value of a constant input (initializer or Constant node) as ints, else None."""
    from onnx2torch.utils.common import get_const_value

    if not name:
        return None
    try:
        value = get_const_value(name, graph)
    except KeyError:
        return None
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _mapping(inputs, outputs):
    from onnx2torch.utils.common import OnnxMapping

    return OnnxMapping(inputs=tuple(inputs), outputs=tuple(outputs))


def _strip_empty_tail(values) -> tuple:
    values = list(values)
    while values and not values[-1]:
        values.pop()
    return tuple(values)


def _convert_reduce_mean_18(node, graph):
    """ReduceMean-18: ``axes`` is an optional *input*; ``noop_with_empty_axes`` attribute."""
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.utils.common import OperationConverterResult

    keepdims = node.attributes.get("keepdims", 1)
    noop = node.attributes.get("noop_with_empty_axes", 0)
    axes_name = node.input_values[1] if len(node.input_values) > 1 else ""
    axes = _const_ints(axes_name, graph) if axes_name else []
    if axes is None:
        raise NotImplementedError(
            f"ReduceMean node {node.name!r}: axes computed at run time are not supported"
        )
    if not axes and noop == 1:
        module: nn.Module = nn.Identity()
    else:
        module = OnnxReduceStaticAxes("ReduceMean", axes=axes or None, keepdims=keepdims)
    return OperationConverterResult(
        torch_module=module, onnx_mapping=_mapping(node.input_values[:1], node.output_values)
    )


def _reshape_module_class():
    """``OnnxReshape`` plus ``allowzero=1`` (a 0 in the shape means size 0, not "copy")."""
    from onnx2torch.node_converters.reshape import OnnxReshape

    class OnnxReshapeAllowZero(OnnxReshape):
        @staticmethod
        def _do_reshape(input_tensor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
            return torch.reshape(input_tensor, [int(s) for s in shape.tolist()])

    return OnnxReshape, OnnxReshapeAllowZero


def _convert_reshape(node, graph):
    """Reshape-14/19/21/23+: same operator; ``allowzero=1`` handled instead of refused."""
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    del graph
    plain, allow_zero = _reshape_module_class()
    module = allow_zero() if node.attributes.get("allowzero", 0) == 1 else plain()
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


def _convert_gelu(node, graph):
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    del graph
    approximate = node.attributes.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f"Gelu node {node.name!r}: approximate={approximate!r}")
    return OperationConverterResult(
        torch_module=OnnxGelu(approximate=approximate), onnx_mapping=onnx_mapping_from_node(node)
    )


def _convert_pad_18(node, graph):
    """Pad-18+: optional ``axes`` input saying which dimensions ``pads`` refers to.

    Constant pads/axes (what exporters write) become onnx2torch's ``OnnxPadStatic``; without
    ``axes`` we defer to onnx2torch's Pad-13 module, which reads ``pads`` at run time.
    """
    from onnx2torch.node_converters.pad import OnnxPadDynamic, OnnxPadStatic, _onnx_to_torch_mode
    from onnx2torch.utils.common import OperationConverterResult, get_const_value

    mode = node.attributes.get("mode", "constant")
    _onnx_to_torch_mode(mode)  # raises NotImplementedError for e.g. "wrap"
    inputs = _strip_empty_tail(node.input_values)
    axes_name = inputs[3] if len(inputs) > 3 else ""
    if not axes_name:
        return OperationConverterResult(
            torch_module=OnnxPadDynamic(mode=_onnx_to_torch_mode(mode)),
            onnx_mapping=_mapping(inputs[:3], node.output_values),
        )
    pads = _const_ints(inputs[1], graph)
    axes = _const_ints(axes_name, graph)
    rank = len(graph.value_info[inputs[0]].type.tensor_type.shape.dim) if inputs[0] in graph.value_info else 0
    value = 0.0
    if len(inputs) > 2 and inputs[2]:
        try:
            value = float(get_const_value(inputs[2], graph))
        except KeyError:
            value = None
    if pads is None or axes is None or value is None or rank == 0:
        raise NotImplementedError(
            f"Pad node {node.name!r}: axes input needs constant pads/axes/value and a known rank"
        )
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        axis = axis + rank if axis < 0 else axis
        full[axis] = pads[i]
        full[axis + rank] = pads[i + len(axes)]
    module = OnnxPadStatic.create_from_onnx_params(onnx_pads=full, onnx_mode=mode, constant_value=value)
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(inputs[:1], node.output_values))


def _convert_average_pool_19(node, graph):
    """AveragePool-19 added ``dilations``; torch's average pooling has none, so refuse != 1."""
    from onnx2torch.node_converters.registry import get_converter

    dilations = node.attributes.get("dilations")
    if dilations is not None and any(int(d) != 1 for d in dilations):
        raise NotImplementedError(f"AveragePool node {node.name!r}: dilations {list(dilations)} != 1")
    return get_converter("AveragePool", 11)(node, graph)


# op -> (version onnx2torch implements, later versions whose schema changes only add tensor
# types). Checked against onnx.defs: same attributes and inputs. Cast-19/24 add ``saturate`` /
# ``round_mode``, which only matter for float8/float4 targets that onnx2torch refuses anyway.
_TYPE_ONLY_BUMPS = {
    "Conv": (11, [22]),
    "Elu": (6, [22]),
    "Softplus": (1, [22]),
    "MaxPool": (12, [22]),
    "GlobalAveragePool": (1, [22]),
    "Dropout": (13, [22]),
    "Flatten": (13, [21, 23, 24, 25]),
    "Transpose": (13, [21, 23, 24, 25]),
    "Identity": (16, [19, 21, 23, 24, 25]),
    "Constant": (13, [19, 21, 23, 24, 25]),
    "Shape": (15, [19, 21, 23, 24, 25]),
    "Unsqueeze": (13, [21, 23, 24, 25]),
    "Squeeze": (21, [23, 24, 25]),
    "Cast": (13, [19, 21, 23, 24, 25]),
    "ConstantOfShape": (9, [20, 21, 23, 24, 25]),
    "Equal": (13, [19]),
}

# New converters: op -> (function, versions).
_NEW_CONVERTERS = {
    "ReduceMean": (_convert_reduce_mean_18, [18]),
    "Reshape": (_convert_reshape, [19, 21, 23, 24, 25]),
    "Gelu": (_convert_gelu, [20]),
    "Pad": (_convert_pad_18, [18, 19, 21, 23, 24, 25]),
    "AveragePool": (_convert_average_pool_19, [19, 22]),
}


def _register_converters() -> None:
    """Add our converters to onnx2torch's registry, never replacing one it already has
    (a newer onnx2torch may implement them itself) except Reshape-14, whose original refuses
    ``allowzero=1`` and which ours extends without changing the ``allowzero=0`` module."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnx import defs
    from onnx2torch.node_converters import registry

    def add(op: str, version: int, fn) -> None:
        key = registry.OperationDescription(domain=defs.ONNX_DOMAIN, operation_type=op, version=version)
        if key not in registry._CONVERTER_REGISTRY:  # noqa: SLF001 - the registry is a dict
            registry.add_converter(operation_type=op, version=version)(fn)

    for op, (base, versions) in _TYPE_ONLY_BUMPS.items():
        original = registry.get_converter(op, base)
        for version in versions:
            add(op, version, original)
    for op, (fn, versions) in _NEW_CONVERTERS.items():
        for version in versions:
            add(op, version, fn)
    key14 = registry.OperationDescription(domain=defs.ONNX_DOMAIN, operation_type="Reshape", version=14)
    registry._CONVERTER_REGISTRY[key14] = _convert_reshape  # noqa: SLF001
    _REGISTERED = True


# ----------------------------------------------------------------------------------------------
# 3. Conversion
# ----------------------------------------------------------------------------------------------


def _opset(model: onnx.ModelProto, domain: str) -> Optional[int]:
    for entry in model.opset_import:
        if entry.domain == domain or (domain == "" and entry.domain == "ai.onnx"):
            return int(entry.version)
    return None


def _check_converters_exist(model: onnx.ModelProto) -> None:
    """Name the first node that no converter handles, before onnx2torch's anonymous error."""
    from onnx2torch.node_converters.registry import get_converter

    for node in model.graph.node:
        version = _opset(model, node.domain)
        if version is None:
            raise UnsupportedOperationError(node.op_type, node.name, f"domain {node.domain!r} not imported")
        try:
            get_converter(operation_type=node.op_type, version=version, domain=node.domain)
        except NotImplementedError:
            raise UnsupportedOperationError(
                node.op_type, node.name, f"no converter at opset {version} (domain {node.domain!r})"
            ) from None


def _locate_failing_node(model: onnx.ModelProto, exc: Exception) -> UnsupportedOperationError:
    """Re-run each node's converter alone to name the node that raised ``exc``."""
    from onnx2torch.node_converters.registry import get_converter
    from onnx2torch.onnx_graph import OnnxGraph

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        graph = OnnxGraph(inferred.graph)
        for node in graph.nodes.values():
            version = _opset(model, node.domain)
            try:
                get_converter(node.operation_type, version, node.domain)(node, graph)
            except NotImplementedError as inner:
                return UnsupportedOperationError(node.operation_type, node.name, str(inner))
    except Exception:  # noqa: BLE001 - diagnostics only; fall through to the generic message
        pass
    return UnsupportedOperationError("?", "?", str(exc))


def convert_onnx(model: Union[onnx.ModelProto, str, Path]) -> torch.nn.Module:
    """Convert an ONNX model to a torch ``fx.GraphModule`` in eval mode.

    Accepts a ModelProto (external data already loaded, as ``onnx.load`` does) or a path.
    Raises :class:`UnsupportedOperationError` naming the node when an operation has no converter
    and :class:`UserInputError` when the file cannot be read.
    """
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model))
        except Exception as exc:  # noqa: BLE001 - protobuf/OSError/...: all mean "bad file"
            raise UserInputError(f"cannot read ONNX model {str(model)!r}: {exc}") from exc
    o2t = import_onnx2torch()
    _check_converters_exist(model)
    try:
        module = o2t.convert(model)
    except NotImplementedError as exc:
        raise _locate_failing_node(model, exc) from exc
    return module.eval()
