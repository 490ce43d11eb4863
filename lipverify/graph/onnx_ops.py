"""ONNX operator converters: one small function per ONNX op type, registered by name.

A converter receives a ``NodeView`` (the ONNX node, its constant inputs, the observed per-sample
shapes) and emits IR nodes through it. Adding support for an ONNX op = adding one function here
(and, if it is a new kind of operation, one class in ``lipverify/ops``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lipverify.ops.activation import ELU, GELU, LeakyReLU, ReLU, Sigmoid, Softplus, Tanh
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense, Scale, Shift
from lipverify.ops.merge import Add, Concat, Sub
from lipverify.ops.pool import AvgPool, MaxPool, Reduce
from lipverify.ops.shape import Pad, Reshape, Slice, Transpose
from lipverify.ops.softmax import Softmax

CONVERTERS: dict[str, Callable] = {}


def converts(*op_types: str):
    def register(fn):
        for t in op_types:
            CONVERTERS[t] = fn
        return fn

    return register


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# linear maps
@converts("Gemm")
def gemm(v):
    if v.attr("transA", 0):
        v.unsupported("transA=1 (the batch would be transposed)")
    b = v.const(1, "weight")
    alpha, beta = v.attr("alpha", 1.0), v.attr("beta", 1.0)
    weight = alpha * (b if v.attr("transB", 0) else b.T)
    bias = None
    if v.n_inputs > 2 and v.node.input[2]:
        c = v.const(2, "bias")
        bias = t64(np.broadcast_to(beta * c, (weight.shape[0],)).copy())
    v.emit(Dense(t64(weight), bias))


@converts("MatMul")
def matmul(v):
    if v.is_const(0):
        v.unsupported("constant @ input (left multiplication) is not supported")
    b = v.const(1, "right operand")
    if b.ndim != 2:
        v.unsupported(f"right operand of rank {b.ndim}; only 2-D constant matrices are supported")
    v.emit(Dense(t64(b.T)))


def _explicit_pads(v, kernel, stride, dilation) -> list[int]:
    """ONNX pads (begins then ends), resolving auto_pad SAME_UPPER/SAME_LOWER/VALID from the input shape."""
    n = len(kernel)
    pads = list(v.attr("pads", [0] * (2 * n)))
    auto_pad = v.attr("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0] * (2 * n)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        spatial = v.in_shape(0)[1:]
        for d in range(n):
            eff = (kernel[d] - 1) * dilation[d] + 1
            out = -(-spatial[d] // stride[d])
            total = max(0, (out - 1) * stride[d] + eff - spatial[d])
            small, big = total // 2, total - total // 2
            pads[d], pads[d + n] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    return pads


@converts("Conv")
def conv(v):
    w = v.const(1, "weight")
    bias = t64(v.const(2, "bias")) if v.n_inputs > 2 and v.node.input[2] else None
    nsp = w.ndim - 2
    if nsp not in (1, 2):
        v.unsupported(f"{nsp}-D convolution (1-D and 2-D are supported)")
    stride = v.attr("strides", [1] * nsp)
    dilation = v.attr("dilations", [1] * nsp)
    pads = _explicit_pads(v, list(w.shape[2:]), stride, dilation)
    v.emit(Conv(t64(w), bias, stride, pads, dilation, v.attr("group", 1)))


@converts("BatchNormalization")
def batchnorm(v):
    if v.attr("training_mode", 0):
        v.unsupported("training_mode=1; export the model in eval mode")
    gamma, beta, mean, var = (v.const(i, n) for i, n in ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")))
    eps = v.attr("epsilon", 1e-5)
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    shift = beta - mean * scale
    rank = len(v.in_shape(0))
    shape = (-1,) + (1,) * (rank - 1)
    v.emit(Scale(t64(scale.reshape(shape))), Shift(t64(shift.reshape(shape))))


# ---------------------------------------------------------------------------------------------
# elementwise arithmetic
@converts("Add", "Sub")
def add_sub(v):
    sub = v.op_type == "Sub"
    if v.is_const(0) and v.is_const(1):  # pragma: no cover - folded before conversion
        v.unsupported("constant expression")
    if not v.is_const(0) and not v.is_const(1):
        v.require_same_shape()
        v.emit_merge(Sub() if sub else Add(), [0, 1])
        return
    if v.is_const(1):
        c = v.per_sample_const(1)
        v.emit(Shift(t64(-c if sub else c)), from_input=0)
    else:
        c = v.per_sample_const(0)
        if sub:  # c - x
            v.emit(Scale(t64(np.array(-1.0))), Shift(t64(c)), from_input=1)
        else:
            v.emit(Shift(t64(c)), from_input=1)


@converts("Mul", "Div")
def mul_div(v):
    div = v.op_type == "Div"
    if not v.is_const(0) and not v.is_const(1):
        v.unsupported("product of two input-dependent tensors is not globally Lipschitz")
    if v.is_const(0):
        if div:
            v.unsupported("division by an input-dependent tensor")
        v.emit(Scale(t64(v.per_sample_const(0))), from_input=1)
        return
    c = v.per_sample_const(1).astype(np.float64)
    if div:
        if np.any(c == 0):
            v.unsupported("division by zero constant")
        c = 1.0 / c
    v.emit(Scale(t64(c)), from_input=0)


@converts("Neg")
def neg(v):
    v.emit(Scale(t64(np.array(-1.0))))


@converts("Identity", "Dropout", "Cast")
def identity(v):
    if v.op_type == "Cast" and v.attr("to", 1) not in (1, 10, 11, 16):  # float, float16, double, bfloat16
        v.unsupported("cast to a non-floating type")
    v.alias()


# ---------------------------------------------------------------------------------------------
# activations
@converts("Relu")
def relu(v):
    v.emit(ReLU())


@converts("LeakyRelu")
def leaky_relu(v):
    v.emit(LeakyReLU(v.attr("alpha", 0.01)))


@converts("Tanh")
def tanh(v):
    v.emit(Tanh())


@converts("Sigmoid")
def sigmoid(v):
    v.emit(Sigmoid())


@converts("Elu")
def elu(v):
    v.emit(ELU(v.attr("alpha", 1.0)))


@converts("Softplus")
def softplus(v):
    v.emit(Softplus())


@converts("Gelu")
def gelu(v):
    v.emit(GELU(v.attr("approximate", "none")))


@converts("Softmax")
def softmax(v):
    axis = v.attr("axis", -1)
    rank = len(v.in_shape(0)) + 1
    axis = axis % rank
    if axis == 0:
        v.unsupported("softmax over the batch axis")
    if v.opset < 13 and axis != rank - 1:
        v.unsupported("opset < 13 softmax flattens trailing axes; only the last axis is supported")
    v.emit(Softmax(axis - 1))


# ---------------------------------------------------------------------------------------------
# shapes
@converts("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape(v):
    if v.out_shape == v.in_shape(0):
        v.alias()
    else:
        v.emit(Reshape(v.out_shape))


@converts("Transpose")
def transpose(v):
    rank = len(v.in_shape(0)) + 1
    perm = v.attr("perm", list(reversed(range(rank))))
    if perm[0] != 0:
        v.unsupported("transposes the batch axis")
    v.emit(Transpose(tuple(p - 1 for p in perm[1:])))


@converts("Pad")
def pad(v):
    mode = v.attr("mode", "constant")
    if mode != "constant":
        v.unsupported(f"pad mode {mode!r} (only constant padding is supported)")
    rank = len(v.in_shape(0)) + 1
    if v.opset < 11:
        pads = list(v.attr("pads"))
        value = v.attr("value", 0.0)
    else:
        pads = [int(p) for p in v.const(1, "pads")]
        value = float(v.const(2, "constant_value").reshape(-1)[0]) if v.n_inputs > 2 and v.node.input[2] else 0.0
    axes = list(range(rank))
    if v.n_inputs > 3 and v.node.input[3]:
        axes = [int(a) % rank for a in v.const(3, "axes")]
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        full[a], full[a + rank] = pads[i], pads[i + len(axes)]
    if full[0] or full[rank]:
        v.unsupported("pads the batch axis")
    if any(p < 0 for p in full):
        v.unsupported("negative pads (crops)")
    torch_pads: list[int] = []
    for axis in reversed(range(1, rank)):
        torch_pads += [full[axis], full[axis + rank]]
    v.emit(Pad(tuple(torch_pads), value))


@converts("Slice")
def slice_(v):
    rank = len(v.in_shape(0)) + 1
    starts, ends = v.const(1, "starts"), v.const(2, "ends")
    axes = v.const(3, "axes") if v.n_inputs > 3 and v.node.input[3] else np.arange(len(starts))
    steps = v.const(4, "steps") if v.n_inputs > 4 and v.node.input[4] else np.ones(len(starts), dtype=np.int64)
    index = [slice(None)] * (rank - 1)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = int(a) % rank
        if a == 0:
            v.unsupported("slices the batch axis")
        dim = v.in_shape(0)[a - 1]
        index[a - 1] = slice(*slice(int(max(min(s, 2**62), -2**62)), int(max(min(e, 2**62), -2**62)), int(st)).indices(dim))
    v.emit(Slice(tuple(index)))


@converts("Concat")
def concat(v):
    axis = v.attr("axis") % (len(v.out_shape) + 1)
    if axis == 0:
        v.unsupported("concatenation along the batch axis")
    if any(v.is_const(i) for i in range(v.n_inputs)):
        v.unsupported("concatenation with a constant tensor")
    v.emit_merge(Concat(axis - 1, v.n_inputs), list(range(v.n_inputs)))


# ---------------------------------------------------------------------------------------------
# pooling
def _pool_geometry(v):
    kernel = v.attr("kernel_shape")
    n = len(kernel)
    if n not in (1, 2):
        v.unsupported(f"{n}-D pooling")
    stride = v.attr("strides", [1] * n)
    dilation = v.attr("dilations", [1] * n)
    pads = _explicit_pads(v, kernel, stride, dilation)
    return kernel, stride, pads, dilation, bool(v.attr("ceil_mode", 0))


@converts("AveragePool")
def average_pool(v):
    kernel, stride, pads, dilation, ceil_mode = _pool_geometry(v)
    v.emit(AvgPool(kernel, stride, pads, dilation, ceil_mode, bool(v.attr("count_include_pad", 0))))


@converts("MaxPool")
def max_pool(v):
    if len(v.node.output) > 1 and v.node.output[1]:
        v.unsupported("MaxPool with an Indices output")
    if v.attr("storage_order", 0):
        v.unsupported("storage_order=1")
    kernel, stride, pads, dilation, ceil_mode = _pool_geometry(v)
    v.emit(MaxPool(kernel, stride, pads, dilation, ceil_mode))


@converts("GlobalAveragePool")
def global_average_pool(v):
    rank = len(v.in_shape(0))
    v.emit(Reduce(tuple(range(1, rank)), keepdims=True, mean=True))


@converts("GlobalMaxPool")
def global_max_pool(v):
    spatial = v.in_shape(0)[1:]
    n = len(spatial)
    v.emit(MaxPool(spatial, [1] * n, [0] * (2 * n)))


@converts("ReduceMean", "ReduceSum")
def reduce_(v):
    rank = len(v.in_shape(0)) + 1
    if v.op_type == "ReduceSum" and v.opset >= 13 or v.op_type == "ReduceMean" and v.opset >= 18:
        axes = [int(a) for a in v.const(1, "axes")] if v.n_inputs > 1 and v.node.input[1] else None
    else:
        axes = v.attr("axes", None)
    if not axes:
        if v.attr("noop_with_empty_axes", 0):
            v.alias()
            return
        axes = list(range(rank))
    axes = sorted(a % rank for a in axes)
    if 0 in axes:
        v.unsupported("reduces over the batch axis")
    v.emit(Reduce(tuple(a - 1 for a in axes), keepdims=bool(v.attr("keepdims", 1)),
                  mean=v.op_type == "ReduceMean"))
