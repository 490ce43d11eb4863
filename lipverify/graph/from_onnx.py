"""Extract the Lipschitz graph from an ONNX model, exactly or not at all.

1. Layout: the input's per-sample shape and whether the graph has a batch axis (``input_layout``).
   A graph without one (e.g. ERAN's ACAS Xu, input ``[5]``) is evaluated one sample at a time.
2. Classify every tensor the output depends on (``TensorKinds``): *data* (depends on the input's
   values), *constant* (initializers, Constant nodes and what is computed from them only), or
   *batch-dependent* (computed from ``Shape``/``Size`` of a data tensor: a function of the batch
   size). Batch-dependent values are tracked element by element, symbolically (which entries are
   exactly the batch size B); they may only serve as a Reshape/Expand target whose first entry is B
   and whose other entries do not depend on B. Anything else that uses the batch size as a value is
   refused, as are random ops, subgraph ops reading data, and quantising casts.
3. Run the model in onnxruntime with every intermediate tensor exposed, at two batch sizes when the
   batch axis is dynamic (1 and 2): this gives every constant's value and every tensor's per-sample
   shape and type; constants must agree bit for bit between the runs, data tensors must keep the
   batch axis first and be float32/float64.
4. Decomposed activations are recognised by exact templates (``graph.templates``).
5. Every other node goes through its converter in ``onnx_ops`` (the exact semantics of the op for the
   shapes at hand, broadcasting included), or is reported as unsupported, naming the node. All
   unsupported nodes are collected and reported together.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from lipverify.errors import UnsupportedModelError, UnsupportedOperationError, UserInputError
from lipverify.graph.ir import Graph, Node
from lipverify.graph.onnx_ops import CONVERTERS, hint_for
from lipverify.graph.templates import find_activation_regions

MAX_INPUT_VALUES = 50_000_000  # per sample
RANDOM_OPS = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Bernoulli", "Multinomial"}
FLOAT_TYPES = {np.dtype(np.float32), np.dtype(np.float64)}
ONNX_FLOAT = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64}


# ------------------------------------------------------------------------------------------------
# running the model


def run_all_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray], where: str = "") -> dict[str, np.ndarray]:
    """Run the model in onnxruntime and return every node output by name."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors reach the user as our message, not as runtime log lines
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for node in exposed.graph.node:
        for out in node.output:
            if out and out not in present:
                exposed.graph.output.append(onnx.ValueInfoProto(name=out))
                present.add(out)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises many exception types for bad models
        raise UserInputError(f"onnxruntime could not run the model{where}: {exc}".split("\n")[0]) from exc
    return {o.name: v for o, v in zip(session.get_outputs(), outputs)}


def model_input(model: onnx.ModelProto):
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise UserInputError(f"the model must have exactly one input tensor (found: {names})")
    return inputs[0]


def input_dtype(model: onnx.ModelProto):
    """numpy dtype of the model input (float32 or float64); anything else is refused."""
    inp = model_input(model)
    elem = inp.type.tensor_type.elem_type
    if elem not in ONNX_FLOAT:
        name = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else str(elem)
        raise UserInputError(f"the model input {inp.name!r} is of type {name}; lipverify certifies models whose "
                             "input is float32 or float64")
    return ONNX_FLOAT[elem]


