"""Recognise activations that exporters decompose into several elementwise ONNX nodes.

GELU at opset < 20 becomes Div/Erf/Add/Mul/Mul, tanh-GELU a Pow/Mul/Add/Tanh chain, SiLU becomes
Sigmoid and Mul(x, sigmoid(x)). Rather than matching each exporter's exact node order, we find a
region of scalar elementwise nodes that computes g(x) from ONE tensor x, evaluate g on a grid and
compare it with the known activations. The end-to-end self-check later confirms the whole graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from scipy.special import erf

from lipverify.ops.activation import GELU, Activation, SiLU, Softplus

SEEDS = {"Erf", "Sigmoid", "Tanh", "Pow", "Exp", "Softplus"}

UNARY = {
    "Erf": erf,
    "Sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)),
    "Tanh": np.tanh,
    "Exp": np.exp,
    "Neg": np.negative,
    "Sqrt": np.sqrt,
    "Softplus": lambda a: np.logaddexp(0.0, a),
}
BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
          "Greater": np.greater, "Less": np.less}
TERNARY = {"Where": np.where}  # torch's dynamo exporter writes softplus as Where(x > 20, x, softplus(x))

# wide enough to see thresholds such as softplus's x > 20 switch
GRID = np.linspace(-50.0, 50.0, 20001)
CANDIDATES: list[tuple[str, callable]] = [
    ("gelu", lambda: GELU("none")),
    ("gelu_tanh", lambda: GELU("tanh")),
    ("silu", lambda: SiLU()),
    ("softplus", lambda: Softplus()),
]


def _reference(act: Activation, xs: np.ndarray) -> np.ndarray:
    import torch

    return act.forward(torch.from_numpy(xs)).numpy()


@dataclass
class Region:
    nodes: list  # ONNX nodes in graph order; the last one produces ``output``
    source: str
    output: str
    activation: Activation


def _scalar_const(name: str, consts: dict) -> bool:
    return name in consts and np.asarray(consts[name]).size == 1


def _evaluate(nodes: list, source: str, consts: dict, xs: np.ndarray) -> dict[str, np.ndarray]:
    values = {source: xs}
    for n in nodes:
        args = [values[i] if i in values else float(np.asarray(consts[i]).reshape(-1)[0]) for i in n.input]
        if n.op_type in UNARY:
            values[n.output[0]] = UNARY[n.op_type](args[0])
        elif n.op_type in TERNARY:
            values[n.output[0]] = TERNARY[n.op_type](args[0], args[1], args[2])
        else:
            values[n.output[0]] = BINARY[n.op_type](args[0], args[1])
    return values


def find_activation_regions(model: onnx.ModelProto, consts: dict, input_name: str) -> list[Region]:
    nodes = list(model.graph.node)
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    producer = {o: n for n in nodes for o in n.output}

    def candidate(n) -> bool:
        if n.op_type not in UNARY and n.op_type not in BINARY and n.op_type not in TERNARY:
            return False
        if all(o in consts for o in n.output):
            return False
        return all(i in consts and _scalar_const(i, consts) or i not in consts for i in n.input if i)

    regions: list[Region] = []
    used: set[int] = set()
    for seed in nodes:
        if seed.op_type not in SEEDS or id(seed) in used or not candidate(seed):
            continue
        # walk back (breadth first) through candidate nodes: every data tensor met is a possible source
        sources: list[str] = []
        frontier = [seed]
        while frontier:
            nxt = []
            for cur in frontier:
                for t in cur.input:
                    if not t or t in consts or t in sources:
                        continue
                    sources.append(t)
                    prod = producer.get(t)
                    if prod is not None and candidate(prod) and id(prod) not in used:
                        nxt.append(prod)
            frontier = nxt
        for source in sources:
            region = _grow(nodes, source, consts, candidate, used)
            if not any(n is seed for n in region):
                continue
            match = _match_output(region, source, consts, consumers, graph_outputs)
            if match is not None:
                members, act = match
                regions.append(Region(members, source, members[-1].output[0], act))
                used.update(id(n) for n in members)
                break
    return regions


def _grow(nodes, source, consts, candidate, used) -> list:
    """All candidate nodes computable from ``source`` and scalar constants, in graph order."""
    known = {source}
    region = []
    for n in nodes:
        if id(n) in used or not candidate(n):
            continue
        data = [i for i in n.input if i and i not in consts]
        if data and all(i in known for i in data):
            region.append(n)
            known.update(n.output)
    return region


def _match_output(region, source, consts, consumers, graph_outputs):
    """Latest tensor in the region that is a known activation of ``source`` and closes the region."""
    with np.errstate(all="ignore"):
        values = _evaluate(region, source, consts, GRID)
    for k in range(len(region) - 1, -1, -1):
        out = region[k].output[0]
        members = _ancestors(region[: k + 1], out, source)
        member_outputs = {m.output[0] for m in members}
        # every intermediate tensor must be consumed only inside the region
        closed = all(
            all(c.output[0] in member_outputs for c in consumers.get(m.output[0], [])) and m.output[0] not in graph_outputs
            for m in members if m.output[0] != out
        )
        if not closed or not any(m.op_type in SEEDS for m in members):
            continue
        y = values[out]
        for _, make in CANDIDATES:
            act = make()
            ref = _reference(act, GRID)
            if np.allclose(y, ref, rtol=1e-5, atol=1e-6):
                return members, act
    return None


def _ancestors(region, out, source):
    by_output = {n.output[0]: n for n in region}
    keep, stack = set(), [out]
    while stack:
        t = stack.pop()
        if t in by_output and t not in keep:
            keep.add(t)
            stack.extend(by_output[t].input)
    return [n for n in region if n.output[0] in keep]
