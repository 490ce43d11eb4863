"""Fuzz the CLI with bad inputs: every case must end with exit 0, 1 or 2 and never a traceback.

Cases are generated from a seed (plain seeded mutation, reproducible case by case):

* ``onnx``: bit flips, truncation, byte insertions/deletions of the fixture ONNX files, and
  protobuf field edits through the onnx API (initializer dims and data sizes, data types, input
  dims, attribute values incl. NaN/huge/negative, op types, node inputs, removed nodes or
  initializers, NaN/Inf weights, huge declared sizes, external-data locations, opset versions).
* ``safetensors``: header length / JSON / dtype / shape / offset corruption, huge declared sizes,
  truncation, NaN weights; with the fixture spec, without it, or with a mutated spec.
* ``spec``: wrong JSON specs (types, missing keys, unknown layers, wrong tensors, absurd values).
* ``data``: malformed --data files (npz, csv, pt, safetensors): wrong keys, shapes, dtypes, NaN,
  pickled objects, ragged rows, garbage bytes, empty files, labels out of range.
* ``shape``: absurd --input-shape values; ``cli``: bad arguments and option values;
  ``check``: mutated certificates for ``lipverify check``.

Each case runs through ``typer.testing.CliRunner`` on ``lipverify.cli.app`` inside a persistent
worker process (spawned, 1 torch thread, address space limited); the parent kills and restarts the
worker when a case exceeds its timeout (a hang). Outcomes: ``exit0/1/2`` (fine), ``exit2-silent``
(exit 2 without a message), ``traceback`` (an exception escaped: the CLI's ``main`` would print
"internal error", exit 3), ``exit3`` (reported internal/soundness error), ``hang``, ``crash`` (the
worker died, e.g. a segfault or the memory limit).

    python benchmarks/fuzz_inputs.py --cases 1000            # counts by outcome and category
    python benchmarks/fuzz_inputs.py --case 123 --verbose    # rerun one case
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
CATEGORIES = ("onnx", "onnx_edit", "safetensors", "spec", "data", "shape", "cli", "check")
FAST = ["--method", "product", "--lower-starts", "2", "--device", "cpu", "-q"]


@dataclass
class Case:
    seed: int
    category: str
    what: str  # human-readable description of the mutation
    argv: list[str]
    files: dict[str, bytes] = field(default_factory=dict)  # written into the case folder first

    def describe(self) -> str:
        return f"case {self.seed} [{self.category}] {self.what}: lipverify {' '.join(self.argv)}"


# ----------------------------------------------------------------------------------------------
# generators
# ----------------------------------------------------------------------------------------------


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _byte_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    kind = rng.choice(["flip", "flip", "truncate", "insert", "delete", "zero", "splice"])
    if kind == "flip":
        n = rng.choice([1, 2, 5, 20, 100])
        for _ in range(n):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"{n} bit flips"
    if kind == "truncate":
        n = rng.choice([0, 1, 4, 16, rng.randrange(len(b)), len(b) - 1])
        return bytes(b[:n]), f"truncated to {n} bytes"
    if kind == "insert":
        i = rng.randrange(len(b))
        junk = bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 64])))
        return bytes(b[:i] + junk + b[i:]), f"{len(junk)} bytes inserted at {i}"
    if kind == "delete":
        i = rng.randrange(len(b))
        n = rng.choice([1, 8, 64])
        return bytes(b[:i] + b[i + n:]), f"{n} bytes deleted at {i}"
    if kind == "zero":
        i = rng.randrange(len(b))
        n = rng.choice([4, 64, 1024])
        b[i:i + n] = bytes(min(n, len(b) - i))
        return bytes(b), f"{n} bytes zeroed at {i}"
    other = _fixture(rng.choice(["mlp.onnx", "cnn_bn.onnx", "resmlp.onnx"]))
    i, j = rng.randrange(len(b)), rng.randrange(len(other))
    return bytes(b[:i] + other[j:]), f"spliced with another model at {i}/{j}"


def _onnx_bytes_case(rng: random.Random, seed: int) -> Case:
    name = rng.choice(["mlp.onnx", "cnn_bn.onnx", "resmlp.onnx"])
    data, what = _byte_mutation(rng, _fixture(name))
    cmd = rng.choice([["certify", "m.onnx", *FAST], ["inspect", "m.onnx"]])
    return Case(seed, "onnx", f"{name}: {what}", cmd, {"m.onnx": data})


def _onnx_edit_case(rng: random.Random, seed: int) -> Case:
    """Edit protobuf fields through the onnx API (the file still parses)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    name = rng.choice(["mlp.onnx", "cnn_bn.onnx", "resmlp.onnx"])
    m = onnx.load_from_string(_fixture(name))
    g = m.graph
    edits = ["init_dims", "init_dtype", "init_raw_size", "init_nan", "init_huge_dims", "input_dims",
             "attribute", "op_type", "node_input", "remove_node", "remove_init", "external", "opset",
             "output_name", "empty_graph", "no_output", "duplicate_node", "init_to_float_data", "second_input",
             "ir_version"]
    kind = rng.choice(edits)
    what = kind
    inits = list(g.initializer)
    if kind == "init_dims" and inits:
        t = rng.choice(inits)
        i = rng.randrange(max(1, len(t.dims)))
        new = rng.choice([0, 1, 3, -1, 7, 2**31 - 1])
        if t.dims:
            t.dims[i] = new
        else:
            t.dims.append(new)
        what = f"initializer {t.name} dim {i} -> {new}"
    elif kind == "init_dtype" and inits:
        t = rng.choice(inits)
        t.data_type = rng.choice([TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL,
                                  TensorProto.STRING, TensorProto.UINT8, 0, 99])
        what = f"initializer {t.name} data_type -> {t.data_type}"
    elif kind == "init_raw_size" and inits:
        t = rng.choice(inits)
        raw = t.raw_data
        t.raw_data = raw[: rng.randrange(max(1, len(raw)))] if rng.random() < 0.5 else raw + b"\0" * rng.choice([1, 4, 400])
        what = f"initializer {t.name} raw_data {len(raw)} -> {len(t.raw_data)} bytes"
    elif kind == "init_nan" and inits:
        t = rng.choice(inits)
        arr = numpy_helper.to_array(t).copy()
        if arr.size and arr.dtype.kind == "f":
            arr.flat[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, -np.inf, 3e38])
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        what = f"initializer {t.name}: one entry NaN/Inf/huge"
    elif kind == "init_huge_dims" and inits:
        t = rng.choice(inits)
        del t.dims[:]
        t.dims.extend(rng.choice([[2**40], [100000, 100000], [2**20, 2**20, 2**20], [2**62]]))
        what = f"initializer {t.name} declared dims {list(t.dims)}"
    elif kind == "input_dims":
        dims = g.input[0].type.tensor_type.shape.dim
        if len(dims):
            d = dims[rng.randrange(len(dims))]
            choice = rng.choice([0, -5, 2**40, "sym", None])
            if choice is None:
                d.Clear()
            elif choice == "sym":
                d.dim_param = "N"
            else:
                d.dim_value = choice
            what = f"graph input dim -> {choice}"
        if rng.random() < 0.3:
            g.input[0].type.tensor_type.elem_type = rng.choice([TensorProto.INT64, TensorProto.STRING, 0])
            what += " and elem_type changed"
    elif kind == "attribute":
        nodes = [n for n in g.node if n.attribute]
        if nodes:
            n = rng.choice(nodes)
            a = rng.choice(list(n.attribute))
            if a.type == onnx.AttributeProto.INT:
                a.i = rng.choice([0, -1, 2**40, 3, 1000])
            elif a.type == onnx.AttributeProto.INTS:
                del a.ints[:]
                a.ints.extend(rng.choice([[], [0], [-1, -1], [1000, 1000], [2**40, 1], [1, 2, 3, 4, 5, 6, 7]]))
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = rng.choice([float("nan"), float("inf"), -1e30, -3.0, 0.0])
            elif a.type == onnx.AttributeProto.STRING:
                a.s = rng.choice([b"", b"SAME_UPPER", b"garbage", b"\xff\xfe"])
            what = f"node {n.name} ({n.op_type}) attribute {a.name} changed"
        else:
            n = rng.choice(list(g.node))
            n.attribute.append(helper.make_attribute(rng.choice(["alpha", "axis", "kernel_shape", "junk"]),
                                                     rng.choice([5, -7, [3, 3], 1.5])))
            what = f"node {n.name} ({n.op_type}) extra attribute"
    elif kind == "op_type":
        n = rng.choice(list(g.node))
        old = n.op_type
        n.op_type = rng.choice(["Relu", "Gemm", "Conv", "MatMul", "Add", "Concat", "LSTM", "Loop", "If", "Abs",
                                "Softmax", "MaxPool", "Reshape", "NonZero", "Resize", "Garbage", "Sin", "Where"])
        what = f"node {n.name} op_type {old} -> {n.op_type}"
    elif kind == "node_input":
        n = rng.choice([n for n in g.node if n.input] or list(g.node))
        if n.input:
            i = rng.randrange(len(n.input))
            choices = [x.name for x in inits] + [o for nn in g.node for o in nn.output] + ["", "missing", g.input[0].name]
            n.input[i] = rng.choice(choices)
            what = f"node {n.name} input {i} -> {n.input[i]!r}"
    elif kind == "remove_node":
        i = rng.randrange(len(g.node))
        what = f"node {g.node[i].name} ({g.node[i].op_type}) removed"
        del g.node[i]
    elif kind == "remove_init" and inits:
        i = rng.randrange(len(inits))
        what = f"initializer {inits[i].name} removed"
        del g.initializer[i]
    elif kind == "external" and inits:
        t = rng.choice(inits)
        loc = rng.choice(["missing.bin", "../../../../etc/hostname", "/etc/hostname", "data.bin", ""])
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", loc), ("offset", str(rng.choice([0, 10**12]))),
                     ("length", str(rng.choice([4, 10**12, -1])))):
            e = t.external_data.add()
            e.key, e.value = k, v
        t.ClearField("raw_data")
        what = f"initializer {t.name} -> external data {loc!r}"
    elif kind == "opset":
        m.opset_import[0].version = rng.choice([1, 6, 9, 23, 99, 0])
        what = f"opset -> {m.opset_import[0].version}"
    elif kind == "output_name":
        g.output[0].name = rng.choice(["nonexistent", "", g.input[0].name])
        what = f"graph output -> {g.output[0].name!r}"
    elif kind == "empty_graph":
        del g.node[:]
        what = "all nodes removed"
    elif kind == "no_output":
        del g.output[:]
        what = "graph outputs removed"
    elif kind == "duplicate_node":
        n = rng.choice(list(g.node))
        g.node.append(n)
        what = f"node {n.name} duplicated (output defined twice)"
    elif kind == "init_to_float_data" and inits:
        t = rng.choice(inits)
        arr = numpy_helper.to_array(t).astype(np.float32).ravel()
        t.ClearField("raw_data")
        t.float_data.extend(arr[: max(0, len(arr) - rng.choice([0, 1, 5]))].tolist())
        what = f"initializer {t.name} stored as float_data (maybe short)"
    elif kind == "second_input":
        g.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [None, 3]))
        what = "second graph input"
    elif kind == "ir_version":
        m.ir_version = rng.choice([0, 1, 99, 2**40])
        what = f"ir_version -> {m.ir_version}"
    cmd = rng.choice([["certify", "m.onnx", *FAST], ["certify", "m.onnx", *FAST], ["inspect", "m.onnx"]])
    files = {"m.onnx": m.SerializeToString()}
    if kind == "external":
        files["data.bin"] = b"\0" * 16
    return Case(seed, "onnx_edit", f"{name}: {what}", cmd, files)