def declared_shape(value_info) -> list:
    """Dims of an ONNX input: int for fixed dims, None for symbolic/unknown."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def input_layout(model: onnx.ModelProto, input_shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], bool, list[int]]:
    """(per-sample input shape, whether the graph has a batch axis, batch sizes to probe with).

    The graph has no batch axis when ``--input-shape`` has as many dims as the declared input, or when
    the declared input is a single fixed axis (a rank-1 input has no room for a batch axis)."""
    inp = model_input(model)
    dims = declared_shape(inp)
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if dims and len(dims) == len(shape):
            for d, s in zip(dims, shape):
                if d and d != s:
                    raise UserInputError(f"--input-shape {shape} does not match the model's declared input {dims}")
            return _checked(inp, shape), False, [1]
        if dims and len(dims) - 1 != len(shape):
            raise UserInputError(f"--input-shape {shape} has {len(shape)} dims but the model input {inp.name!r} "
                                 f"has {len(dims) - 1} per-sample dims {dims[1:]} (or {len(dims)} without a batch axis)")
        for d, s in zip(dims[1:], shape):
            if d and d != s:
                raise UserInputError(f"--input-shape {shape} does not match the model's declared input {dims}")
        return _checked(inp, shape), True, _probe_batches(inp, dims)
    if len(dims) == 1 and dims[0]:
        return _checked(inp, (dims[0],)), False, [1]
    if not dims or any(d is None for d in dims[1:]):
        raise UserInputError(f"the model input {inp.name!r} has shape {dims or 'unknown'}; pass --input-shape "
                             "(per-sample, without the batch axis), e.g. --input-shape 1,28,28")
    return _checked(inp, tuple(dims[1:])), True, _probe_batches(inp, dims)


def _checked(inp, shape) -> tuple[int, ...]:
    if not shape or any(d <= 0 for d in shape) or np.prod(shape, dtype=np.float64) > MAX_INPUT_VALUES:
        raise UserInputError(f"the model input {inp.name!r} declares an impossible per-sample shape {list(shape)}")
    return tuple(shape)


def _probe_batches(inp, dims) -> list[int]:
    fixed = dims[0] if dims and dims[0] else None
    if fixed is not None and fixed > 1024:
        raise UserInputError(f"the model input {inp.name!r} has a fixed batch size of {fixed}; export it "
                             "with a dynamic (or size-1) batch axis")
    return [fixed] if fixed else [2, 1]


# ------------------------------------------------------------------------------------------------
# which tensors depend on what


def subgraph_reads(node) -> set[str]:
    """Outer-scope tensors read inside the node's subgraph attributes (If/Loop/Scan bodies)."""
    reads: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else (
            list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else [])
        for g in graphs:
            local = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                reads.update(i for i in n.input if i and i not in local)
                reads.update(r for r in subgraph_reads(n) if r not in local)
            reads.update(o.name for o in g.output if o.name not in local)
    return reads


def node_inputs(node) -> list[str]:
    return [i for i in node.input if i] + sorted(subgraph_reads(node))


