"""Recognise activations that exporters write as several elementwise ONNX nodes, by exact structure.

A region of elementwise nodes (Add/Sub/Mul/Div/Neg/Pow with scalar constants, Erf, Tanh, Sigmoid,
Softplus, Abs, Greater, Where) computing g(x) from ONE tensor x is turned into a canonical expression
(sums and products flattened, constants kept exactly as stored) and matched against templates:

    GELU (erf)   a x (b + erf(r x))                       (torch: a = 1/2, b = 1, x / sqrt 2)
    GELU (tanh)  a x (b + tanh(k (x + p x^3)))            (constants within 1e-6 of torch's)
    SiLU         a x sigmoid(beta x)                      (a, beta > 0)
    softplus     s softplus(beta x)                       (torch's softplus(x, beta): s = 1/beta)
    softplus     where(beta x > t, x, softplus(beta x) / beta)   (torch's threshold, dynamo export)
    Mish         x tanh(softplus(x))
    softsign     x / (c + |x|)                            (c > 0)

The constants read from the file become the activation's parameters (``lipverify.ops.activation``),
so the IR computes the file's function and its slopes are derived for those constants. Nothing is
accepted because it agrees on sample points: a region that matches no template is left to the
per-op converters, which refuse the ops they cannot bound (naming the node).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from lipverify.errors import UnsupportedOperationError
from lipverify.ops.activation import GELU, Activation, Mish, SiLU, Softplus, Softsign

EXPANDABLE = {"Add", "Sub", "Mul", "Div", "Neg", "Pow", "Erf", "Tanh", "Sigmoid", "Softplus", "Abs",
              "Greater", "Where"}
ROOTS = {"Mul", "Div", "Where"}
UNARY = {"Erf": "erf", "Tanh": "tanh", "Sigmoid": "sigmoid", "Softplus": "softplus", "Abs": "abs"}
FLOAT32_HALF_ULP = 2.0 ** -24


class NoMatch(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# canonical expressions: ("var",), ("const", v), ("mul", coeff, factors), ("add", offset, terms),
# (unary, e), ("div", num, den), ("greater", a, b), ("where", cond, a, b)


def _mul(coeff: float, factors: list) -> tuple:
    flat, c = [], coeff
    for f in factors:
        if f[0] == "const":
            c *= f[1]
        elif f[0] == "mul":
            c *= f[1]
            flat.extend(f[2])
        else:
            flat.append(f)
    if not flat:
        return ("const", c)
    if c == 1.0 and len(flat) == 1:
        return flat[0]
    return ("mul", c, tuple(flat))


def _add(offset: float, terms: list) -> tuple:
    flat, o = [], offset
    for t in terms:
        if t[0] == "const":
            o += t[1]
        elif t[0] == "add":
            o += t[1]
            flat.extend(t[2])
        else:
            flat.append(t)
    if not flat:
        return ("const", o)
    if o == 0.0 and len(flat) == 1:
        return flat[0]
    return ("add", o, tuple(flat))


MAX_TEMPLATE_NODES = 32  # every template is far smaller; larger regions are not activations


class Canonicalizer:
    def __init__(self, producer: dict, consts: dict):
        self.producer = producer
        self.consts = consts
        self.visits = 0  # expressions are trees over a DAG: bound the work (x + x + ... doubles it per level)

    def scalar(self, name: str) -> float:
        v = np.asarray(self.consts[name])
        if v.size != 1 or v.dtype.kind != "f" and v.dtype.kind not in "iu":
            raise NoMatch
        return float(v.reshape(-1)[0])

    def expr(self, name: str, var: str, cone: set) -> tuple:
        if name == var:
            return ("var",)
        if name in self.consts:
            return ("const", self.scalar(name))
        node = self.producer.get(name)
        if node is None or node.op_type not in EXPANDABLE or node.domain not in ("", "ai.onnx"):
            raise NoMatch
        self.visits += 1
        if self.visits > 4 * MAX_TEMPLATE_NODES:
            raise NoMatch
        cone.add(id(node))
        args = [self.expr(i, var, cone) for i in node.input]
        t = node.op_type
        if t == "Add":
            return _add(0.0, args)
        if t == "Sub":
            return _add(0.0, [args[0], _mul(-1.0, [args[1]])])
        if t == "Neg":
            return _mul(-1.0, args)
        if t == "Mul":
            return _mul(1.0, args)
        if t == "Div":
            if args[1][0] == "const":
                if args[1][1] == 0.0:
                    raise NoMatch
                return _mul(1.0 / args[1][1], [args[0]])
            return ("div", args[0], args[1])
        if t == "Pow":
            if args[1][0] != "const" or args[1][1] not in (2.0, 3.0, 4.0):
                raise NoMatch
            return _mul(1.0, [args[0]] * int(args[1][1]))
        if t in UNARY:
            return (UNARY[t], args[0])
        if t == "Greater":
            return ("greater", args[0], args[1])
        if t == "Where":
            return ("where", args[0], args[1], args[2])
        raise NoMatch  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# patterns: ("var",), ("c", v), ("p", name), ("mul", coeffpat, [pats]), ("add", offsetpat, [pats]), ...


def _bind(pat: tuple, value: float, env: dict) -> None:
    if pat[0] == "c":
        if value != pat[1]:
            raise NoMatch
    elif pat[0] == "p":
        if pat[1] in env and env[pat[1]] != value:
            raise NoMatch
        env[pat[1]] = value
    else:  # pragma: no cover
        raise NoMatch


def match(pat: tuple, e: tuple, env: dict) -> None:
    kind = pat[0]
    if kind == "var":
        if e != ("var",):
            raise NoMatch
        return
    if kind in ("c", "p"):
        if e[0] != "const":
            raise NoMatch
        _bind(pat, e[1], env)
        return
    if kind in ("mul", "add"):
        if e[0] != kind:
            e = (kind, 1.0 if kind == "mul" else 0.0, (e,))  # x is 1 * x and 0 + x
        _bind(pat[1], e[1], env)
        subs, items = pat[2], e[2]
        if len(subs) != len(items):
            raise NoMatch
        for perm in itertools.permutations(items):
            trial = dict(env)
            try:
                for p, x in zip(subs, perm):
                    match(p, x, trial)
            except NoMatch:
                continue
            env.clear()
            env.update(trial)
            return
        raise NoMatch
    if e[0] != kind or len(e) != len(pat):
        raise NoMatch
    for p, x in zip(pat[1:], e[1:]):
        match(p, x, env)


X = ("var",)


def _close(value: float, target: float, rel: float = 1e-6) -> bool:
    return abs(value - target) <= rel * abs(target)


def _gelu_erf(env) -> Activation:
    if not env["r"] > 0:
        raise NoMatch
    return GELU("none", (env["a"], env["b"], 1.0 / env["r"]))


def _gelu_tanh(env) -> Activation:
    a, b, k, p = env["a"], env["b"], env["k"], env["p"]
    if not (_close(a, 0.5) and _close(b, 1.0) and _close(k, math.sqrt(2 / math.pi)) and _close(p, 0.044715)):
        raise UnsupportedOperationError("Tanh", "?", "a tanh-GELU-like decomposition with non-standard constants "
                                        f"(a={a}, b={b}, k={k}, p={p})")
    return GELU("tanh", (a, b, k, p))


def _silu(env) -> Activation:
    if not (env["a"] > 0 and env["beta"] > 0):
        raise NoMatch
    return SiLU(env["a"], env["beta"])


def _softplus(env) -> Activation:
    if env["beta"] == 0 or env["s"] == 0:
        raise NoMatch
    return Softplus(env["beta"], env["s"])


def _softplus_threshold(env) -> Activation:
    beta, s, t = env["beta"], env["s"], env["t"]
    if not (beta > 0 and abs(s * beta - 1.0) <= 1e-12):
        raise NoMatch
    # torch switches to the identity above beta x > t: a jump of log(1 + e^-t) / beta there
    jump = abs(s * math.log1p(math.exp(t)) - t / beta) if t < 700 else 0.0
    if not jump <= FLOAT32_HALF_ULP * abs(t / beta):
        raise UnsupportedOperationError(
            "Where", "?", f"softplus with threshold {t:g} (beta {beta:g}) jumps by {jump:.3g} where it switches to "
            "the identity, more than float32 rounding of the output: the function is not Lipschitz")
    return Softplus(beta, s)


def _mish(env) -> Activation:
    return Mish()


def _softsign(env) -> Activation:
    if not env["c"] > 0:
        raise NoMatch
    return Softsign(env["c"])


def _sp(beta="beta"):
    return ("softplus", ("mul", ("p", beta), [X]))


TEMPLATES = [
    ("gelu", ("mul", ("p", "a"), [X, ("add", ("p", "b"), [("erf", ("mul", ("p", "r"), [X]))])]), _gelu_erf),
    ("gelu_tanh", ("mul", ("p", "a"), [X, ("add", ("p", "b"), [("tanh", ("mul", ("p", "k"), [
        ("add", ("c", 0.0), [X, ("mul", ("p", "p"), [X, X, X])])]))])]), _gelu_tanh),
    ("silu", ("mul", ("p", "a"), [X, ("sigmoid", ("mul", ("p", "beta"), [X]))]), _silu),
    ("softplus_threshold", ("where", ("greater", ("mul", ("p", "beta"), [X]), ("p", "t")), X,
                            ("mul", ("p", "s"), [_sp()])), _softplus_threshold),
    ("softplus", ("mul", ("p", "s"), [_sp()]), _softplus),
    ("mish", ("mul", ("c", 1.0), [X, ("tanh", ("softplus", X))]), _mish),
    ("softsign", ("div", X, ("add", ("p", "c"), [("abs", X)])), _softsign),
]


@dataclass
class Region:
    nodes: list  # ONNX nodes in graph order; the last one produces ``output``
    source: str
    output: str
    activation: Activation
    template: str


def find_activation_regions(nodes: list, data: set, consts: dict, graph_outputs: set) -> list[Region]:
    """Regions of ``nodes`` (live ONNX nodes in graph order) that compute a known activation of one
    data tensor. ``data``: names of input-dependent tensors; ``consts``: batch-independent constants."""
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    canon = Canonicalizer(producer, consts)
    used: set[int] = set()
    regions: list[Region] = []
    for root in reversed(nodes):
        if root.op_type not in ROOTS or id(root) in used or root.output[0] not in data:
            continue
        for var in _cone_tensors(root, producer, data):
            cone: set[int] = set()
            canon.visits = 0
            try:
                e = canon.expr(root.output[0], var, cone)
            except NoMatch:
                continue
            if len(cone) < 2 or cone & used:
                continue
            members = [n for n in nodes if id(n) in cone]
            inner = {o for m in members for o in m.output if m is not root}
            if any(o in graph_outputs or any(id(c) not in cone for c in consumers.get(o, [])) for o in inner):
                continue  # an intermediate tensor is used outside the region
            act, name = _match_templates(e, root)
            if act is None:
                continue
            regions.append(Region(members, var, root.output[0], act, name))
            used |= cone
            break
    return regions


def _cone_tensors(root, producer: dict, data: set) -> list[str]:
    """Data tensors feeding ``root`` through expandable nodes, nearest first (at most a template's size)."""
    out, frontier, seen = [], [root], set()
    while frontier and len(out) < MAX_TEMPLATE_NODES:
        nxt = []
        for n in frontier:
            for t in n.input:
                if t in seen or t not in data:
                    continue
                seen.add(t)
                out.append(t)
                p = producer.get(t)
                if p is not None and p.op_type in EXPANDABLE:
                    nxt.append(p)
        frontier = nxt
    return out


def _match_templates(e: tuple, root) -> tuple[Activation | None, str]:
    for name, pattern, build in TEMPLATES:
        env: dict = {}
        try:
            match(pattern, e, env)
            act = build(env)
        except NoMatch:
            continue
        except UnsupportedOperationError as exc:
            raise UnsupportedOperationError(root.op_type, root.name or root.output[0],
                                            str(exc).split(": ", 1)[-1]) from None
        return act, name
    return None, ""