def _safetensors_bytes(tensors: dict, header_extra: dict | None = None) -> bytes:
    import numpy as np

    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.tobytes()
        header[name] = {"dtype": {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64"}[str(arr.dtype)],
                        "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header.update(header_extra or {})
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def _read_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _pack_header(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _safetensors_case(rng: random.Random, seed: int) -> Case:
    base = rng.choice(["mlp", "cnn_bn", "resmlp"])
    data = _fixture(f"{base}.safetensors")
    header, body = _read_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.choice(["bytes", "header_len", "header_json", "dtype", "shape", "offsets", "huge", "nan",
                       "missing_tensor", "extra_tensor", "metadata", "empty"])
    what = kind
    if kind == "bytes":
        data, what = _byte_mutation(rng, data)
    elif kind == "header_len":
        v = rng.choice([0, 1, 7, len(data) + 1, 2**40, 2**64 - 1])
        data = struct.pack("<Q", v) + data[8:]
        what = f"header length -> {v}"
    elif kind == "header_json":
        n = struct.unpack("<Q", data[:8])[0]
        h = bytearray(data[8:8 + n])
        i = rng.randrange(len(h))
        h[i] = rng.choice(b"{}[]\",:x\x00\xff")
        data = data[:8] + bytes(h) + data[8 + n:]
        what = f"header JSON byte {i} changed"
    elif kind == "dtype":
        t = rng.choice(names)
        header[t]["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "I8", "BOOL", "U8", "XX", "", 5])
        data = _pack_header(header, body)
        what = f"{t} dtype -> {header[t]['dtype']}"
    elif kind == "shape":
        t = rng.choice(names)
        header[t]["shape"] = rng.choice([[], [0], [-1], [1, 2, 3], list(reversed(header[t]["shape"])), "x",
                                         header[t]["shape"] + [1]])
        data = _pack_header(header, body)
        what = f"{t} shape -> {header[t]['shape']}"
    elif kind == "offsets":
        t = rng.choice(names)
        a, b = header[t]["data_offsets"]
        header[t]["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a, 2**40], [-4, b], [a], "x", [a + 1, b + 1]])
        data = _pack_header(header, body)
        what = f"{t} data_offsets -> {header[t]['data_offsets']}"
    elif kind == "huge":
        t = rng.choice(names)
        header[t]["shape"] = rng.choice([[2**20, 2**20], [10**9], [2**31, 2**31]])
        header[t]["data_offsets"] = [0, 4 * int(__import__("math").prod(header[t]["shape"]))]
        data = _pack_header(header, body)
        what = f"{t} declared shape {header[t]['shape']}"
    elif kind == "nan":
        import numpy as np

        t = rng.choice(names)
        a, b = header[t]["data_offsets"]
        arr = np.frombuffer(body[a:b], dtype=np.float32).copy()
        arr[rng.randrange(len(arr))] = rng.choice([np.nan, np.inf])
        body = body[:a] + arr.tobytes() + body[b:]
        data = _pack_header(header, body)
        what = f"{t}: a NaN/Inf entry"
    elif kind == "missing_tensor":
        t = rng.choice(names)
        del header[t]
        data = _pack_header(header, body)
        what = f"{t} removed from the header"
    elif kind == "extra_tensor":
        header["zzz.weight"] = {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]}
        data = _pack_header(header, body)
        what = "an extra tensor aliasing the first bytes"
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"a": 5}, "x", [1], None])
        data = _pack_header(header, body)
        what = f"__metadata__ -> {header['__metadata__']!r}"
    elif kind == "empty":
        data = _pack_header({}, b"")
        what = "no tensors"
    files = {"m.safetensors": data}
    spec_mode = rng.choice(["spec", "spec", "none", "mutated"])
    extra: list[str] = []
    if spec_mode == "spec":
        files["s.json"] = _fixture(f"{base}.json")
        extra += ["--spec", "s.json"]
    elif spec_mode == "mutated":
        files["s.json"], w = _mutated_spec(rng, base)
        extra += ["--spec", "s.json"]
        what += f"; spec {w}"
    else:
        what += "; no spec"
        if rng.random() < 0.5:
            extra += ["--input-shape", rng.choice(["64", "1,8,8", "3", "0"])]
    argv = ["inspect", "m.safetensors", *extra] if rng.random() < 0.3 else ["certify", "m.safetensors", *FAST, *extra]
    return Case(seed, "safetensors", f"{base}: {what}", argv, files)


def _mutated_spec(rng: random.Random, base: str) -> tuple[bytes, str]:
    spec = json.loads(_fixture(f"{base}.json"))
    kind = rng.choice(["not_json", "list", "format", "version", "layers_missing", "layers_empty", "layer_type",
                       "layer_not_dict", "tensor_name", "tensor_type", "int_field", "input_shape", "extra_key",
                       "deep_residual", "swap_layers", "activation_param", "huge_kernel", "drop_layer"])
    layers = spec.get("layers", [])
    what = kind
    if kind == "not_json":
        return rng.choice([b"{", b"", b"\xff\xfe", b"null", b"[1,2", b"{\"layers\": NaN}"]), "not JSON"
    if kind == "list":
        return json.dumps(layers).encode(), "a list, not an object"
    if kind == "format":
        spec["format"] = rng.choice(["other", 5, None])
    elif kind == "version":
        spec["version"] = rng.choice([0, 2, "1", None, 1.5])
    elif kind == "layers_missing":
        spec.pop("layers", None)
    elif kind == "layers_empty":
        spec["layers"] = rng.choice([[], {}, "relu", None])
    elif kind == "layer_type" and layers:
        rng.choice(layers)["type"] = rng.choice(["lstm", "", 5, None, "Linear", "dropout"])
    elif kind == "layer_not_dict" and layers:
        layers[rng.randrange(len(layers))] = rng.choice(["relu", 5, None, []])
    elif kind == "tensor_name":
        cand = [l for l in layers if isinstance(l, dict) and "weight" in l] or layers
        if cand:
            rng.choice(cand)["weight"] = rng.choice(["nope.weight", "", "fc1.bias", "conv1.weight", "fc3.weight"])
    elif kind == "tensor_type":
        cand = [l for l in layers if isinstance(l, dict) and "weight" in l] or layers
        if cand:
            rng.choice(cand)["weight"] = rng.choice([5, None, ["a"], {"x": 1}])
    elif kind == "int_field":
        cand = [l for l in layers if isinstance(l, dict) and l.get("type") == "conv2d"]
        if cand:
            rng.choice(cand)[rng.choice(["stride", "padding", "dilation", "groups"])] = rng.choice(
                [0, -1, 2**40, 1.5, "2", [1, 2, 3], True, [0, 0], 7])
        else:
            spec["input_shape"] = rng.choice([[0], [-1, 8, 8], [2**40], "64"])
    elif kind == "input_shape":
        spec["input_shape"] = rng.choice([[0], [-1, 8, 8], [2**31, 2**31], "1,8,8", [1.5], [], [3, 8, 8], [64],
                                          [1, 8, 8, 1], None])
    elif kind == "extra_key" and layers:
        rng.choice([l for l in layers if isinstance(l, dict)] or [{}])["surprise"] = 1
    elif kind == "deep_residual":
        # written as text: json.dumps itself cannot encode thousands of nesting levels
        depth = rng.choice([5, 200, 2000, 100000])
        deep = '{"type": "residual", "layers": [' * depth + '{"type": "relu"}' + "]}" * depth
        head = json.dumps(dict(spec, layers=["@"]))
        first = json.dumps(layers[0]) + ", " if layers else ""
        rest = "".join(", " + json.dumps(l) for l in layers[1:])
        return head.replace('"@"', first + deep + rest).encode(), f"residual nested {depth} deep"
    elif kind == "swap_layers" and len(layers) > 2:
        i, j = rng.sample(range(len(layers)), 2)
        layers[i], layers[j] = layers[j], layers[i]
    elif kind == "activation_param":
        layers.insert(rng.randrange(len(layers) + 1), rng.choice([
            {"type": "leaky_relu", "negative_slope": rng.choice([float("nan"), 1e308, -5, "x"])},
            {"type": "elu", "alpha": rng.choice([0, -1, 1e308])},
            {"type": "softplus", "beta": rng.choice([0, 1e-300, 1e300])},
            {"type": "gelu", "approximate": rng.choice(["tanh", "exact", 5])}]))
    elif kind == "huge_kernel":
        layers.insert(0, rng.choice([{"type": "maxpool2d", "kernel_size": rng.choice([100, 2**31, [3, 0]])},
                                     {"type": "avgpool2d", "kernel_size": 2, "stride": 2**40}]))
    elif kind == "drop_layer" and layers:
        del layers[rng.randrange(len(layers))]
    text = json.dumps(spec, allow_nan=True)
    return text.encode(), kind


def _spec_case(rng: random.Random, seed: int) -> Case:
    base = rng.choice(["mlp", "cnn_bn", "resmlp"])
    spec, what = _mutated_spec(rng, base)
    cmd = rng.choice([["certify", "m.safetensors", "--spec", "s.json", *FAST],
                      ["inspect", "m.safetensors", "--spec", "s.json"]])
    return Case(seed, "spec", f"{base}: {what}", cmd, {"m.safetensors": _fixture(f"{base}.safetensors"), "s.json": spec})


def _data_case(rng: random.Random, seed: int) -> Case:
    import io

    import numpy as np
    import torch

    x = np.load(FIXTURES / "digits_test.npz")["x"][:20]
    y = np.load(FIXTURES / "digits_test.npz")["y"][:20]
    fmt = rng.choice(["npz", "npz", "csv", "pt", "safetensors", "garbage"])
    kind = ""
    if fmt == "npz":
        kind = rng.choice(["missing_key", "shape", "nan", "labels_range", "labels_float", "one_hot", "object",
                           "strings", "empty", "mismatch", "bytes", "scalar", "huge_label", "bool"])
        arrays = {"x": x, "y": y}
        if kind == "missing_key":
            arrays = {"inputs": x, "y": y}
        elif kind == "shape":
            arrays["x"] = rng.choice([x.reshape(20, 64)[:, :50], x.reshape(20, 8, 8, 1).repeat(3, -1), x[0]])
        elif kind == "nan":
            xx = x.copy()
            xx[3, 0, 2, 2] = np.nan
            arrays["x"] = xx
        elif kind == "labels_range":
            arrays["y"] = y + rng.choice([10, -20])
        elif kind == "labels_float":
            arrays["y"] = y + 0.5
        elif kind == "one_hot":
            arrays["y"] = np.eye(10)[y]
        elif kind == "object":
            arrays["x"] = np.array([object()] * 20, dtype=object) if rng.random() < 0.5 else np.array(
                [[1], [1, 2]] * 10, dtype=object)
        elif kind == "strings":
            arrays["y"] = np.array(["a"] * 20)
        elif kind == "empty":
            arrays = {"x": x[:0], "y": y[:0]}
        elif kind == "mismatch":
            arrays["y"] = y[:7]
        elif kind == "scalar":
            arrays["x"] = np.float32(3.0)
        elif kind == "huge_label":
            arrays["y"] = np.full(20, 2**62, dtype=np.int64)
        elif kind == "bool":
            arrays["x"] = x > 0.5
        buf = io.BytesIO()
        try:
            np.savez(buf, **arrays)
        except Exception:
            np.savez(buf, x=x)
        data = buf.getvalue()
        if kind == "bytes":
            data, kind = _byte_mutation(rng, data)
        name = "d.npz"
    elif fmt == "csv":
        flat = x.reshape(20, -1)
        header = ["label"] + [f"p{i}" for i in range(64)]
        rows = [[str(int(l))] + [f"{v:g}" for v in r] for l, r in zip(y, flat)]
        kind = rng.choice(["no_header", "ragged", "text_cell", "no_label", "empty", "only_header", "nan",
                           "binary", "semicolon", "huge_cell", "extra_columns"])
        if kind == "no_header":
            lines = [",".join(r) for r in rows]
        else:
            if kind == "ragged":
                rows[5] = rows[5][:10]
            elif kind == "text_cell":
                rows[2][7] = "abc"
            elif kind == "no_label":
                header[0] = "target"
            elif kind == "nan":
                rows[1][3] = "nan"
            elif kind == "huge_cell":
                rows[0][1] = "9" * 5000
            elif kind == "extra_columns":
                header += ["extra"]
                rows = [r + ["1"] for r in rows]
            lines = [",".join(header)] + ([",".join(r) for r in rows] if kind != "only_header" else [])
            if kind == "semicolon":
                lines = [l.replace(",", ";") for l in lines]
        data = ("\n".join(lines) + "\n").encode()
        if kind == "empty":
            data = b""
        elif kind == "binary":
            data = bytes(rng.randrange(256) for _ in range(2000))
        name = "d.csv"
    elif fmt == "pt":
        kind = rng.choice(["tuple", "dict_missing", "pickle_code", "list3", "tensor_only", "bytes", "strings",
                           "nested"])
        buf = io.BytesIO()
        if kind == "pickle_code":
            import pickle

            class Evil:
                def __reduce__(self):
                    return (os.system, ("echo pwned",))

            pickle.dump(Evil(), buf)
        elif kind == "tuple":
            torch.save((torch.from_numpy(x), torch.from_numpy(y)), buf)
        elif kind == "dict_missing":
            torch.save({"images": torch.from_numpy(x)}, buf)
        elif kind == "list3":
            torch.save([torch.from_numpy(x), torch.from_numpy(y), torch.zeros(1)], buf)
        elif kind == "tensor_only":
            torch.save(torch.from_numpy(x), buf)
        elif kind == "strings":
            torch.save({"x": "hello", "y": [1, 2]}, buf)
        elif kind == "nested":
            torch.save({"x": {"a": torch.zeros(2)}, "y": torch.from_numpy(y)}, buf)
        else:
            torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, buf)
        data = buf.getvalue()
        if kind == "bytes":
            data, kind = _byte_mutation(rng, data)
        name = "d.pt"
    elif fmt == "safetensors":
        kind = rng.choice(["ok_then_bytes", "missing_y", "huge", "dtype"])
        data = _safetensors_bytes({"x": x, "y": y})
        if kind == "ok_then_bytes":
            data, kind = _byte_mutation(rng, data)
        elif kind == "missing_y":
            data = _safetensors_bytes({"x": x})
        elif kind == "huge":
            h, body = _read_safetensors(data)
            h["x"]["shape"] = [2**31, 64]
            data = _pack_header(h, body)
        elif kind == "dtype":
            h, body = _read_safetensors(data)
            h["y"]["dtype"] = "F16"
            data = _pack_header(h, body)
        name = "d.safetensors"
    else:
        data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 10, 3000])))
        name = rng.choice(["d.npz", "d.pt", "d.csv", "d.safetensors", "d.bin", "d.csv.gz"])
        kind = "random bytes"
    argv = ["certify", "m.onnx", *FAST, "--data", name]
    extra = rng.choice([[], [], ["--limit", "5"], ["--transform", "scale=1/16"], ["--batch-size", "3"],
                        ["--x-key", "images"], ["--eps", "0.1,0.2"], ["--transform", "normalize=0.5/0.25"]])
    return Case(seed, "data", f"{fmt}: {kind}", argv + extra, {"m.onnx": _fixture("mlp.onnx"), name: data})


