"""Memory guard: refuse a model that would need more than ``--budget-mem`` before allocating it.

The estimates are deliberately generous (they count float64 copies of weights and activations for
the probe run, the bounds and the lower-bound search), so a model accepted here fits in practice.
"""

from __future__ import annotations

import math
import re

import onnx

from lipverify.errors import UserInputError
from lipverify.graph.ir import Graph

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40}
LOWER_BOUND_BATCH = 16


def parse_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", str(text).upper())
    if not m:
        raise UserInputError(f"--budget-mem {text!r}: expected a size such as 512M or 8G")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value <= 0:
        raise UserInputError("--budget-mem must be positive")
    return int(value)


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def estimate_model(model: onnx.ModelProto, input_shape) -> int:
    """Before extraction: weights (kept in float32 and float64) and a generous activation allowance."""
    weights = 0
    for init in model.graph.initializer:
        dims = math.prod(init.dims) if init.dims else 1
        weights += dims
    per_sample = math.prod(input_shape) if input_shape else 0
    # the probe batch of 2 with every intermediate kept: assume activations up to 64x the input per sample
    return int(weights * 12 + per_sample * 2 * 64 * 4)


def estimate_graph(graph: Graph) -> int:
    """After extraction: weights in float64 and the activations of the lower-bound search (jvp + vjp)."""
    weights = sum(t.numel() for n in graph.nodes for t in vars(n.op).values() if hasattr(t, "numel"))
    activations = sum(math.prod(n.out_shape) for n in graph.nodes) + math.prod(graph.input_shape)
    return int(weights * 8 * 3 + activations * LOWER_BOUND_BATCH * 8 * 4)


def guard(estimate: int, budget: int | None, what: str) -> None:
    if budget is not None and estimate > budget:
        raise UserInputError(f"{what} would need about {_fmt(estimate)}, more than --budget-mem {_fmt(budget)}; "
                             "refusing before allocating it")