def live_nodes(model: onnx.ModelProto, output: str) -> list:
    """The nodes the output depends on, in graph order (graph order must be topological)."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    order = {id(n): k for k, n in enumerate(model.graph.node)}
    live, stack = set(), [output]
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or id(n) in live:
            continue
        live.add(id(n))
        stack.extend(node_inputs(n))
    nodes = [n for n in model.graph.node if id(n) in live]
    for n in nodes:
        for i in node_inputs(n):
            p = producer.get(i)
            if p is not None and order[id(p)] >= order[id(n)]:
                raise UserInputError(f"the ONNX graph is not topologically sorted (node {n.name or n.op_type!r} reads "
                                     f"{i!r} before it is produced)")
    return nodes


LOW_PRECISION = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
for _name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT4E2M1"):
    if hasattr(onnx.TensorProto, _name):
        LOW_PRECISION[getattr(onnx.TensorProto, _name)] = _name.lower()


def refuse_statically(nodes: list, input_name: str) -> None:
    """Refusals that need no run of the model: random ops anywhere the output depends on, and casts of
    input-dependent tensors to anything but float32/float64 (onnxruntime may not even expose those)."""
    data = {input_name}
    for node in nodes:
        name = node.name or node.output[0]
        if node.op_type in RANDOM_OPS:
            raise UnsupportedOperationError(node.op_type, name,
                                            "a random operation: the model's output is not a function of its input")
        if node.op_type in ("Shape", "Size") or not any(i in data for i in node_inputs(node)):
            continue
        data.update(o for o in node.output if o)
        if node.op_type == "Cast":
            to = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)
            if to in LOW_PRECISION:
                raise UnsupportedOperationError(node.op_type, name, f"casts to {LOW_PRECISION[to]}: rounding to a "
                                                "lower precision is not Lipschitz")
            if to not in ONNX_FLOAT:
                raise UnsupportedOperationError(node.op_type, name, "casts input-dependent values to a non-floating "
                                                "type (rounding is not Lipschitz)")


class BatchValue:
    """A small int tensor computed from Shape/Size of a data tensor: which entries are exactly the
    batch size B (``is_b``) and which depend on B at all (``depends``); same shape as its value."""

    def __init__(self, is_b: np.ndarray, depends: np.ndarray):
        self.is_b, self.depends = is_b.astype(bool), depends.astype(bool)

    @classmethod
    def opaque(cls, shape) -> "BatchValue":
        return cls(np.zeros(shape, bool), np.ones(shape, bool))


class TensorKinds:
    """data / constant / batch-dependent, for every live tensor (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, nodes: list, input_name: str, batched: bool,
                 values: dict[str, np.ndarray]):
        self.data: set[str] = {input_name}
        self.consts: dict[str, np.ndarray] = {}
        self.batch: dict[str, BatchValue] = {}
        for init in model.graph.initializer:
            if init.name != input_name:
                self.consts[init.name] = numpy_helper.to_array(init)
        for node in nodes:
            ins = node_inputs(node)
            outs = [o for o in node.output if o]
            if any(i in self.data for i in ins):
                if node.op_type in ("Shape", "Size") and not (set(ins) - self.data - set(self.consts)):
                    self._shape_of_data(node, values, batched)
                else:
                    self.data.update(outs)
            elif any(i in self.batch for i in ins):
                self._propagate(node, values)
            else:
                for o in outs:
                    if o not in values:
                        raise UserInputError(f"could not evaluate constant {o!r} of node {node.name!r}")
                    self.consts[o] = values[o]

    def _shape_of_data(self, node, values, batched: bool) -> None:
        out = node.output[0]
        v = np.asarray(values[out])
        if not batched:  # no batch axis: the shape is fixed by the input shape
            self.consts[out] = v
            return
        if node.op_type == "Size":
            self.batch[out] = BatchValue.opaque(v.shape)
            return
        rank = len(np.asarray(values[node.input[0]]).shape)
        full = np.zeros(rank, bool)
        full[0] = True
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", rank)
        mask = full[slice(start, end)]
        if mask.any():
            self.batch[out] = BatchValue(mask, mask)
        else:  # only per-sample dims: fixed by the input shape
            self.consts[out] = v

    def _propagate(self, node, values) -> None:
        outs = [o for o in node.output if o]
        ins = [i for i in node.input if i]
        shape = lambda name: np.asarray(values[name] if name in values else self.consts[name]).shape  # noqa: E731

        def mask_of(name):
            if name in self.batch:
                return self.batch[name]
            return BatchValue(np.zeros(shape(name), bool), np.zeros(shape(name), bool))

        t, first = node.op_type, ins[0] if ins else None
        others_const = all(i in self.consts for i in ins[1:])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        try:
            if t in ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten") and others_const:
                m = mask_of(first)
                result = BatchValue(m.is_b.reshape(shape(outs[0])), m.depends.reshape(shape(outs[0])))
            elif t == "Gather" and others_const:
                idx = np.asarray(self.consts[ins[1]]).astype(np.int64)
                axis = attrs.get("axis", 0)
                m = mask_of(first)
                result = BatchValue(np.take(m.is_b, idx, axis=axis), np.take(m.depends, idx, axis=axis))
            elif t == "Slice" and others_const and len(shape(first)) == 1:
                starts, ends = (np.asarray(self.consts[i]).reshape(-1) for i in ins[1:3])
                steps = np.asarray(self.consts[ins[4]]).reshape(-1) if len(ins) > 4 else [1]
                m = mask_of(first)
                sl = slice(int(starts[0]), int(ends[0]), int(steps[0]))
                result = BatchValue(m.is_b[sl], m.depends[sl])
            elif t == "Concat":
                axis = attrs.get("axis", 0)
                ms = [mask_of(i) for i in ins]
                result = BatchValue(np.concatenate([m.is_b for m in ms], axis), np.concatenate([m.depends for m in ms], axis))
            else:
                result = None
        except (ValueError, IndexError, KeyError):
            result = None
        for o in outs:
            if result is None or result.is_b.shape != shape(o):
                self.batch[o] = BatchValue.opaque(shape(o))
            elif result.depends.any():
                self.batch[o] = result
            else:  # the entries that depended on the batch size were dropped (e.g. Gather of a per-sample dim)
                self.consts[o] = values[o]