def _shape_case(rng: random.Random, seed: int) -> Case:
    value = rng.choice(["0", "-1", "1e9", "a,b", "99999999999999999999", "1,2,3,4,5,6,7,8", "3x", "", ",,,",
                        "1,8,8", "64", "8,8", "1,1,1,1,64", "100000,100000", "2**31", "nan", "1,-8,8", " ",
                        "1;8;8", "0x10", "1,8,8,", "(1,8,8)", "1x8x8", "65", "1,64", "3,32,32", "4096,4096"])
    model = rng.choice(["mlp.onnx", "cnn_bn.onnx", "mlp.safetensors", "cnn_bn.pt", "mlp.pt"])
    files = {model: _fixture(model)}
    cmd = rng.choice([["certify", model, *FAST, "--input-shape", value], ["inspect", model, "--input-shape", value]])
    return Case(seed, "shape", f"--input-shape {value!r} on {model}", cmd, files)


def _cli_case(rng: random.Random, seed: int) -> Case:
    files = {"m.onnx": _fixture("mlp.onnx"), "d.npz": _fixture("digits_test.npz")}
    options = [
        ["--method", rng.choice(["nope", "", "ALL", "product,layerwise", "auto"])],
        ["--output", rng.choice(["-1", "10", "99999999999999999999", "x", "0"])],
        ["--eps", rng.choice(["abc", "-1", "nan", "inf", "", ",", "0", "1e400"])],
        ["--max-L", rng.choice(["nan", "-1", "inf", "x", "1e-300", "0"])],
        ["--lower-starts", rng.choice(["0", "-5", "1", "x"])],
        ["--budget-s", rng.choice(["-1", "0", "nan", "x", "1e-9"])],
        ["--device", rng.choice(["tpu", "cuda", "", "cpu:0", "auto"])],
        ["--seed", rng.choice(["-1", str(2**70), "x", "0"])],
        ["--limit", rng.choice(["0", "-3", "x", "5"]), "--data", "d.npz"],
        ["--batch-size", rng.choice(["0", "-1", "x"]), "--data", "d.npz"],
        ["--transform", rng.choice(["junk", "resize=0", "normalize=1/0", "scale=", "center_crop=9x9",
                                    "normalize=0.5:0.5/0.2", "scale=nan"]), "--data", "d.npz"],
        ["--report", rng.choice(["x.txt", "out/nested/r.html", "", "m.onnx", "."])],
        ["--json", rng.choice(["nodir/c.json", ".", "", "m.onnx"])],
        ["--min-certified-acc", rng.choice(["junk", "0.5", "0.5@", "@0.1", "2@0.1", "0.5@-1"])],
        ["--per-sample", "p.csv"],
        ["--per-sample", rng.choice(["m.onnx", "nodir/p.csv"]), "--data", "d.npz"],
        ["--spec", rng.choice(["missing.json", "m.onnx"])],
        ["--factory", rng.choice(["os:getcwd", "nope", "lipverify.cli:app", "json:loads", "x:y", ":"])],
        ["--budget-mem", rng.choice(["junk", "0", "1K", "-5G", "10T", "1.5G", "nan"])],
        ["--activation", rng.choice(["swish", "", "RELU"])],
        ["--unknown-flag"],
        ["--data", rng.choice(["missing.npz", ".", "m.onnx"])],
        ["--x-key", "nope", "--data", "d.npz"],
    ]
    argv = ["certify", "m.onnx", "--lower-starts", "2", "-q", "--device", "cpu"]
    for _ in range(rng.choice([1, 1, 2, 3])):
        argv += rng.choice(options)
    if "--method" not in argv:
        argv += ["--method", "product"]
    top = rng.random()
    if top < 0.08:
        argv = rng.choice([[], ["--help"], ["certify"], ["nope"], ["check"], ["check", "x.json"], ["methods", "x"],
                           ["inspect"], ["certify", "missing.onnx"], ["certify", "."], ["certify", "m.ONNX"],
                           ["certify", "m.txt"], ["inspect", "m.onnx", "--json", "."]])
        files["m.txt"] = b"hello"
        files["m.ONNX"] = files["m.onnx"]
    return Case(seed, "cli", "options", argv, files)


