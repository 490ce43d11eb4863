"""ONNX operator converters: one small function per ONNX op type, registered by name.

A converter receives a ``NodeView`` (the ONNX node, its constant inputs, the per-sample shapes
onnxruntime observed) and emits IR nodes whose semantics are exactly the op's for the shapes at hand,
broadcasting included, or refuses the node with a reason (``v.unsupported``). Adding support for an
ONNX op = adding one function here (and, if it is a new kind of operation, one class in
``lipverify/ops``). Axes go through ``v.sample_axis`` (which refuses the batch axis) and constant
operands through ``v.sample_const`` (which refuses constants that vary along or move the batch axis).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from lipverify.graph.ir import Node
from lipverify.ops.activation import (CELU, ELU, GELU, SELU, Abs, Clip, HardSigmoid, HardSwish, LeakyReLU, Mish,
                                      PReLU, ReLU, Sigmoid, Softplus, Softsign, Tanh)
from lipverify.ops.conv import Conv, ConvTranspose
from lipverify.ops.dense import Dense, LeftMatMul, Scale, Shift
from lipverify.ops.merge import Add, Concat, Sub
from lipverify.ops.pool import AvgPool, MaxPool, Reduce
from lipverify.ops.shape import Broadcast, Pad, Reshape, Slice, Tile, Transpose
from lipverify.ops.softmax import Softmax

CONVERTERS: dict[str, Callable] = {}

# why common unsupported ops are unsupported (shown with the node's name)
HINTS = {
    "LSTM": "a recurrent layer (LSTM): its gates multiply input-dependent tensors, which is not globally Lipschitz",
    "GRU": "a recurrent layer (GRU): its gates multiply input-dependent tensors, which is not globally Lipschitz",
    "RNN": "a recurrent layer (RNN) is not supported; unroll it into Gemm + activation layers",
    "Round": "rounds its input (quantisation is not Lipschitz)",
    "Floor": "rounds its input (quantisation is not Lipschitz)",
    "Ceil": "rounds its input (quantisation is not Lipschitz)",
    "Sign": "a step function (not Lipschitz)",
    "QuantizeLinear": "quantises its input (not Lipschitz)",
    "DequantizeLinear": "dequantises input-dependent integers (quantised models are not supported)",
    "DynamicQuantizeLinear": "quantises its input (not Lipschitz)",
    "ThresholdedRelu": "jumps at its threshold (not Lipschitz)",
    "Exp": "exp is not globally Lipschitz", "Log": "log is not globally Lipschitz", "Sqrt": "not Lipschitz at 0",
    "Reciprocal": "1/x is not Lipschitz", "Pow": "a power of an input-dependent tensor is not globally Lipschitz",
    "Erf": "an erf that is not part of a recognised GELU", "Where": "a data-dependent selection (not part of a "
    "recognised activation)", "Greater": "a comparison of input-dependent values (a step function)",
    "Less": "a comparison of input-dependent values (a step function)", "Equal": "a comparison (a step function)",
    "Gather": "gathers input-dependent values by index (not supported)", "TopK": "sorts input-dependent values",
    "ArgMax": "an index of input-dependent values (a step function)", "NonZero": "data-dependent output shape",
    "If": "data-dependent control flow", "Loop": "data-dependent control flow", "Scan": "a loop over the input",
    "LayerNormalization": "normalises by an input-dependent variance (not globally Lipschitz)",
    "InstanceNormalization": "normalises by an input-dependent variance (not globally Lipschitz)",
    "LRN": "normalises by input-dependent values (not supported)",
    "MatMul": "a product of two input-dependent tensors is not globally Lipschitz",
    "LogSoftmax": "log-softmax is not supported (use the logits)",
}


def hint_for(op_type: str, domain: str) -> str:
    if domain not in ("", "ai.onnx"):
        return f"custom operator domain {domain!r} is not supported"
    if op_type in HINTS:
        return HINTS[op_type]
    return "no converter for this operation; supported ops: " + ", ".join(sorted(CONVERTERS))


def converts(*op_types: str):
    def register(fn):
        for t in op_types:
            CONVERTERS[t] = fn
        return fn

    return register


def t64(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float64))


def _scalar(v, i: int, what: str, default: float | None = None) -> float:
    if not v.has_input(i):
        if default is None:
            v.unsupported(f"missing {what}")
        return default
    c = v.const(i, what)
    if c.size != 1:
        v.unsupported(f"{what} must be a scalar")
    return float(c.reshape(-1)[0])


# ---------------------------------------------------------------------------------------------
# linear maps
@converts("Gemm")
def gemm(v):
    if not v.is_data(0) or v.is_data(1) or (v.has_input(2) and v.is_data(2)):
        v.unsupported("only Gemm(input, constant weight, constant bias) is supported")
    if v.attr("transA", 0):
        v.unsupported("transA=1 (the batch would be transposed)")
    if len(v.in_shape(0)) != (1 if v.batched else 2):
        v.unsupported(f"input of per-sample shape {v.in_shape(0)}")
    b = v.const(1, "weight").astype(np.float64)
    alpha, beta = float(v.attr("alpha", 1.0)), float(v.attr("beta", 1.0))
    weight = b if v.attr("transB", 0) else b.T  # (out, in)
    bias = None
    if v.has_input(2):
        c = beta * v.const(2, "bias").astype(np.float64)
        rows = 1 if v.batched else v.in_shape(0)[0]
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] not in (1, rows)):
            v.unsupported(f"bias of shape {c.shape} varies along the batch axis")
        c = np.broadcast_to(c, (rows, weight.shape[0]) if c.ndim == 2 else (weight.shape[0],)).copy()
        bias = t64(c[0] if c.ndim == 2 and v.batched else c)
    if alpha == 1.0:
        v.emit(Dense(t64(weight), bias))
    else:  # the file scales the product afterwards (it may overflow first): simplify folds alpha in
        v.emit(Dense(t64(weight)), Scale(t64(np.array(alpha))), *([Shift(bias)] if bias is not None else []))


@converts("MatMul")
def matmul(v):
    if v.is_data(0) and v.is_data(1):
        v.unsupported("a product of two input-dependent tensors is not globally Lipschitz")
    if v.is_data(0):  # x @ B: B acts on the last axis
        b = v.const(1, "right operand")
        if b.ndim != 2:
            v.unsupported(f"right operand of rank {b.ndim}; only 2-D constant matrices are supported")
        if len(v.in_shape(0)) == 0:
            v.unsupported("the batch axis would be contracted")
        v.emit(Dense(t64(b.T)))  # acts on the last axis (of a vector x too: x @ B = B^T x)
        return
    a = v.const(0, "left operand")  # A @ x: A acts on the second-to-last axis (or the vector)
    if a.ndim != 2:
        v.unsupported(f"left operand of rank {a.ndim}; only 2-D constant matrices are supported")
    if len(v.in_shape(1)) == 1:
        if v.batched:
            v.unsupported("constant @ input where the input is (batch, n): the product would mix samples")
        v.emit(Dense(t64(a)), from_input=1)  # unbatched vector: A x
        return
    v.emit(LeftMatMul(t64(a)), from_input=1)


def _explicit_pads(v, kernel, stride, dilation, spatial) -> list[int]:
    """ONNX pads (begins then ends), resolving auto_pad SAME_UPPER/SAME_LOWER/VALID from the input shape."""
    n = len(kernel)
    pads = list(v.attr("pads", [0] * (2 * n)))
    if len(pads) != 2 * n or min(pads) < 0:
        v.unsupported(f"pads {pads} (need {2 * n} non-negative values)")
    auto_pad = v.attr("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0] * (2 * n)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for d in range(n):
            eff = (kernel[d] - 1) * dilation[d] + 1
            out = -(-spatial[d] // stride[d])
            total = max(0, (out - 1) * stride[d] + eff - spatial[d])
            small, big = total // 2, total - total // 2
            pads[d], pads[d + n] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad != "NOTSET":
        v.unsupported(f"auto_pad {auto_pad!r}")
    return pads


def _nchw_shape(v, i: int = 0) -> tuple[int, ...]:
    """Per-sample (C, *spatial) of an N-first input (without a batch axis the model's N is dropped)."""
    s = v.in_shape(i)
    return s if v.batched else s[1:]


def _conv_attrs(v, w):
    nsp = w.ndim - 2
    if nsp not in (1, 2):
        v.unsupported(f"{nsp}-D convolution (1-D and 2-D are supported)")
    stride = v.attr("strides", [1] * nsp)
    dilation = v.attr("dilations", [1] * nsp)
    if len(stride) != nsp or len(dilation) != nsp or min(stride) < 1 or min(dilation) < 1:
        v.unsupported("bad strides/dilations")
    return nsp, stride, dilation


@converts("Conv")
def conv(v):
    if not v.is_data(0):
        v.unsupported("the input must be the data operand")
    w = v.const(1, "weight")
    nsp, stride, dilation = _conv_attrs(v, w)
    groups = int(v.attr("group", 1))
    shape = _nchw_shape(v)
    if len(shape) != nsp + 1 or groups < 1 or shape[0] != w.shape[1] * groups or w.shape[0] % groups:
        v.unsupported(f"weight {w.shape} and group {groups} do not fit an input of shape {shape}")
    bias = None
    if v.has_input(2):
        b = v.const(2, "bias")
        if b.shape != (w.shape[0],):
            v.unsupported(f"bias of shape {b.shape}")
        bias = t64(b)
    pads = _explicit_pads(v, list(w.shape[2:]), stride, dilation, shape[1:])
    v.emit_nchw(Conv(t64(w), bias, stride, pads, dilation, groups))


@converts("ConvTranspose")
def conv_transpose(v):
    if not v.is_data(0):
        v.unsupported("the input must be the data operand")
    w = v.const(1, "weight")  # (C_in, C_out // group, *k)
    nsp, stride, dilation = _conv_attrs(v, w)
    groups = int(v.attr("group", 1))
    shape = _nchw_shape(v)
    if len(shape) != nsp + 1 or shape[0] != w.shape[0] or w.shape[0] % groups:
        v.unsupported(f"weight {w.shape} and group {groups} do not fit an input of shape {shape}")
    if v.attr("output_shape") is not None or v.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        v.unsupported("output_shape / SAME auto_pad (export with explicit pads)")
    pads = [0] * (2 * nsp) if v.attr("auto_pad", "NOTSET") == "VALID" else list(v.attr("pads", [0] * (2 * nsp)))
    out_pad = list(v.attr("output_padding", [0] * nsp))
    if len(pads) != 2 * nsp or min(pads) < 0 or len(out_pad) != nsp or min(out_pad) < 0:
        v.unsupported(f"pads {pads} / output_padding {out_pad}")
    bias = None
    if v.has_input(2):
        b = v.const(2, "bias")
        if b.shape != (w.shape[1] * groups,):
            v.unsupported(f"bias of shape {b.shape}")
        bias = t64(b)
    v.emit_nchw(ConvTranspose(t64(w), bias, stride, pads, dilation, groups, out_pad))


@converts("BatchNormalization")
def batchnorm(v):
    if v.attr("training_mode", 0):
        v.unsupported("training_mode=1; export the model in eval mode")
    if any(v.node.output[k] for k in range(1, len(v.node.output))):
        v.unsupported("running statistics outputs (training mode)")
    gamma, beta, mean, var = (v.const(i, n).astype(np.float64) for i, n in ((1, "scale"), (2, "B"), (3, "mean"),
                                                                            (4, "var")))
    eps = float(v.attr("epsilon", 1e-5))
    shape = _nchw_shape(v)
    if any(t.shape != (shape[0],) for t in (gamma, beta, mean, var)):
        v.unsupported("statistics do not match the channel count")
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    view = (-1,) + (1,) * (len(shape) - 1)
    terms = np.abs(beta) + np.abs(mean * scale)  # onnxruntime folds the shift in float32: rounded at this scale
    v.emit_nchw(Scale(t64(scale.reshape(view))), Shift(t64(shift.reshape(view)), t64(terms.reshape(view))))


# ---------------------------------------------------------------------------------------------
# elementwise arithmetic
def emit_elementwise(v, op_factory, const_index: int, data_index: int, pre=()):
    """``op_factory(c)`` applied to the data operand, where the constant c broadcasts against it. When
    c is larger than the data operand the data is broadcast first (an explicit ``Broadcast`` node, whose
    norm counts the copies) so that the op itself is a diagonal map of the output shape."""
    c = v.sample_const(const_index)
    x_shape = v.in_shape(data_index)
    try:
        out = tuple(np.broadcast_shapes(c.shape, x_shape))
    except ValueError:
        v.unsupported(f"constant of shape {c.shape} does not broadcast with the data of shape {x_shape}")
    if out != v.out_shape:
        v.unsupported(f"broadcast shape {out} differs from the observed {v.out_shape}")
    c = c.reshape((1,) * (len(out) - c.ndim) + c.shape)
    ops = list(pre)
    if out != x_shape:  # the constant is larger than the data: copy the data first
        if len(out) != len(x_shape):
            v.unsupported("broadcast that adds axes to the data operand")
        ops.insert(0, Broadcast(x_shape, out))
    v.emit(*ops, op_factory(c), from_input=data_index)


@converts("Add", "Sub")
def add_sub(v):
    sub = v.op_type == "Sub"
    if v.is_data(0) and v.is_data(1):
        if v.in_shape(0) != v.out_shape or v.in_shape(1) != v.out_shape:
            v.unsupported(f"broadcasting between input-dependent tensors {v.in_shape(0)}, {v.in_shape(1)} -> "
                          f"{v.out_shape}")
        v.emit_merge(Sub() if sub else Add(), [0, 1])
        return
    if v.is_data(0):
        emit_elementwise(v, lambda c: Shift(t64(-c if sub else c)), 1, 0)
    elif sub:  # c - x = (-x) + c
        emit_elementwise(v, lambda c: Shift(t64(c)), 0, 1, pre=[Scale(t64(np.array(-1.0)))])
    else:
        emit_elementwise(v, lambda c: Shift(t64(c)), 0, 1)


@converts("Mul", "Div")
def mul_div(v):
    div = v.op_type == "Div"
    if v.is_data(0) and v.is_data(1):
        v.unsupported("a product of two input-dependent tensors is not globally Lipschitz" if not div
                      else "division by an input-dependent tensor is not Lipschitz")
    if v.is_data(1):
        if div:
            v.unsupported("division by an input-dependent tensor is not Lipschitz")
        emit_elementwise(v, lambda c: Scale(t64(c)), 0, 1)
        return

    def scale(c):
        if div and np.any(c == 0):
            v.unsupported("division by a zero constant")
        return Scale(t64(1.0 / c if div else c))

    emit_elementwise(v, scale, 1, 0)


@converts("Neg")
def neg(v):
    v.emit(Scale(t64(np.array(-1.0))))


@converts("Sum")
def sum_(v):
    if not all(v.is_data(i) for i in range(v.n_inputs)) or any(v.in_shape(i) != v.out_shape for i in range(v.n_inputs)):
        v.unsupported("only a sum of input-dependent tensors of one shape is supported")
    if v.n_inputs == 1:
        v.alias()
        return
    names = [v.x.resolve(v.node.input[i]) for i in range(v.n_inputs)]
    acc = names[0]
    for k, name in enumerate(names[1:]):
        out = v.node.output[0] if k == len(names) - 2 else f"{v.node.output[0]}::{k}"
        v.x.nodes.append(Node(out, Add(), [acc, name], v.out_shape, v.display_name))
        v.x.shapes[out] = v.out_shape
        acc = out


@converts("Identity")
def identity(v):
    v.alias()


@converts("Dropout")
def dropout(v):
    # inference: the identity, unless training_mode (opset 12+, input 2) is true: then it is random
    if v.has_input(2):
        mode = v.const(2, "training_mode")
        if mode.size != 1 or bool(mode.reshape(-1)[0]):
            v.unsupported("training_mode is true: a random operation")
    if len(v.node.output) > 1 and v.node.output[1]:
        v.unsupported("its mask output is used")
    v.alias()


@converts("Cast", "CastLike")
def cast(v):
    if v.op_type == "Cast":
        to = v.attr("to", 1)
    else:
        like = v.x.values.get(v.node.input[1])
        to = {np.dtype(np.float32): 1, np.dtype(np.float64): 11}.get(np.asarray(like).dtype if like is not None else None, 0)
    if to not in (1, 11):  # float32, float64
        names = {10: "float16", 16: "bfloat16"}
        what = names.get(to)
        v.unsupported(f"casts to {what}: rounding to a lower precision is not Lipschitz" if what else
                      "casts to a non-floating type (rounding is not Lipschitz)")
    v.alias()


# ---------------------------------------------------------------------------------------------
# activations
def _activation(cls, *args):
    def convert(v):
        if not v.is_data(0) or v.in_shape(0) != v.out_shape:
            v.unsupported("expected one input-dependent operand")
        v.emit(cls(*(a(v) if callable(a) else a for a in args)))

    return convert


CONVERTERS["Relu"] = _activation(ReLU)
CONVERTERS["LeakyRelu"] = _activation(LeakyReLU, lambda v: float(v.attr("alpha", 0.01)))
CONVERTERS["Tanh"] = _activation(Tanh)
CONVERTERS["Sigmoid"] = _activation(Sigmoid)
CONVERTERS["Elu"] = _activation(ELU, lambda v: float(v.attr("alpha", 1.0)))
CONVERTERS["Selu"] = _activation(SELU, lambda v: float(v.attr("alpha", 1.67326319217681884765625)),
                                 lambda v: float(v.attr("gamma", 1.05070102214813232421875)))
CONVERTERS["Softplus"] = _activation(Softplus)
CONVERTERS["Softsign"] = _activation(Softsign)
CONVERTERS["Mish"] = _activation(Mish)
CONVERTERS["HardSwish"] = _activation(HardSwish)
CONVERTERS["Abs"] = _activation(Abs)
CONVERTERS["HardSigmoid"] = _activation(HardSigmoid, lambda v: float(v.attr("alpha", 0.2)),
                                        lambda v: float(v.attr("beta", 0.5)))


@converts("Celu")
def celu(v):
    alpha = float(v.attr("alpha", 1.0))
    if not alpha > 0:
        v.unsupported(f"alpha {alpha} <= 0")
    _activation(CELU, alpha)(v)


@converts("Gelu")
def gelu(v):
    approx = v.attr("approximate", "none")
    if approx not in ("none", "tanh"):
        v.unsupported(f"approximate={approx!r}")
    _activation(GELU, approx)(v)


@converts("Clip")
def clip(v):
    if v.opset < 11:
        lo, hi = float(v.attr("min", -math.inf)), float(v.attr("max", math.inf))
    else:
        lo, hi = _scalar(v, 1, "min", -math.inf), _scalar(v, 2, "max", math.inf)
    _activation(Clip, lo, hi)(v)


@converts("PRelu")
def prelu(v):
    if not v.is_data(0) or v.is_data(1):
        v.unsupported("only a constant slope is supported")
    slope = v.sample_const(1, "slope")
    try:
        if tuple(np.broadcast_shapes(slope.shape, v.in_shape(0))) != v.in_shape(0):
            raise ValueError
    except ValueError:
        v.unsupported(f"slope of shape {slope.shape} does not broadcast to the input {v.in_shape(0)}")
    v.emit(PReLU(t64(slope)))


@converts("Softmax")
def softmax(v):
    axis = v.sample_axis(int(v.attr("axis", -1 if v.opset >= 13 else 1)))
    if v.opset < 13 and axis != len(v.in_shape(0)) - 1:
        v.unsupported("opset < 13 softmax flattens trailing axes; only the last axis is supported")
    v.emit(Softmax(axis))


# ---------------------------------------------------------------------------------------------
# shapes
@converts("Flatten", "Squeeze", "Unsqueeze")
def reshape_like(v):
    if v.out_shape == v.in_shape(0):
        v.alias()
    else:
        v.emit(Reshape(v.out_shape))


@converts("Reshape")
def reshape(v):
    v.batch_target(1)
    reshape_like(v)


@converts("Expand")
def expand(v):
    v.batch_target(1)
    x = v.in_shape(0)
    if len(v.out_shape) != len(x):
        v.unsupported("expansion that adds axes")
    if v.out_shape == x:
        v.alias()
        return
    v.emit(Broadcast(x, v.out_shape))


@converts("Tile")
def tile(v):
    reps = [int(r) for r in v.const(1, "repeats").reshape(-1)]
    if v.batched:
        if len(reps) != len(v.in_shape(0)) + 1 or reps[0] != 1:
            v.unsupported("tiles along the batch axis")
        reps = reps[1:]
    if min(reps, default=1) < 1:
        v.unsupported("zero repeats")
    v.emit(Tile(tuple(reps)))


@converts("Transpose")
def transpose(v):
    rank = v.rank
    perm = v.attr("perm", list(reversed(range(rank))))
    if sorted(perm) != list(range(rank)):
        v.unsupported(f"perm {perm} is not a permutation")
    if v.batched:
        if perm[0] != 0:
            v.unsupported("transposes the batch axis")
        perm = [p - 1 for p in perm[1:]]
    v.emit(Transpose(tuple(perm)))


@converts("Pad")
def pad(v):
    mode = v.attr("mode", "constant")
    if mode != "constant":
        v.unsupported(f"pad mode {mode!r} (only constant padding is supported)")
    rank = v.rank
    if v.opset < 11:
        pads = list(v.attr("pads"))
        value = float(v.attr("value", 0.0))
    else:
        pads = [int(p) for p in v.const(1, "pads").reshape(-1)]
        value = _scalar(v, 2, "constant_value", 0.0)
    axes = list(range(rank))
    if v.has_input(3):
        axes = [int(a) % rank for a in v.const(3, "axes").reshape(-1)]
    if len(pads) != 2 * len(axes):
        v.unsupported(f"{len(pads)} pads for {len(axes)} axes")
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        full[a], full[a + rank] = pads[i], pads[i + len(axes)]
    first = 1 if v.batched else 0
    if v.batched and (full[0] or full[rank]):
        v.unsupported("pads the batch axis")
    if any(p < 0 for p in full):
        v.unsupported("negative pads (crops)")
    torch_pads: list[int] = []
    for axis in reversed(range(first, rank)):
        torch_pads += [full[axis], full[axis + rank]]
    v.emit(Pad(tuple(torch_pads), value))


def _slice_index(v, starts, ends, axes, steps) -> tuple:
    shape = v.in_shape(0)
    index = [slice(None)] * len(shape)
    seen = set()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = v.sample_axis(int(a), what="slice axis")
        if a in seen or int(st) == 0:
            v.unsupported("repeated axis or zero step")
        seen.add(a)
        clamp = lambda t: int(max(min(int(t), 2**62), -2**62))  # noqa: E731  ONNX INT_MAX/INT_MIN sentinels
        index[a] = slice(*slice(clamp(s), clamp(e), int(st)).indices(shape[a]))
    return tuple(index)


@converts("Slice")
def slice_(v):
    if v.opset < 10:
        starts, ends = v.attr("starts"), v.attr("ends")
        axes = v.attr("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = v.const(1, "starts").reshape(-1), v.const(2, "ends").reshape(-1)
        axes = v.const(3, "axes").reshape(-1) if v.has_input(3) else np.arange(len(starts))
        steps = v.const(4, "steps").reshape(-1) if v.has_input(4) else np.ones(len(starts), dtype=np.int64)
    v.emit(Slice(_slice_index(v, starts, ends, axes, steps)))


@converts("Split")
def split(v):
    shape = v.in_shape(0)
    axis = v.sample_axis(int(v.attr("axis", 0)))
    outs = [o for o in v.node.output]
    if v.opset >= 13 and v.has_input(1):
        sizes = [int(s) for s in v.const(1, "split").reshape(-1)]
    elif v.attr("split") is not None:
        sizes = list(v.attr("split"))
    else:
        n = len(outs)
        chunk = -(-shape[axis] // n) if v.attr("num_outputs") is not None else shape[axis] // n
        sizes = [min(chunk, shape[axis] - k * chunk) for k in range(n)]
    if len(sizes) != len(outs) or sum(sizes) != shape[axis] or min(sizes) < 0:
        v.unsupported(f"split sizes {sizes} do not cover axis of length {shape[axis]}")
    start = 0
    src = v.x.resolve(v.node.input[0])
    for out, size in zip(outs, sizes):
        index = [slice(None)] * len(shape)
        index[axis] = slice(start, start + size, 1)
        start += size
        if not out:
            continue
        op = Slice(tuple(index))
        got = v.x.shape_after(op, shape)
        if out in v.x.shapes and v.x.shapes[out] != got:
            v.unsupported(f"internal shape mismatch on output {out}")
        v.x.shapes[out] = got
        v.x.nodes.append(Node(out, op, [src], got, v.display_name))


@converts("Concat")
def concat(v):
    axis = v.sample_axis(int(v.attr("axis")), rank=len(v.out_shape) + (1 if v.batched else 0))
    if not all(v.is_data(i) for i in range(v.n_inputs)):
        v.unsupported("concatenation with a constant tensor")
    if v.n_inputs == 1:
        v.alias()
        return
    v.emit_merge(Concat(axis, v.n_inputs), list(range(v.n_inputs)))


# ---------------------------------------------------------------------------------------------
# pooling
def _pool_geometry(v):
    kernel = v.attr("kernel_shape")
    n = len(kernel)
    if n not in (1, 2):
        v.unsupported(f"{n}-D pooling")
    stride = v.attr("strides", [1] * n)
    dilation = v.attr("dilations", [1] * n)
    pads = _explicit_pads(v, kernel, stride, dilation, _nchw_shape(v)[1:])
    return kernel, stride, pads, dilation, bool(v.attr("ceil_mode", 0))


@converts("AveragePool")
def average_pool(v):
    kernel, stride, pads, dilation, ceil_mode = _pool_geometry(v)
    v.emit_nchw(AvgPool(kernel, stride, pads, dilation, ceil_mode, bool(v.attr("count_include_pad", 0))))


@converts("MaxPool")
def max_pool(v):
    if len(v.node.output) > 1 and v.node.output[1]:
        v.unsupported("MaxPool with an Indices output")
    if v.attr("storage_order", 0):
        v.unsupported("storage_order=1")
    kernel, stride, pads, dilation, ceil_mode = _pool_geometry(v)
    if any(p >= k for p, k in zip(pads, kernel + kernel)):
        v.unsupported("pads as large as the kernel (windows made of padding only)")
    v.emit_nchw(MaxPool(kernel, stride, pads, dilation, ceil_mode))


@converts("GlobalAveragePool")
def global_average_pool(v):
    rank = len(_nchw_shape(v))
    v.emit_nchw(Reduce(tuple(range(1, rank)), keepdims=True, mean=True))


@converts("GlobalMaxPool")
def global_max_pool(v):
    spatial = _nchw_shape(v)[1:]
    n = len(spatial)
    v.emit_nchw(MaxPool(spatial, [1] * n, [0] * (2 * n)))


@converts("ReduceMean", "ReduceSum")
def reduce_(v):
    rank = v.rank
    if v.op_type == "ReduceSum" and v.opset >= 13 or v.op_type == "ReduceMean" and v.opset >= 18:
        axes = [int(a) for a in v.const(1, "axes").reshape(-1)] if v.has_input(1) else None
    else:
        axes = v.attr("axes", None)
    if not axes:
        if v.attr("noop_with_empty_axes", 0):
            v.alias()
            return
        axes = list(range(rank))
    axes = sorted({v.sample_axis(a, rank) for a in axes})
    v.emit(Reduce(tuple(axes), keepdims=bool(v.attr("keepdims", 1)), mean=v.op_type == "ReduceMean"))