# ------------------------------------------------------------------------------------------------
# the converters' view of one node


class NodeView:
    """What a converter sees of one ONNX node, and how it emits IR nodes."""

    def __init__(self, node, extractor: "OnnxExtractor"):
        self.node = node
        self.x = extractor
        self.op_type = node.op_type
        self.opset = extractor.opset
        self.batched = extractor.batched
        self.n_inputs = len(node.input)
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self.out_shape = extractor.shapes.get(node.output[0])
        self.display_name = node.name or f"{node.op_type}->{node.output[0]}"
        self.batch_inputs_ok: set[int] = set()  # batch-dependent inputs the converter validated

    def attr(self, name, default=None):
        value = self.attrs.get(name, default)
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, list):
            value = [int(v) if isinstance(v, (int, np.integer)) else v for v in value]
        return value

    def unsupported(self, detail: str):
        raise UnsupportedOperationError(self.op_type, self.display_name, detail)

    def has_input(self, i: int) -> bool:
        return i < self.n_inputs and bool(self.node.input[i])

    def is_const(self, i: int) -> bool:
        return self.has_input(i) and self.node.input[i] in self.x.kinds.consts

    def is_data(self, i: int) -> bool:
        return self.has_input(i) and self.node.input[i] in self.x.kinds.data

    def const(self, i: int, what: str) -> np.ndarray:
        if not self.has_input(i):
            self.unsupported(f"missing input {what}")
        name = self.node.input[i]
        if name in self.x.kinds.batch:
            self.unsupported(f"its {what} depends on the batch size (computed from Shape/Size of a data tensor); the "
                             "output for one sample would depend on how many samples are evaluated together")
        if name not in self.x.kinds.consts:
            self.unsupported(f"{what} depends on the model input; only a constant {what} is supported")
        value = np.asarray(self.x.kinds.consts[name])
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            self.unsupported(f"its {what} contains NaN or Inf")
        return value

    def batch_target(self, i: int) -> None:
        """Accept input ``i`` as a shape target (Reshape/Expand) if, when it depends on the batch size,
        its first entry is exactly B and no other entry depends on B."""
        name = self.node.input[i]
        if name in self.x.kinds.batch:
            m = self.x.kinds.batch[name]
            if m.is_b.ndim != 1 or not m.is_b.size or not m.is_b[0] or m.depends[1:].any():
                self.unsupported("its shape input uses the batch size other than as the first dimension; the "
                                 "output for one sample would depend on how many samples are evaluated together")
            self.batch_inputs_ok.add(i)
        elif name not in self.x.kinds.consts:
            self.unsupported("its shape input depends on the model input")

    def in_shape(self, i: int) -> tuple[int, ...]:
        return self.x.shapes[self.x.resolve(self.node.input[i])]

    @property
    def rank(self) -> int:
        """Full rank of the first data operand as ONNX sees it (batch axis included when there is one)."""
        return len(self.in_shape(self.data_input())) + (1 if self.batched else 0)

    def sample_axis(self, axis: int, rank: int | None = None, what: str = "axis") -> int:
        """The per-sample axis of ONNX axis ``axis`` (refusing the batch axis)."""
        rank = self.rank if rank is None else rank
        if not -rank <= axis < rank:
            self.unsupported(f"{what} {axis} out of range for rank {rank}")
        axis %= rank
        if self.batched:
            if axis == 0:
                self.unsupported(f"operates across samples ({what} 0 is the batch axis)")
            return axis - 1
        return axis

    def sample_const(self, i: int, what: str = "constant operand") -> np.ndarray:
        """A constant operand of a broadcasting elementwise op, as a per-sample float64 array (batch
        axis removed). The constant may be larger than the data operand (the op then broadcasts the
        data: see ``emit_elementwise``) but must not add axes before the batch axis or vary along it."""
        c = self.const(i, what).astype(np.float64)
        rank = self.rank
        if c.ndim > rank:
            self.unsupported(f"the {what} of shape {c.shape} has more axes than the data operand; broadcasting it "
                             "would move the batch axis")
        if self.batched and c.ndim == rank:
            if c.shape[0] != 1:
                self.unsupported(f"the {what} of shape {c.shape} varies along the batch axis")
            c = c[0]
        return c

    def data_input(self) -> int:
        for i in range(self.n_inputs):
            if self.is_data(i):
                return i
        self.unsupported("no input-dependent operand")

    def emit(self, *ops, from_input: int | None = None):
        """Append a chain of unary ops; the last one produces the node's output tensor. Each op's
        output shape is computed by running it, and the last must equal the shape onnxruntime gave."""
        src = self.x.resolve(self.node.input[self.data_input() if from_input is None else from_input])
        for k, op in enumerate(ops):
            name = self.node.output[0] if k == len(ops) - 1 else f"{self.node.output[0]}::{k}"
            shape = self.x.shape_after(op, self.x.shapes[src])
            self.x.shapes[name] = shape
            self.x.nodes.append(Node(name, op, [src], shape, self.display_name))
            src = name
        if self.x.shapes[src] != self.out_shape:
            self.unsupported(f"internal shape mismatch: the IR gives {self.x.shapes[src]}, onnxruntime "
                             f"{self.out_shape}; please report this model")

    def emit_nchw(self, *ops, from_input: int | None = None):
        """Emit ops whose ONNX input is (N, C, ...): without a batch axis the model's own N must be 1."""
        if self.batched:
            return self.emit(*ops, from_input=from_input)
        from lipverify.ops.shape import Reshape

        shape = self.in_shape(self.data_input() if from_input is None else from_input)
        if not shape or shape[0] != 1:
            self.unsupported(f"input of shape {shape} in a graph without a batch axis (its first axis must be 1)")
        self.emit(Reshape(shape[1:]), *ops, Reshape(self.out_shape), from_input=from_input)

    def emit_merge(self, op, input_indices: list[int]):
        inputs = [self.x.resolve(self.node.input[i]) for i in input_indices]
        self.x.nodes.append(Node(self.node.output[0], op, inputs, self.out_shape, self.display_name))
        self.x.shapes[self.node.output[0]] = self.out_shape

    def alias(self, from_input: int | None = None):
        i = self.data_input() if from_input is None else from_input
        if self.in_shape(i) != self.out_shape:
            self.unsupported(f"internal shape mismatch: {self.in_shape(i)} -> {self.out_shape}")
        self.x.aliases[self.node.output[0]] = self.x.resolve(self.node.input[i])