_CERT_CACHE: dict[str, bytes] = {}


def _base_certificate() -> bytes:
    """A real certificate of fixtures/mlp.onnx (computed once per process)."""
    if "mlp" not in _CERT_CACHE:
        import torch

        from lipverify.certify import CertifyOptions, certify

        torch.set_num_threads(1)
        cert = certify(FIXTURES / "mlp.onnx", CertifyOptions(method="product", lower_starts=2, lower_budget_s=1))
        _CERT_CACHE["mlp"] = json.dumps(cert).encode()
    return _CERT_CACHE["mlp"]


def _mutate_json(rng: random.Random, obj, depth=0):
    """Replace one random leaf or subtree of a JSON value."""
    junk = [None, -1, 0, 1e308, float("nan"), "x", [], {}, True, [1, 2], {"a": 1}, -1e-300, 2**70]
    if isinstance(obj, dict) and obj and depth < 8:
        k = rng.choice(list(obj))
        if rng.random() < 0.15:
            del obj[k]
            return obj
        obj[k] = _mutate_json(rng, obj[k], depth + 1) if rng.random() < 0.8 else rng.choice(junk)
        return obj
    if isinstance(obj, list) and obj and depth < 8:
        i = rng.randrange(len(obj))
        obj[i] = _mutate_json(rng, obj[i], depth + 1) if rng.random() < 0.8 else rng.choice(junk)
        return obj
    if isinstance(obj, float) and rng.random() < 0.5:
        return obj * rng.choice([1 - 1e-6, 0.5, -1, 1 + 1e-9, 0.0])
    return rng.choice(junk)


