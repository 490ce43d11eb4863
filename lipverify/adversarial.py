"""Adversarial generator for the soundness campaign: files an attacker would write, attacked on the file.

The honest campaign (``lipverify.campaign``) builds networks with torch and exports them; an attacker
writes ONNX by hand. Each case here is a seeded random ONNX model from one of the families below,
with "hint" pairs (x, y) where the attacker hid something steep. lipverify must either refuse it
(exit 2) or certify bounds at least as large as every difference quotient measured ON THE FILE
(onnxruntime, single samples and batches): at the hints, at random pairs and along a small local
search. The ``forgery`` family takes an honest certificate and mutates it; ``lipverify check`` must
reject every mutation that claims a smaller bound (or a higher certified accuracy).

Families: hidden steep branches behind large biases, constants that broadcast the input, casts,
batch-size arithmetic, mutated activation decompositions (GELU erf / tanh, SiLU, softplus with a
threshold), random ops, subgraph ops reading the input, Dropout in training mode, extra activations
with random parameters, Expand/Tile/Split/Concat, ConvTranspose, fixed-batch constants.
"""

from __future__ import annotations

import copy
import json
import math
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FAMILIES = ("steep_branch", "broadcast", "cast", "batch_arith", "decomposition", "random_op", "subgraph",
            "dropout", "activation", "shapes", "conv_transpose", "fixed_batch", "forgery")
SOUND_TOL = 1e-6  # float32 files: quotients over the wide pairs used here err by far less