# ------------------------------------------------------------------------------------------------
# the extractor


class OnnxExtractor:
    def __init__(self, model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None, seed: int = 0):
        self.model = model
        versions = sorted({int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")})
        if len(versions) > 1:  # "" and "ai.onnx" name the same domain: which version a runtime uses is not ours
            raise UserInputError(f"the model imports the default ONNX domain at several opset versions {versions}; "
                                 "an op's semantics depend on it: keep one entry")
        self.opset = versions[0] if versions else 13
        self.input_name = model_input(model).name
        self.dtype = input_dtype(model)
        self.input_shape, self.batched, batches = input_layout(model, input_shape)
        if not model.graph.output:
            raise UserInputError("the ONNX graph declares no output")
        if len({o.name for o in model.graph.output}) > 1:  # load_onnx keeps only the output chosen to certify
            raise UserInputError("the ONNX graph has several outputs; choose the one to certify with --graph-output")
        self.output = model.graph.output[0].name
        self.live = live_nodes(model, self.output)
        refuse_statically(self.live, self.input_name)
        rng = np.random.default_rng(seed)
        self.runs: list[tuple[int, dict]] = []
        for b in batches:
            probe = rng.standard_normal(((b,) if self.batched else ()) + self.input_shape).astype(self.dtype)
            where = f" at batch size {b}" if len(batches) > 1 else ""
            values = run_all_tensors(model, {self.input_name: probe}, where)
            values[self.input_name] = probe
            self.runs.append((b, values))
        self.values = self.runs[0][1]
        self.kinds = TensorKinds(model, self.live, self.input_name, self.batched, self.values)
        self.shapes: dict[str, tuple[int, ...]] = {self.input_name: self.input_shape}
        self.nodes: list[Node] = []
        self.aliases: dict[str, str] = {}

    def resolve(self, name: str) -> str:
        while name in self.aliases:
            name = self.aliases[name]
        return name

    @staticmethod
    def shape_after(op, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(int(s) for s in op.forward(torch.zeros((1,) + tuple(in_shape), dtype=torch.float64)).shape[1:])

    def _producer_name(self, tensor: str) -> tuple[str, str]:
        node = next((n for n in self.live if tensor in n.output), None)
        return (node.op_type, node.name or tensor) if node is not None else ("?", tensor)

    def record_shapes(self, interior: set[str], covered: set[int] = frozenset()) -> list[UnsupportedOperationError]:
        """Per-sample shapes and types of the data tensors that are used (the output and the inputs of live
        nodes, tensors inside a recognised activation excepted); constants identical across the runs."""
        problems: dict[str, UnsupportedOperationError] = {}
        used = {i for n in self.live for i in node_inputs(n)} | {self.output}
        firsts = {n.output[0] for n in self.live if n.output and n.output[0] in self.kinds.data}
        for name in sorted((self.kinds.data & (used | firsts)) - interior - {self.input_name}):
            op, node = self._producer_name(name)
            producer = next((n for n in self.live if name in n.output), None)
            if producer is not None and id(producer) not in covered and (
                    producer.op_type not in CONVERTERS or producer.domain not in ("", "ai.onnx")):
                problems.setdefault(node, UnsupportedOperationError(op, node, hint_for(op, producer.domain)))
                continue
            try:
                self.shapes[name] = self._sample_shape(name, op, node, check_type=name in used)
            except UnsupportedOperationError as exc:
                problems.setdefault(node, exc)
        for name, m in self.kinds.batch.items():  # the symbolic tracking must agree with every run
            for b, values in self.runs:
                v = values.get(name)
                if v is None:
                    continue
                v = np.asarray(v)
                first = np.asarray(self.values.get(name, v))
                if v.shape != m.is_b.shape or (m.is_b.any() and not np.all(v[m.is_b] == b)) or (
                        v.shape == first.shape and not np.array_equal(v[~m.depends], first[~m.depends])):
                    op, node = self._producer_name(name)
                    problems.setdefault(node, UnsupportedOperationError(
                        op, node, f"could not follow how {name!r} depends on the batch size"))
        for name in self.kinds.consts:
            for _, values in self.runs[1:]:
                v = values.get(name)
                if v is not None and not np.array_equal(np.asarray(v), np.asarray(self.values.get(name, v)),
                                                        equal_nan=np.asarray(v).dtype.kind == "f"):
                    op, node = self._producer_name(name)
                    problems.setdefault(node, UnsupportedOperationError(
                        op, node, f"constant {name!r} differs between two runs of the model (a non-deterministic or "
                        "batch-size-dependent value)"))
        return list(problems.values())

    def _sample_shape(self, name: str, op: str, node: str, check_type: bool) -> tuple[int, ...]:
        shape = None
        for b, values in self.runs:
            if name not in values:
                raise UnsupportedOperationError(op, node, f"onnxruntime did not return tensor {name!r}")
            v = np.asarray(values[name])
            if check_type and v.dtype not in FLOAT_TYPES:
                why = ("rounds to a lower precision (quantisation is not Lipschitz)" if v.dtype.kind == "f"
                       else "produces integer or boolean values from the input (not Lipschitz)")
                raise UnsupportedOperationError(op, node, f"{why}: tensor {name!r} is {v.dtype}")
            if self.batched:
                if v.ndim == 0 or v.shape[0] != b:
                    raise UnsupportedOperationError(
                        op, node, f"tensor {name!r} has shape {v.shape} for a batch of {b}: the batch axis is not "
                        "kept first; operations across samples are not supported (if the model has no batch "
                        "axis, pass --input-shape with all of its dims)")
                s = tuple(int(d) for d in v.shape[1:])
            else:
                s = tuple(int(d) for d in v.shape)
            if shape is not None and s != shape:
                raise UnsupportedOperationError(op, node, f"tensor {name!r} has per-sample shape {shape} at one batch "
                                                f"size and {s} at another")
            shape = s
        return shape

    def extract(self) -> Graph:
        if self.output in self.kinds.consts or self.output in self.kinds.batch:
            raise UserInputError("the model output does not depend on its input")
        graph_outputs = {o.name for o in self.model.graph.output}
        regions = find_activation_regions(self.live, self.kinds.data, self.kinds.consts, graph_outputs)
        covered = {id(n) for r in regions for n in r.nodes}
        interior = {o for r in regions for n in r.nodes for o in n.output if o != r.output}
        region_at_output = {id(r.nodes[-1]): r for r in regions}
        problems = self.record_shapes(interior, covered)
        reported = {p.node_name for p in problems}
        for node in self.live:
            outs = [o for o in node.output if o]
            if not any(o in self.kinds.data for o in outs):
                continue
            if (node.name or outs[0]) in reported:
                continue
            if id(node) in covered:
                region = region_at_output.get(id(node))
                if region is not None:
                    src = self.resolve(region.source)
                    if self.shapes.get(region.output) != self.shapes[src]:
                        problems.append(UnsupportedOperationError(node.op_type, node.name or outs[0],
                                                                  "the activation changes the tensor's shape"))
                        continue
                    self.nodes.append(Node(region.output, region.activation, [src], self.shapes[src],
                                           f"{region.activation.name} ({len(region.nodes)} ONNX nodes)"))
                continue
            missing = [i for i in node_inputs(node) if i in self.kinds.data and self.resolve(i) not in self.shapes]
            if missing or outs[0] not in self.shapes:
                continue  # an earlier problem (already reported) left this node without shapes
            try:
                self.convert(node)
            except UnsupportedOperationError as exc:
                problems.append(exc)
        if problems:
            raise UnsupportedModelError(problems, [{"name": n.name, "op": n.op_type} for n in self.live])
        output = self.resolve(self.output)
        if output == self.input_name:
            raise UserInputError("the model is the identity map; nothing to certify")
        shape = self.shapes[output]
        if 0 in shape:
            raise UserInputError(f"the model output has shape {shape}: it is empty")
        if shape == ():  # one number per sample: give it an axis (an isometry) so every method sees a vector
            from lipverify.ops.shape import Reshape

            self.nodes.append(Node(output + "::vector", Reshape((1,)), [output], (1,), "output as a vector"))
            output += "::vector"
        return Graph(self.input_name, self.input_shape, self.nodes, output)

    def convert(self, node) -> None:
        name = node.name or node.output[0]
        converter = CONVERTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if converter is None:
            detail = hint_for(node.op_type, node.domain)
            raise UnsupportedOperationError(node.op_type, name, detail)
        view = NodeView(node, self)
        for key, value in view.attrs.items():
            if isinstance(value, float) and not np.isfinite(value) and key not in ("min", "max"):
                raise UnsupportedOperationError(node.op_type, name, f"attribute {key} = {value} is not finite")
        first = len(self.nodes)
        try:
            converter(view)
        except UnsupportedOperationError:
            raise
        except (ValueError, RuntimeError, IndexError, TypeError, KeyError, ZeroDivisionError) as exc:
            raise UnsupportedOperationError(node.op_type, name, f"could not convert it ({type(exc).__name__}: {exc})"
                                            .split("\n")[0]) from exc
        for ir in self.nodes[first:]:
            for key, value in vars(ir.op).items():
                bad = (isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())) \
                    or (isinstance(value, float) and np.isnan(value))
                if bad:
                    raise UnsupportedOperationError(node.op_type, name, f"its {key} is not finite (NaN or Inf)")
        unchecked = [i for i in range(len(node.input))
                     if node.input[i] in self.kinds.batch and i not in view.batch_inputs_ok]
        if unchecked:
            raise UnsupportedOperationError(node.op_type, name, "uses the batch size as a value (an input computed "
                                            "from Shape/Size of a data tensor); the output for one sample would depend "
                                            "on how many samples are evaluated together")


def extract_onnx(model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None) -> Graph:
    return OnnxExtractor(model, input_shape).extract()
