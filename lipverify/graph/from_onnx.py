"""Extract the Lipschitz graph from an ONNX model.

1. Run the model once in onnxruntime on a small random batch with every intermediate tensor exposed:
   this gives every constant subgraph's value (e.g. spectral-normalized weights computed inside the
   graph) and every tensor's observed shape, whatever the opset.
2. Tensors that do not depend on the input values (initializers, Constant nodes, Shape of anything,
   and whatever is computed from those only) are constants; their nodes disappear.
3. Decomposed activations (GELU as Div/Erf/Add/Mul, SiLU as Sigmoid/Mul, ...) are recognised as one
   elementwise function of one tensor and matched numerically against known activations.
4. Every remaining node goes through its converter in ``onnx_ops``; an unknown op is an error that
   names the op and the node.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from lipverify.errors import UnsupportedOperationError, UserInputError
from lipverify.graph.elementwise import find_activation_regions
from lipverify.graph.ir import Graph, Node
from lipverify.graph.onnx_ops import CONVERTERS

SHAPE_ONLY_OPS = {"Shape", "Size"}
MAX_INPUT_VALUES = 50_000_000  # per sample  # depend on the input's shape, never its values


def run_all_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        raise UserInputError(f"onnxruntime could not run the model: {exc}".split("\n")[0]) from exc
    return {o.name: v for o, v in zip(session.get_outputs(), outputs)}


def model_input(model: onnx.ModelProto):
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise UserInputError(f"the model must have exactly one input tensor (found: {names})")
    return inputs[0]


def declared_shape(value_info) -> list:
    """Dims of an ONNX input: int for fixed dims, None for symbolic/unknown."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def resolve_input_shape(model: onnx.ModelProto, input_shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], int]:
    """Per-sample input shape and the batch size to probe with."""
    inp = model_input(model)
    dims = declared_shape(inp)
    fixed_batch = dims[0] if dims and dims[0] else None
    if input_shape is not None:
        if dims and len(dims) - 1 != len(input_shape):
            raise UserInputError(f"--input-shape {tuple(input_shape)} has {len(input_shape)} dims but the model input "
                                 f"{inp.name!r} has {len(dims) - 1} per-sample dims {dims[1:]}")
        for d, s in zip(dims[1:], input_shape):
            if d and d != s:
                raise UserInputError(f"--input-shape {tuple(input_shape)} does not match the model's declared input {dims}")
        return tuple(int(s) for s in input_shape), fixed_batch or 2
    if not dims or any(d is None for d in dims[1:]):
        raise UserInputError(f"the model input {inp.name!r} has shape {dims or 'unknown'}; pass --input-shape "
                             "(per-sample, without the batch axis), e.g. --input-shape 1,28,28")
    if any(d <= 0 for d in dims[1:]) or np.prod(dims[1:], dtype=np.float64) > MAX_INPUT_VALUES:
        raise UserInputError(f"the model input {inp.name!r} declares an impossible per-sample shape {dims[1:]}")
    if fixed_batch is not None and fixed_batch > 1024:
        raise UserInputError(f"the model input {inp.name!r} has a fixed batch size of {fixed_batch}; export it "
                             "with a dynamic (or size-1) batch axis")
    return tuple(dims[1:]), fixed_batch or 2