def _check_case(rng: random.Random, seed: int) -> Case:
    cert = json.loads(_base_certificate())
    kind = rng.choice(["mutate", "mutate", "mutate", "bytes", "not_json", "other_model", "empty_object"])
    if kind == "mutate":
        for _ in range(rng.choice([1, 1, 3])):
            cert = _mutate_json(rng, cert)
        data = json.dumps(cert, allow_nan=True).encode() if isinstance(cert, (dict, list)) else json.dumps(cert).encode()
    elif kind == "bytes":
        data, kind = _byte_mutation(rng, _base_certificate())
    elif kind == "not_json":
        data = rng.choice([b"", b"[]", b"null", b"\xff", b"{\"schema_version\": \"9.9\"}", b"5"])
    elif kind == "empty_object":
        data = b"{}"
    else:
        data = _base_certificate()
    model = "cnn_bn.onnx" if kind == "other_model" else "mlp.onnx"
    files = {"c.json": data, "m.onnx": _fixture(model)}
    return Case(seed, "check", kind, ["check", "c.json", "m.onnx"], files)


GENERATORS = {"onnx": _onnx_bytes_case, "onnx_edit": _onnx_edit_case, "safetensors": _safetensors_case,
              "spec": _spec_case, "data": _data_case, "shape": _shape_case, "cli": _cli_case, "check": _check_case}
