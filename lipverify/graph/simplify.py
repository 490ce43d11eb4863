"""Exact rewrites that make the per-layer bound tighter without changing the function.

- BatchNorm/normalization scalings fold into the adjacent convolution or dense map
  (||conv ∘ BN|| can be far below ||conv|| · ||BN||).
- Offsets (biases, BN shifts) fold into the adjacent map's bias where that is exact.
- Two dense maps in a row become one (||W2 W1|| <= ||W2|| ||W1||).
Every rewrite is exact up to float64 rounding; the self-check runs on the simplified graph.
"""

from __future__ import annotations

import torch

from lipverify.graph.ir import Graph, Node
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense, Scale, Shift


def _channel_vector(t: torch.Tensor, rank: int, channels: int) -> torch.Tensor | None:
    """If ``t`` (broadcast to a per-sample shape of ``rank`` axes) varies only along axis 0
    (conv channels), return it as a (channels,) vector."""
    if t.dim() > rank:
        return None
    t = t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))
    if any(s != 1 for s in t.shape[1:]) or t.shape[0] not in (1, channels):
        return None
    return t.reshape(-1).expand(channels).clone()


def _last_axis_vector(t: torch.Tensor, features: int) -> torch.Tensor | None:
    """If ``t`` varies only along the last axis, return it as a (features,) vector."""
    if t.dim() == 0:
        return t.reshape(1).expand(features).clone()
    if any(s != 1 for s in t.shape[:-1]) or t.shape[-1] not in (1, features):
        return None
    return t.reshape(-1).expand(features).clone()


def _sole_consumer(graph: Graph, node: Node) -> Node | None:
    if node.name == graph.output:
        return None
    users = graph.consumers(node.name)
    if len(users) != 1 or users[0].is_merge or users[0].inputs != [node.name]:
        return None
    return users[0]


def _fuse(graph: Graph, first: Node, second: Node, survivor: Node) -> None:
    """Replace the pair first -> second by ``survivor`` (one of them, its op already updated)."""
    parts = [p for s in (first.source, second.source) if s for p in s.split(" + ")]
    survivor.source = " + ".join(dict.fromkeys(parts))  # each source node named once, in order
    if survivor is first:  # first takes over second's output tensor
        old = first.name
        first.name, first.out_shape = second.name, second.out_shape
        graph.nodes.remove(second)
        for n in graph.nodes:
            n.inputs = [first.name if i == old else i for i in n.inputs]
    else:  # second reads first's input directly
        second.inputs = list(first.inputs)
        graph.nodes.remove(first)


def _fold_after(graph: Graph, lin: Node, nxt: Node) -> bool:
    op, post = lin.op, nxt.op
    if isinstance(op, Conv):
        rank, channels = len(lin.out_shape), op.weight.shape[0]
        vec_of = lambda t: _channel_vector(t, rank, channels)  # noqa: E731
        view = (-1,) + (1,) * (op.weight.dim() - 1)
    elif isinstance(op, Dense):
        channels = op.weight.shape[0]
        vec_of = lambda t: _last_axis_vector(t, channels)  # noqa: E731
        view = (-1, 1)
    else:
        return False
    if isinstance(post, Scale):
        s = vec_of(post.scale)
        if s is None:
            return False
        op.weight = op.weight * s.reshape(view)
        if op.bias is not None:
            op.bias = op.bias * s
    elif isinstance(post, Shift):
        c = vec_of(post.shift)
        if c is None:
            return False
        op.bias = c if op.bias is None else op.bias + c
    else:
        return False
    _fuse(graph, lin, nxt, lin)
    return True


def _fold_before(graph: Graph, pre: Node, lin: Node) -> bool:
    op, first = lin.op, pre.op
    if isinstance(op, Dense):
        features = op.weight.shape[1]
        if isinstance(first, Scale):
            s = _last_axis_vector(first.scale, features)
            if s is None:
                return False
            op.weight = op.weight * s.reshape(1, -1)
        elif isinstance(first, Shift):
            c = _last_axis_vector(first.shift, features)
            if c is None:
                return False
            extra = op.weight @ c
            op.bias = extra if op.bias is None else op.bias + extra
        else:
            return False
    elif isinstance(op, Conv) and isinstance(first, Scale):
        in_channels = op.weight.shape[1] * op.groups
        s = _channel_vector(first.scale, len(pre.out_shape), in_channels)
        if s is None:
            return False
        per_group = op.weight.shape[1]
        out_per_group = op.weight.shape[0] // op.groups
        w = op.weight.clone()
        for g in range(op.groups):
            rows = slice(g * out_per_group, (g + 1) * out_per_group)
            scale = s[g * per_group:(g + 1) * per_group]
            w[rows] = w[rows] * scale.reshape((1, -1) + (1,) * (w.dim() - 2))
        op.weight = w
    else:
        return False
    _fuse(graph, pre, lin, lin)
    return True


def _merge_dense(graph: Graph, a: Node, b: Node) -> bool:
    if not (isinstance(a.op, Dense) and isinstance(b.op, Dense)):
        return False
    w1, w2 = a.op.weight, b.op.weight
    # only merge when it does not grow the matrix (keeps norms cheap)
    if w2.shape[0] * w1.shape[1] > w1.numel() + w2.numel():
        return False
    bias = None
    if a.op.bias is not None:
        bias = w2 @ a.op.bias
    if b.op.bias is not None:
        bias = b.op.bias if bias is None else bias + b.op.bias
    b.op = Dense(w2 @ w1, bias)
    _fuse(graph, a, b, b)
    return True


def simplify(graph: Graph) -> Graph:
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node not in graph.nodes:
                continue
            nxt = _sole_consumer(graph, node)
            if nxt is None:
                continue
            if _fold_after(graph, node, nxt) or _fold_before(graph, node, nxt) or _merge_dense(graph, node, nxt):
                changed = True
                break
    return graph