class NodeView:
    """What a converter sees of one ONNX node, and how it emits IR nodes."""

    def __init__(self, node, extractor: "OnnxExtractor"):
        self.node = node
        self.x = extractor
        self.op_type = node.op_type
        self.opset = extractor.opset
        self.n_inputs = len(node.input)
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self.out_shape = extractor.shapes[node.output[0]]
        self.display_name = node.name or f"{node.op_type}->{node.output[0]}"

    def attr(self, name, default=None):
        value = self.attrs.get(name, default)
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, list):
            value = [int(v) if isinstance(v, (int, np.integer)) else v for v in value]
        return value

    def unsupported(self, detail: str):
        raise UnsupportedOperationError(self.op_type, self.display_name, detail)

    def is_const(self, i: int) -> bool:
        return self.node.input[i] in self.x.consts

    def const(self, i: int, what: str) -> np.ndarray:
        if i >= self.n_inputs or not self.node.input[i]:
            self.unsupported(f"missing input {what}")
        name = self.node.input[i]
        if name not in self.x.consts:
            self.unsupported(f"{what} depends on the model input; only constant {what} is supported")
        return np.asarray(self.x.consts[name])

    def per_sample_const(self, i: int) -> np.ndarray:
        """A constant operand of a broadcasting op, without its batch axis, as float64."""
        c = self.const(i, "constant operand").astype(np.float64)
        rank = len(self.out_shape) + 1
        if c.ndim == rank:
            if c.shape[0] != 1:
                self.unsupported("a constant operand varies along the batch axis")
            c = c[0]
        try:
            broadcast = np.broadcast_shapes(c.shape, self.out_shape)
        except ValueError:
            self.unsupported(f"constant of shape {c.shape} does not broadcast to {self.out_shape}")
        if tuple(broadcast) != tuple(self.out_shape):
            self.unsupported("the constant operand broadcasts the input to a larger shape")
        return c

    def in_shape(self, i: int) -> tuple[int, ...]:
        return self.x.shapes[self.x.resolve(self.node.input[i])]

    def require_same_shape(self):
        for i in range(self.n_inputs):
            if self.in_shape(i) != self.out_shape:
                self.unsupported(f"broadcasting between input-dependent tensors {self.in_shape(i)} -> {self.out_shape}")

    def data_input(self) -> int:
        for i in range(self.n_inputs):
            if self.node.input[i] and not self.is_const(i):
                return i
        self.unsupported("no input-dependent operand")

    def emit(self, *ops, from_input: int | None = None):
        """Append a chain of unary ops; the last one produces the node's output tensor."""
        src = self.x.resolve(self.node.input[self.data_input() if from_input is None else from_input])
        for k, op in enumerate(ops):
            name = self.node.output[0] if k == len(ops) - 1 else f"{self.node.output[0]}::{k}"
            in_shape = self.x.shapes[src]
            shape = self.out_shape if k == len(ops) - 1 else in_shape
            self.x.shapes[name] = shape
            self.x.nodes.append(Node(name, op, [src], shape, self.display_name))
            src = name

    def emit_merge(self, op, input_indices: list[int]):
        inputs = [self.x.resolve(self.node.input[i]) for i in input_indices]
        self.x.nodes.append(Node(self.node.output[0], op, inputs, self.out_shape, self.display_name))

    def alias(self):
        self.x.aliases[self.node.output[0]] = self.x.resolve(self.node.input[self.data_input()])


class OnnxExtractor:
    def __init__(self, model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None, seed: int = 0):
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.input_name = model_input(model).name
        self.input_shape, batch = resolve_input_shape(model, input_shape)
        rng = np.random.default_rng(seed)
        probe = rng.standard_normal((batch,) + self.input_shape).astype(np.float32)
        self.values = run_all_tensors(model, {self.input_name: probe})
        self.batch = batch
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.shapes: dict[str, tuple[int, ...]] = {self.input_name: self.input_shape}
        self.nodes: list[Node] = []
        self.aliases: dict[str, str] = {}

    def resolve(self, name: str) -> str:
        while name in self.aliases:
            name = self.aliases[name]
        return name

    def fold_constants(self):
        for node in self.model.graph.node:
            inputs = [i for i in node.input if i]
            if node.op_type in SHAPE_ONLY_OPS or node.op_type == "Constant" or all(i in self.consts for i in inputs):
                for out in node.output:
                    if out:
                        if out not in self.values:
                            raise UserInputError(f"could not evaluate constant {out!r} of node {node.name!r}")
                        self.consts[out] = self.values[out]

    def record_shapes(self):
        for name, value in self.values.items():
            if name in self.consts:
                continue
            if value.ndim == 0 or value.shape[0] != self.batch:
                producer = next((n for n in self.model.graph.node if name in n.output), None)
                raise UnsupportedOperationError(producer.op_type if producer else "?", producer.name if producer else name,
                                                f"tensor {name!r} of shape {value.shape} does not keep the batch axis "
                                                "first; operations across samples are not supported")
            self.shapes[name] = tuple(int(s) for s in value.shape[1:])

    def extract(self) -> Graph:
        self.fold_constants()
        self.record_shapes()
        regions = find_activation_regions(self.model, self.consts, self.input_name)
        covered = {id(n) for r in regions for n in r.nodes}
        region_at_output = {id(r.nodes[-1]): r for r in regions}
        for node in self.model.graph.node:
            if all(o in self.consts or not o for o in node.output):
                continue
            if id(node) in covered:
                region = region_at_output.get(id(node))
                if region is not None:
                    src = self.resolve(region.source)
                    out = region.output
                    self.nodes.append(Node(out, region.activation, [src], self.shapes[out],
                                           f"{region.activation.name} ({len(region.nodes)} ONNX nodes)"))
                continue
            converter = CONVERTERS.get(node.op_type)
            if converter is None or node.domain not in ("", "ai.onnx"):
                raise UnsupportedOperationError(node.op_type, node.name or node.output[0],
                                                "no converter; supported ops: " + ", ".join(sorted(CONVERTERS)))
            converter(NodeView(node, self))
        output = self.model.graph.output[0].name
        if output in self.consts:
            raise UserInputError("the model output does not depend on its input")
        output = self.resolve(output)
        if output == self.input_name:
            raise UserInputError("the model is the identity map; nothing to certify")
        return Graph(self.input_name, self.input_shape, self.nodes, output)


def extract_onnx(model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None) -> Graph:
    return OnnxExtractor(model, input_shape).extract()