WEIGHTS = {"onnx": 3, "onnx_edit": 4, "safetensors": 3, "spec": 2, "data": 3, "shape": 1, "cli": 2, "check": 2}


def make_case(seed: int, category: str | None = None) -> Case:
    rng = random.Random(seed * 7919 + 17)
    if category is None:
        cats = list(WEIGHTS)
        category = rng.choices(cats, weights=[WEIGHTS[c] for c in cats])[0]
    return GENERATORS[category](rng, seed)


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------


def _worker(conn, mem_limit: int | None) -> None:
    import warnings

    if mem_limit:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    warnings.filterwarnings("ignore")
    os.environ["COLUMNS"] = "200"
    import torch

    torch.set_num_threads(1)
    from typer.testing import CliRunner

    from lipverify.cli import app

    runner = CliRunner()
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        folder, argv = msg
        os.chdir(folder)
        import traceback

        try:
            result = runner.invoke(app, argv, catch_exceptions=True)
            exc = result.exception
            tb = None
            if exc is not None and not isinstance(exc, SystemExit):
                tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]
            out = (result.output or "")
            try:
                out += result.stderr or ""
            except (ValueError, AttributeError):
                pass
            conn.send((result.exit_code, out[-2000:], repr(exc) if tb else None, tb))
        except BaseException as e:  # the harness itself must survive
            conn.send((-1, "", repr(e), traceback.format_exc()[-3000:]))