class Case:
    def __init__(self, family: str, in_shape, batch="N"):
        self.family, self.in_shape, self.batch = family, list(in_shape), batch
        self.nodes: list = []
        self.inits: dict = {}
        self.hints: list[tuple[np.ndarray, np.ndarray]] = []
        self.notes: list[str] = []
        self.k = 0

    def name(self, stem: str) -> str:
        self.k += 1
        return f"{stem}{self.k}"

    def const(self, value, dtype=np.float32) -> str:
        n = self.name("c")
        self.inits[n] = np.asarray(value, dtype=dtype)
        return n

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def dense(self, x: str, w: np.ndarray, b: np.ndarray | None = None) -> str:
        ins = [x, self.const(w)] + ([self.const(b)] if b is not None else [])
        return self.node("Gemm", ins, transB=1)

    def save(self, path: Path, out: str) -> Path:
        self.nodes.append(helper.make_node("Identity", [out], ["y"]))
        dims = ([self.batch] if self.batch is not None else []) + self.in_shape
        graph = helper.make_graph(self.nodes, self.family, [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        onnx.save(model, str(path))
        return path


# ------------------------------------------------------------------------------------------------
# families


def _gelu(c: Case, z: str, rng, mutate: bool) -> str:
    half, one, sqrt2 = 0.5, 1.0, math.sqrt(2)
    if mutate:
        which = rng.integers(0, 3)
        half, one, sqrt2 = [v * float(rng.uniform(0.5, 2.0)) if k == which else v
                            for k, v in enumerate((half, one, sqrt2))]
    d = c.node("Div", [z, c.const(sqrt2)])
    e = c.node("Erf", [d])
    a = c.node("Add", [e, c.const(one)] if rng.random() < 0.5 else [c.const(one), e])
    m = c.node("Mul", [z, a])
    return c.node("Mul", [m, c.const(half)])


def steep_branch(rng, n=4) -> tuple[Case, str]:
    """A steep region hidden where random probes never go: behind a large bias or a Where."""
    c = Case("steep_branch", [n])
    w = rng.standard_normal((n, n)) * 0.5
    z = c.dense("x", w)
    big = float(rng.choice([20.0, 50.0, 1e3]))
    slope = float(rng.choice([30.0, 1e3]))
    kind = rng.integers(0, 3)
    if kind == 0:  # relu(k (z - big)) added: legitimate, the bound must cover it
        s = c.node("Sub", [z, c.const(big)])
        r = c.node("Relu", [c.node("Mul", [s, c.const(slope)])])
        out = c.node("Add", [c.node("Tanh", [z]), r])
    elif kind == 1:  # a GELU whose Where switches to a steep line above big
        g = _gelu(c, z, rng, False)
        steep = c.node("Add", [c.node("Mul", [c.node("Sub", [z, c.const(big)]), c.const(slope)]), c.const(big)])
        out = c.node("Where", [c.node("Greater", [z, c.const(big)]), steep, g])
    else:  # softplus with a threshold (torch's dynamo pattern) at a random place
        t = float(rng.choice([2.0, 10.0, 20.0, 30.0]))
        sp = c.node("Softplus", [z])
        out = c.node("Where", [c.node("Greater", [z, c.const(t)]), z, sp])
        big = t
    # hints: pairs straddling the place where z_0 crosses big
    w0 = w[0] / np.dot(w[0], w[0])
    for delta in (1e-2, 1e-1):
        x = w0 * big
        c.hints.append((x - delta * w0, x + delta * w0))
    return c, out


def broadcast(rng) -> tuple[Case, str]:
    """A constant operand larger than the data: x (1,) * c (k,), or a 1-channel image with (3,1,1) stats."""
    if rng.random() < 0.5:
        k = int(rng.choice([4, 16, 64]))
        c = Case("broadcast", [1])
        cst = rng.standard_normal(k).astype(np.float32)
        h = c.node(str(rng.choice(["Mul", "Add", "Sub", "Div"])), ["x", c.const(cst if rng.random() < .5 else np.abs(cst) + .1)])
        b = float(rng.choice([0.0, -1e3]))
        out = c.node("Relu", [c.node("Add", [h, c.const(b)])])
        x = np.array([-b + 1.0]) if b else np.array([0.5])
        c.hints.append((x, x + 0.5))
        return c, out
    c = Case("broadcast", [1, 5, 5])
    mean, std = rng.uniform(0, 1, (3, 1, 1)), rng.uniform(0.05, 0.5, (3, 1, 1))
    n = c.node("Div", [c.node("Sub", ["x", c.const(mean)]), c.const(std)])
    w = rng.standard_normal((2, 3, 3, 3)) * 0.3
    out = c.node("Flatten", [c.node("Relu", [c.node("Conv", [n, c.const(w)], pads=[1, 1, 1, 1])])])
    x = rng.uniform(0, 1, (1, 5, 5))
    c.hints.append((x, x + 0.05 * rng.standard_normal(x.shape)))
    return c, out


def cast(rng) -> tuple[Case, str]:
    c = Case("cast", [3])
    z = c.dense("x", rng.standard_normal((3, 3)) * 0.1)
    to = int(rng.choice([TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.DOUBLE]))
    h = c.node("Cast", [z], to=to)
    out = c.node("Cast", [h], to=TensorProto.FLOAT)
    x = np.zeros(3)
    c.hints.append((x, x + 1e-3))
    return c, out


def batch_arith(rng) -> tuple[Case, str]:
    """A value computed from the batch size: (B - a)(B - b) + 1 times x (1 at the probe batches a, b)."""
    c = Case("batch_arith", [3])
    s = c.node("Shape", ["x"])
    b = c.node("Cast", [c.node("Gather", [s, c.const(0, np.int64)], axis=0)], to=TensorProto.FLOAT)
    p1, p2 = (float(v) for v in rng.choice([1, 2, 3, 8], 2, replace=False))
    k = c.node("Add", [c.node("Mul", [c.node("Sub", [b, c.const(p1)]), c.node("Sub", [b, c.const(p2)])]), c.const(1.0)])
    out = c.node("Mul", ["x", k]) if rng.random() < 0.7 else c.node("Reshape", ["x", c.node(
        "Concat", [c.node("Unsqueeze", [c.node("Cast", [k], to=TensorProto.INT64), c.const([0], np.int64)]),
                   c.const([-1], np.int64)], axis=0)])
    c.hints.append((np.zeros(3), np.ones(3)))
    return c, out


def decomposition(rng) -> tuple[Case, str]:
    """Exporter decompositions of GELU / tanh-GELU / SiLU / softplus, with random mutations."""
    c = Case("decomposition", [4])
    z = c.dense("x", rng.standard_normal((4, 4)) * float(rng.choice([0.5, 3.0])))
    kind = rng.integers(0, 4)
    mutate = rng.random() < 0.6
    if kind == 0:
        out = _gelu(c, z, rng, mutate)
    elif kind == 1:
        k, p = math.sqrt(2 / math.pi), 0.044715
        if mutate:
            k, p = k * float(rng.uniform(0.5, 2)), p * float(rng.uniform(0.5, 20))
        cube = c.node("Mul", [z, c.node("Mul", [z, z])]) if rng.random() < .5 else c.node("Pow", [z, c.const(3.0)])
        inner = c.node("Mul", [c.const(k), c.node("Add", [z, c.node("Mul", [c.const(p), cube])])])
        out = c.node("Mul", [c.const(0.5), c.node("Mul", [z, c.node("Add", [c.const(1.0), c.node("Tanh", [inner])])])])
    elif kind == 2:
        beta = float(rng.choice([1.0, 2.0, 0.5])) if mutate else 1.0
        s = c.node("Sigmoid", [c.node("Mul", [z, c.const(beta)]) if beta != 1 else z])
        other = z if not (mutate and rng.random() < 0.3) else c.node("Identity", [z])
        out = c.node("Mul", [other, s])
    else:
        beta, t = float(rng.choice([1.0, 2.0])), float(rng.choice([20.0, 5.0, 50.0]))
        bz = c.node("Mul", [z, c.const(beta)])
        sp = c.node("Div", [c.node("Softplus", [bz]), c.const(beta * (float(rng.uniform(0.5, 1.5)) if mutate else 1.0))])
        out = c.node("Where", [c.node("Greater", [bz, c.const(t)]), z, sp])
    if rng.random() < 0.3:  # a non-scalar constant inside the pattern
        c.inits[next(iter(k for k in c.inits if c.inits[k].ndim == 0))] = rng.uniform(0.1, 3, 4).astype(np.float32)
    for _ in range(2):
        x = rng.standard_normal(4) * 2
        c.hints.append((x, x + 1e-2 * rng.standard_normal(4)))
    return c, out


def random_op(rng) -> tuple[Case, str]:
    c = Case("random_op", [3])
    op = str(rng.choice(["RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Bernoulli"]))
    if op in ("RandomUniform", "RandomNormal"):
        r = c.node(op, [], shape=[3], dtype=TensorProto.FLOAT)
    else:
        r = c.node(op, [c.const(np.full(3, 0.5))])
    return c, c.node("Mul", ["x", r] if rng.random() < 0.5 else [c.node("Add", ["x", r]), c.const(2.0)])


def subgraph(rng) -> tuple[Case, str]:
    c = Case("subgraph", [3])
    k = c.const(float(rng.choice([100.0, 1.0])))
    then = helper.make_graph([helper.make_node("Mul", ["x", k], ["t_out"])], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    out = c.name("if")
    c.nodes.append(helper.make_node("If", [c.const(bool(rng.random() < 0.5), np.bool_)], [out], then_branch=then,
                                    else_branch=other))
    return c, out


def dropout(rng) -> tuple[Case, str]:
    c = Case("dropout", [3])
    train = bool(rng.random() < 0.7)
    return c, c.node("Dropout", ["x", c.const(0.5), c.const(train, np.bool_)])


def activation(rng) -> tuple[Case, str]:
    c = Case("activation", [3])
    z = c.dense("x", rng.standard_normal((3, 3)) * 2)
    op = str(rng.choice(["Clip", "HardSigmoid", "HardSwish", "Selu", "Celu", "Elu", "LeakyRelu", "PRelu", "Mish",
                         "Softsign", "Abs", "Softplus", "Gelu"]))
    if op == "Clip":
        lo, hi = sorted(rng.uniform(-3, 3, 2))
        out = c.node(op, [z, c.const(lo), c.const(hi)])
    elif op == "HardSigmoid":
        out = c.node(op, [z], alpha=float(rng.uniform(-2, 2)), beta=float(rng.uniform(-1, 1)))
    elif op in ("Selu",):
        out = c.node(op, [z], alpha=float(rng.uniform(0.1, 3)), gamma=float(rng.uniform(0.1, 3)))
    elif op in ("Celu", "Elu"):
        out = c.node(op, [z], alpha=float(rng.uniform(0.1, 3) if op == "Celu" else rng.uniform(-2, 3)))
    elif op == "LeakyRelu":
        out = c.node(op, [z], alpha=float(rng.uniform(-2, 3)))
    elif op == "PRelu":
        out = c.node(op, [z, c.const(rng.uniform(-2, 3, 3))])
    elif op == "Gelu":
        out = c.node(op, [z], approximate=str(rng.choice(["none", "tanh"])))
    else:
        out = c.node(op, [z])
    for _ in range(3):
        x = rng.standard_normal(3)
        c.hints.append((x, x + 0.05 * rng.standard_normal(3)))
    return c, out


def shapes(rng) -> tuple[Case, str]:
    c = Case("shapes", [6])
    a, b = c.name("split"), c.name("split")
    c.nodes.append(helper.make_node("Split", ["x", c.const([2, 4], np.int64)], [a, b], axis=1))
    ea = c.node("Tile", [c.node("Expand", [c.node("Unsqueeze", [a, c.const([1], np.int64)]),
                                            c.const([1, 3, 2], np.int64)]), c.const([1, 1, 2], np.int64)])
    fa = c.node("Flatten", [ea])
    nb = c.node("Sub", [c.const(rng.standard_normal(4)), b])
    out = c.node("Concat", [fa, c.node("Div", [nb, c.const(float(rng.choice([0.1, 3.0])))])], axis=1)
    c.hints.append((np.zeros(6), np.ones(6)))
    return c, out


def conv_transpose(rng) -> tuple[Case, str]:
    c = Case("conv_transpose", [2, 5, 5])
    s = int(rng.integers(1, 4))
    pads = [int(v) for v in rng.integers(0, 3, 4)]
    op = [int(v) for v in rng.integers(0, s, 2)]
    w = rng.standard_normal((2, 3, 3, 3)) * 0.4
    out = c.node("ConvTranspose", ["x", c.const(w)], strides=[s, s], pads=pads, output_padding=op,
                 dilations=[int(rng.integers(1, 3))] * 2)
    x = rng.standard_normal((2, 5, 5))
    c.hints.append((x, x + 0.1 * rng.standard_normal(x.shape)))
    return c, out


def fixed_batch(rng) -> tuple[Case, str]:
    n = int(rng.choice([1, 2, 3]))
    c = Case("fixed_batch", [4], batch=n)
    cst = rng.standard_normal((n, 4)) if rng.random() < 0.5 else rng.standard_normal((1, 4))
    out = c.node("Relu", [c.node("Mul", ["x", c.const(cst * 10)])])
    c.hints.append((np.ones(4), np.ones(4) * 2))
    return c, out


GENERATORS = {"steep_branch": steep_branch, "broadcast": broadcast, "cast": cast, "batch_arith": batch_arith,
              "decomposition": decomposition, "random_op": random_op, "subgraph": subgraph, "dropout": dropout,
              "activation": activation, "shapes": shapes, "conv_transpose": conv_transpose, "fixed_batch": fixed_batch}


# ------------------------------------------------------------------------------------------------
# the attack on the file


class FileModel:
    """The ONNX file in onnxruntime; inputs are padded to its fixed batch size when it has one."""

    def __init__(self, path: Path, batch):
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        self.s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.name = self.s.get_inputs()[0].name
        self.batch = batch if isinstance(batch, int) else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.batch is None:
            return np.asarray(self.s.run(None, {self.name: x})[0], np.float64).reshape(len(x), -1)
        outs = []
        for i in range(len(x)):
            chunk = np.repeat(x[i:i + 1], self.batch, axis=0)
            outs.append(np.asarray(self.s.run(None, {self.name: chunk})[0], np.float64)[:1].reshape(1, -1))
        return np.concatenate(outs)


def file_attack(f: FileModel, in_shape, hints, rng, rounds: int = 40) -> tuple[float, str]:
    """Best difference quotient on the file: hints, random pairs at several scales, local search."""
    best, how = 0.0, "none"

    def quotients(xs, ys, label):
        """Quotients of each pair, from a batched query and from single-sample queries (the larger)."""
        nonlocal best, how
        n = np.linalg.norm((xs - ys).reshape(len(xs), -1), axis=1)
        d_batch = np.linalg.norm((f(xs) - f(ys)).reshape(len(xs), -1), axis=1)
        d_single = np.array([np.linalg.norm(f(xs[i:i + 1]) - f(ys[i:i + 1])) for i in range(len(xs))])
        q = np.where(n > 0, np.fmax(d_batch, d_single) / np.maximum(n, 1e-300), 0.0)
        q = np.where(np.isfinite(q), q, 0.0)
        i = int(np.argmax(q))
        if q[i] > best:
            best, how = float(q[i]), label
        return q

    shape = tuple(in_shape)
    if hints:
        xs = np.stack([h[0] for h in hints]).reshape((-1,) + shape)
        ys = np.stack([h[1] for h in hints]).reshape((-1,) + shape)
        quotients(xs, ys, "hint")
    for scale in (0.1, 1.0, 10.0, 1e3):
        xs = rng.standard_normal((16,) + shape) * scale
        ys = xs + rng.standard_normal((16,) + shape) * scale * 0.1
        quotients(xs, ys, f"random pairs (scale {scale:g})")
    # local search around the hints: perturb both ends, keep improvements
    pool = [(np.asarray(a, float).reshape(shape), np.asarray(b, float).reshape(shape)) for a, b in hints]
    for _ in range(rounds if pool else 0):
        a, b = pool[int(rng.integers(0, len(pool)))]
        step = np.linalg.norm(a - b) * 0.5 + 1e-3
        a2 = a + rng.standard_normal(shape) * step
        b2 = a2 + (b - a) * float(rng.uniform(0.3, 1.5))
        q = quotients(a2[None], b2[None], "local search")
        if q[0] >= best * (1 - 1e-12):
            pool.append((a2, b2))
    return best, how


# ------------------------------------------------------------------------------------------------
# one case


def check_case(seed: int, workdir, family: str | None = None) -> dict:
    from lipverify.certify import CertifyOptions, certify
    from lipverify.errors import LipverifyError, SoundnessError

    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 23])
    family = family or str(rng.choice(FAMILIES))
    rec: dict = {"seed": seed, "family": f"adversarial/{family}", "violations": [], "order_issues": []}
    if family == "forgery":
        return _forgery(seed, workdir, rng, rec, t0)
    case, out = GENERATORS[family](rng)
    path = case.save(Path(workdir) / f"adv_{seed}.onnx", out)
    rec["onnx_ops"] = sorted({n.op_type for n in case.nodes})
    try:
        cert = certify(path, CertifyOptions(method="all", seed=seed, lower_starts=2, lower_budget_s=0.5))
        rec["status"] = "certified"
    except SoundnessError as exc:
        rec["status"], rec["message"], cert = "soundness_error", str(exc), None
        if "lower bound" in str(exc):
            rec["violations"].append(f"lipverify raised SoundnessError: {exc}")
    except LipverifyError as exc:
        rec["status"], rec["message"], cert = "refused", str(exc)[:1000], None
    except Exception as exc:  # a crash is a finding
        rec["status"], rec["message"] = "crash", f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()[-3000:]
        return _done(rec, path, t0)
    if cert is not None:
        f = FileModel(path, case.batch)
        attack, how = file_attack(f, case.in_shape, case.hints, rng)
        rec["attack"], rec["attack_how"], rec["bounds"] = attack, how, dict(cert["bounds"])
        for name, value in cert["bounds"].items():
            if value < attack * (1 - SOUND_TOL):
                rec["violations"].append(f"{name} certified {value!r} < quotient {attack!r} on the file ({how})")
        if attack > 0:
            rec["min_ratio"] = min(cert["bounds"].values()) / attack
            rec["ratios"] = {n: v / attack for n, v in cert["bounds"].items()}
    return _done(rec, path, t0)


def _done(rec: dict, path: Path, t0: float) -> dict:
    rec["seconds"] = time.perf_counter() - t0
    if rec["violations"] or rec.get("status") in ("crash", "soundness_error"):
        rec["onnx"] = str(path)
    elif path.exists():
        path.unlink()
    return rec


MUTATIONS = ("scale_number", "negate_number", "nan_number", "inf_number", "string_number", "drop_key",
             "headline", "bounds", "method_name", "data_accuracy", "swap_witness")


def _numbers(obj, path=()):
    """Paths of every number inside a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, path + (i,))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _forgery(seed: int, workdir, rng, rec: dict, t0: float) -> dict:
    """Mutate an honest certificate; `check` must reject every mutation that claims more."""
    from lipverify.campaign import export_onnx, random_network
    from lipverify.certify import CertifyOptions, certify
    from lipverify.verifier.certificate import CertificateInvalid, check_certificate

    net = random_network(seed, str(rng.choice(["tiny_relu", "mlp"])))
    path = Path(workdir) / f"forge_{seed}.onnx"
    export_onnx(net.module, net.input_shape, path, fold=True)
    cert = certify(path, CertifyOptions(method="all", seed=seed, lower_starts=2, lower_budget_s=0.5))
    rec["mutations"] = {}
    for k in range(8):
        kind = str(rng.choice(MUTATIONS))
        forged = copy.deepcopy(cert)
        witness_numbers = [p for p in _numbers(forged["methods"]) if "witness" in p]
        target = witness_numbers[int(rng.integers(0, len(witness_numbers)))] if witness_numbers else None
        target = ("methods",) + target if target else None
        if kind == "scale_number" and target:
            _set(forged, target, _get(forged, target) * float(rng.choice([0.5, 0.9, 0.999999])))
        elif kind == "negate_number" and target:
            _set(forged, target, -abs(_get(forged, target)) - 1e-3)
        elif kind in ("nan_number", "inf_number") and target:
            _set(forged, target, float("nan") if kind == "nan_number" else float("inf"))
        elif kind == "string_number" and target:
            _set(forged, target, str(_get(forged, target)))
        elif kind == "drop_key" and target:
            _get(forged, target[:-1]).pop(target[-1]) if isinstance(_get(forged, target[:-1]), dict) else None
        elif kind == "headline":
            forged["certified_bound"] *= float(rng.choice([0.5, 0.999, 1 - 1e-9]))
        elif kind == "bounds":
            name = str(rng.choice(sorted(forged["methods"])))
            forged["methods"][name]["value"] *= 0.9
            forged["bounds"][name] = forged["methods"][name]["value"]
            forged["certified_bound"] = min(forged["bounds"].values())
            forged["method"] = min(forged["bounds"], key=forged["bounds"].get)
        elif kind == "method_name":
            names = sorted(forged["methods"])
            if len(names) > 1:
                a, b = rng.choice(names, 2, replace=False)
                forged["methods"][a], forged["methods"][b] = forged["methods"][b], forged["methods"][a]
        elif kind == "swap_witness":
            names = sorted(forged["methods"])
            if len(names) > 1:
                a, b = rng.choice(names, 2, replace=False)
                forged["methods"][a]["witness"] = forged["methods"][b]["witness"]
        claimed_less = forged.get("certified_bound", 0) < cert["certified_bound"] * (1 - 1e-12) or any(
            isinstance(forged["methods"].get(n, {}).get("value"), (int, float)) and
            forged["methods"][n]["value"] < cert["methods"][n]["value"] * (1 - 1e-12) for n in cert["methods"])
        p = Path(workdir) / f"forge_{seed}_{k}.json"
        p.write_text(json.dumps(forged))
        try:
            check_certificate(p, path)
            verdict = "valid"
        except CertificateInvalid:
            verdict = "invalid"
        except Exception as exc:  # bad input (exit 2) is a rejection too
            verdict = f"rejected ({type(exc).__name__})"
        finally:
            p.unlink(missing_ok=True)
        rec["mutations"][f"{k}:{kind}"] = verdict
        if verdict == "valid" and (claimed_less or forged != cert and kind in ("negate_number", "nan_number",
                                                                            "inf_number", "string_number")):
            rec["violations"].append(f"check accepted a forged certificate ({kind})")
    rec["status"] = "checked"
    return _done(rec, path, t0)