class Runner:
    """A persistent worker process; a case that runs past ``timeout`` kills and restarts it."""

    def __init__(self, timeout: float = 60.0, mem_limit: int | None = 6 * 2**30):
        self.timeout = timeout
        self.mem_limit = mem_limit
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.mem_limit), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            raise RuntimeError("fuzz worker did not start")
        self.conn.recv()

    def run(self, case: Case, root: Path) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        folder = root / f"case_{case.seed}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in case.files.items():
            (folder / name).write_bytes(data)
        before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
        t0 = time.perf_counter()
        self.conn.send((str(folder), case.argv))
        if not self.conn.poll(self.timeout):
            self.proc.kill()
            self.proc.join()
            self.proc = None
            return self._record(case, "hang", None, "", None, None, time.perf_counter() - t0)
        try:
            code, out, exc, tb = self.conn.recv()
        except EOFError:
            self.proc.join()
            code = self.proc.exitcode
            self.proc = None
            return self._record(case, "crash", code, "", f"worker died (exit {code})", None, time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        # inputs must never be modified (no data loss)
        touched = [n for n, t in before.items() if (folder / n).exists() and (folder / n).stat().st_mtime_ns != t
                   or not (folder / n).exists()]
        if tb:
            outcome = "traceback"
        elif code in (0, 1):
            outcome = f"exit{code}"
        elif code == 2:
            outcome = "exit2" if out.strip() else "exit2-silent"
        else:
            outcome = f"exit{code}"
        rec = self._record(case, outcome, code, out, exc, tb, seconds)
        if touched:
            rec["outcome"] = "input-modified"
            rec["touched"] = touched
        shutil.rmtree(folder, ignore_errors=True)
        return rec

    @staticmethod
    def _record(case, outcome, code, out, exc, tb, seconds) -> dict:
        return {"seed": case.seed, "category": case.category, "what": case.what, "argv": case.argv,
                "outcome": outcome, "exit_code": code, "message": out.strip()[-600:], "exception": exc,
                "traceback": tb, "seconds": round(seconds, 3)}

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            finally:
                if self.proc.is_alive():
                    self.proc.kill()


GOOD = {"exit0", "exit1", "exit2"}


def run_cases(seeds, timeout: float = 60.0, root: Path | None = None, on_record=None) -> list[dict]:
    root = Path(root or tempfile.mkdtemp(prefix="lipverify_fuzz_"))
    runner = Runner(timeout)
    records = []
    try:
        for seed in seeds:
            try:
                case = make_case(seed)
            except Exception as exc:  # a generator bug is ours, not lipverify's: report and go on
                rec = {"seed": seed, "category": "?", "what": "generator failed", "argv": [],
                       "outcome": "generator-error", "message": repr(exc)}
            else:
                rec = runner.run(case, root)
            records.append(rec)
            if on_record:
                on_record(rec)
    finally:
        runner.close()
        shutil.rmtree(root, ignore_errors=True)
    return records


def summarize(records: list[dict]) -> dict:
    by_outcome: dict[str, int] = {}
    by_cat: dict[str, dict[str, int]] = {}
    for r in records:
        by_outcome[r["outcome"]] = by_outcome.get(r["outcome"], 0) + 1
        c = by_cat.setdefault(r["category"], {})
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    return {"cases": len(records), "outcomes": by_outcome, "by_category": by_cat,
            "tracebacks": by_outcome.get("traceback", 0), "hangs": by_outcome.get("hang", 0),
            "bad": sum(v for k, v in by_outcome.items() if k not in GOOD),
            "seconds": round(sum(r.get("seconds", 0) for r in records), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--case", type=int, default=None, help="run one case and print it in full")
    p.add_argument("--timeout", type=float, default=60.0, help="per case (s): longer is a hang")
    p.add_argument("--out", default=None, help="write every record as JSON lines here")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    seeds = [a.case] if a.case is not None else range(a.start, a.start + a.cases)
    t0 = time.perf_counter()
    fh = open(a.out, "w") if a.out else None

    def on_record(rec):
        if fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
        if a.verbose or rec["outcome"] not in GOOD:
            print(f"[{rec['outcome']}] case {rec['seed']} {rec['category']}: {rec['what']} :: "
                  f"lipverify {' '.join(rec['argv'])}\n    {rec.get('message', '')[-300:]}", flush=True)
            if rec.get("traceback") and (a.verbose or a.case is not None):
                print(rec["traceback"])
            elif rec.get("traceback"):
                print("    " + rec["traceback"].strip().splitlines()[-1])

    records = run_cases(seeds, a.timeout, on_record=on_record)
    s = summarize(records)
    s["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(s, indent=1))
    return 0 if s["bad"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
