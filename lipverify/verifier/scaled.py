"""Checkers for ``rslmi`` and ``layerwise`` certificates (re-derived; nothing from the methods).

* ``rslmi``: the witness holds the certified tau_k per node; each sqrt(tau_k) is re-checked by
  ``factor_holds``; each residual block claim ||I ± L|| by ``norm_at_most`` on the unrolled block,
  after re-checking that the branch really is a chain of linear maps used nowhere else; then the
  propagation is recomputed (rounding up). The sketched tau_hat are never read.
* ``layerwise``: the scalings S_t of every tensor are rebuilt from the witness's class vectors
  (positive, finite; input and output exactly I). Each node's claim
  ||S_t (n(x) - n(y))|| <= c ||S_u (x - y)|| is re-checked by a rule chosen from the op type and
  the actual scalings: ``norm_at_most`` of S_t W S_u^{-1} (dense), ``conv_norm_at_most`` on the
  channel-rescaled kernel (conv; the scalings must be constant over space), equal scalings plus the
  op's closed-form factor (activations, shifts, per-channel pools), S_t = P(S_u) for permutations
  and projections, or the coarse max(S_t) ||op|| max(1/S_u). Loop-transformation claims are
  re-checked on the recomputed scaled products (plus their float64 product error) and the
  recursion is recomputed with the slopes read from the ops.
"""

from __future__ import annotations

import math

import torch

from lipverify.graph.ir import Graph, Node
from lipverify.ops.activation import Activation
from lipverify.ops.base import LinearOp
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense, Scale, Shift
from lipverify.ops.merge import Add, Sub
from lipverify.ops.pool import AvgPool, MaxPool, Reduce
from lipverify.ops.shape import Pad, Reshape, Slice, Transpose
from lipverify.verifier.conv import conv_norm_at_most
from lipverify.verifier.factors import factor_holds, label, merge_bound
from lipverify.verifier.linalg import norm_at_most
from lipverify.verifier.numbers import EPS, add_up, at_least, claim, claim_vector, fail, mul_up, only_keys, sqrt_up, up

# ----------------------------------------------------------------------------------------------
# rslmi


def _linear_branch(graph: Graph, merge: Node, skip, chain) -> list[str]:
    """The claimed branch must be skip -> chain[0] -> ... -> chain[-1] -> merge, linear/shift only."""
    if not isinstance(skip, str) or not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain):
        fail(f"residual block at {merge.name}: malformed skip/chain")
    if not isinstance(merge.op, (Add, Sub)) or sorted([skip, chain[-1]]) != sorted(merge.inputs):
        fail(f"residual block at {merge.name}: inputs do not match the claimed skip/branch")
    if isinstance(merge.op, Sub) and merge.inputs[0] != skip and merge.inputs[1] != skip:
        fail(f"residual block at {merge.name}: malformed")
    prev = skip
    names = {n.name for n in graph.nodes}
    for k, name in enumerate(chain):
        if name not in names:
            fail(f"residual block at {merge.name}: no node {name}")
        node = graph.node(name)
        if node.inputs != [prev] or not isinstance(node.op, (LinearOp, Shift)):
            fail(f"residual block at {merge.name}: {name} is not a linear step of the branch")
        nxt = chain[k + 1] if k + 1 < len(chain) else merge.name
        if [c.name for c in graph.consumers(name)] != [nxt]:
            fail(f"residual block at {merge.name}: {name} is used outside the branch")
        prev = name
    return chain


def _block_matrix(graph: Graph, merge: Node, skip: str, chain: list[str]) -> torch.Tensor:
    shape = tuple(graph.shape_of(skip))
    if tuple(merge.out_shape) != shape:
        fail(f"residual block at {merge.name}: the merge broadcasts")
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape((n,) + shape)
    y = basis
    with torch.no_grad():
        for name in chain:
            op = graph.node(name).op
            if isinstance(op, LinearOp):
                y = op.apply(y)  # a Shift's linear part is the identity
    if tuple(y.shape[1:]) != shape:
        fail(f"residual block at {merge.name}: the branch changes the shape")
    sign = -1.0 if isinstance(merge.op, Sub) else 1.0
    return (basis + sign * y).reshape(n, n)


def verify_rslmi(graph: Graph, value: float, witness: dict) -> str:
    only_keys(witness, {"tau", "blocks"}, "rslmi")
    taus = witness.get("tau")
    blocks = witness.get("blocks", {})
    if not isinstance(taus, dict) or not isinstance(blocks, dict):
        fail("rslmi: the witness has no tau / blocks")
    factors = {}
    for node in graph.nodes:
        if node.is_merge:
            continue
        if node.name not in taus:
            fail(f"rslmi: no certified tau for {label(node)}")
        tau = claim(taus[node.name], f"rslmi: tau of {label(node)}")
        factor = sqrt_up(tau)
        if not factor_holds(node, graph.in_shape(node), factor):
            fail(f"rslmi: tau = {tau!r} claimed for {label(node)} is not a verified bound on its squared norm")
        factors[node.name] = factor
    checked_blocks = {}
    for name, blk in blocks.items():
        if name not in {n.name for n in graph.nodes} or not isinstance(blk, dict):
            fail(f"rslmi: residual block {name!r} is not a merge of the graph")
        only_keys(blk, {"skip", "chain", "factor"}, f"rslmi block {name}")
        merge = graph.node(name)
        chain = _linear_branch(graph, merge, blk.get("skip"), blk.get("chain"))
        factor = claim(blk.get("factor"), f"rslmi: ||I ± L|| of the block at {name}")
        if not norm_at_most(_block_matrix(graph, merge, blk["skip"], chain), factor):
            fail(f"rslmi: ||I ± L|| = {factor!r} claimed for the residual block at {name} does not hold")
        checked_blocks[name] = (blk["skip"], factor)

    bound = {graph.input_name: 1.0}
    for node in graph.nodes:
        if node.is_merge:
            v = merge_bound(node, [bound[i] for i in node.inputs])
            if node.name in checked_blocks:
                skip, factor = checked_blocks[node.name]
                v = min(v, mul_up(factor, bound[skip]))
            bound[node.name] = v
        else:
            bound[node.name] = mul_up(factors[node.name], bound[node.inputs[0]])
    at_least(value, bound[graph.output], "rslmi")
    return bound[graph.output], (f"{len(factors)} certified tau_k re-checked (Cholesky / per-frequency Cholesky), {len(checked_blocks)} "
            "residual block(s) by Cholesky, propagation recomputed rounding up; sketched tau_hat not used")


# ----------------------------------------------------------------------------------------------
# layerwise


def _rebuild_scalings(graph: Graph, witness: dict) -> dict[str, torch.Tensor]:
    raw, spec = witness.get("scalings"), witness.get("tensors")
    if not isinstance(raw, dict) or not isinstance(spec, dict):
        fail("layerwise: the witness has no scalings / tensors")
    vectors = {}
    for key, values in raw.items():
        try:
            k = int(key)
        except (TypeError, ValueError):
            fail(f"layerwise: scaling class {key!r} is not an integer")
        vectors[k] = claim_vector(values, f"layerwise: scaling class {key}", positive=True)
    full: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        """Tensors are visited in graph order, so a parent is always built before its children."""
        if name in full:
            return full[name]
        if name not in spec or not isinstance(spec[name], dict):
            fail(f"layerwise: no scaling for tensor {name} (or its parent comes after it)")
        entry = spec[name]
        shape = tuple(graph.shape_of(name))
        kind = entry.get("kind")
        only_keys(entry, {"kind", "parent"} if kind in ("same", "derived") else {"kind", "class"},
                  f"layerwise: scaling of {name}")
        if kind == "same":
            parent = entry.get("parent")
            if parent not in full:
                fail(f"layerwise: the scaling of {name} copies {parent!r}, which is not an earlier tensor")
            out = full[parent]
        elif kind == "derived":
            node = graph.node(name)
            if node.inputs != [entry.get("parent")] or not isinstance(node.op, (Reshape, Transpose, Slice)):
                fail(f"layerwise: scaling of {name} is derived through a node that is not a permutation/projection")
            with torch.no_grad():
                out = node.op.apply(full[entry["parent"]][None])[0]
        elif kind in ("channel", "last"):
            cls = entry.get("class")
            if isinstance(cls, bool) or not isinstance(cls, int) or cls not in vectors:
                fail(f"layerwise: scaling of {name} names an unknown class {cls!r}")
            v = vectors[cls]
            size = (shape[0] if kind == "channel" else shape[-1]) if shape else 1
            if v.numel() != size:
                fail(f"layerwise: scaling class of {name} has {v.numel()} entries for {size}")
            view = () if not shape else (-1,) + (1,) * (len(shape) - 1) if kind == "channel" else \
                (1,) * (len(shape) - 1) + (-1,)
            out = v.reshape(view).expand(shape).contiguous()
        else:
            fail(f"layerwise: unknown scaling kind {kind!r} for {name}")
        if tuple(out.shape) != shape:
            fail(f"layerwise: scaling of {name} has shape {tuple(out.shape)}, the tensor has {shape}")
        full[name] = out
        return out

    for name in [graph.input_name] + [n.name for n in graph.nodes]:
        get(name)
    for end in (graph.input_name, graph.output):
        if not bool((full[end] == 1.0).all()):
            fail(f"layerwise: the scaling of the network {'input' if end == graph.input_name else 'output'} "
                 "is not the identity")
    return full


def _per_channel(s: torch.Tensor) -> torch.Tensor | None:
    """The channel vector if ``s`` is constant over all axes but the first, else None."""
    if s.dim() < 2:
        return s
    flat = s.reshape(s.shape[0], -1)
    return flat[:, 0] if bool((flat == flat[:, :1]).all()) else None


def _features(s: torch.Tensor) -> torch.Tensor | None:
    """The per-feature vector of a scaling that is constant along every axis but the last (the axis a
    Dense acts on), else None. Then S (I ⊗ W) S'^-1 = I ⊗ (diag(s) W diag(1/s'))."""
    if s.dim() <= 1:
        return s
    flat = s.reshape(-1, s.shape[-1])
    return flat[0] if bool((flat == flat[:1]).all()) else None


def _max_ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    """An upper bound on max(num / den) (entrywise), rounded up."""
    return up(up(float((num / den).max())) * (1 + 2 * EPS))


def _coarse(s_t: torch.Tensor, s_u: torch.Tensor) -> float:
    """max(S_t) * max(1 / S_u), rounded up: bounds ||S_t A S_u^{-1}|| / ||A|| for any A."""
    return up(up(float(s_t.max()) * up(float((1.0 / s_u).max()) * (1 + 2 * EPS))) * (1 + 2 * EPS))


def _check_node(graph: Graph, node: Node, s_u: torch.Tensor, s_t: torch.Tensor, claimed: float) -> str:
    """Re-check ||S_t (n(x) - n(y))|| <= claimed ||S_u (x - y)||; returns the rule that passed."""
    op, in_shape = node.op, tuple(graph.in_shape(node))
    fu, ft = (_features(s_u), _features(s_t)) if isinstance(op, Dense) else (None, None)
    if fu is not None and ft is not None:
        a = ft[:, None] * op.weight.to(torch.float64) / fu[None, :]
        # the rescaling rounds each entry by <= 2 eps relative: ||dA|| <= 2 eps ||A||_F
        err = 3 * EPS * float(torch.linalg.matrix_norm(a, ord="fro"))
        if norm_at_most(a, claimed - err):
            return "dense"
    if isinstance(op, Conv):
        cu, ct = _per_channel(s_u), _per_channel(s_t)
        if cu is not None and ct is not None:
            w = op.weight.to(torch.float64)
            o, c_g = w.shape[:2]
            cu_g = cu.reshape(op.groups, c_g).repeat_interleave(o // op.groups, dim=0)
            k = w * (ct[:, None] / cu_g).reshape((o, c_g) + (1,) * (w.dim() - 2))
            scaled = Conv(k, None, op.stride, op.pads, op.dilation, op.groups)
            err = 3 * EPS * float(k.abs().sum()) * math.sqrt(math.prod(in_shape[1:]))
            if conv_norm_at_most(k, in_shape, op.stride, op.pads, op.dilation, op.groups, claimed - err,
                                 apply=scaled.apply):
                return "conv"
    elementwise = isinstance(op, (Activation, Shift)) or isinstance(op, Scale)
    if elementwise and tuple(node.out_shape) == in_shape and s_u.shape == s_t.shape and bool((s_u == s_t).all()):
        if factor_holds(node, in_shape, claimed):
            return "tied"
    channelwise = isinstance(op, (MaxPool, AvgPool, Pad)) or (isinstance(op, Reduce) and 0 not in op.axes)
    if channelwise and len(in_shape) >= 2 and node.out_shape and node.out_shape[0] == in_shape[0]:
        cu, ct = _per_channel(s_u), _per_channel(s_t)
        # a Pad must not pad the channel axis (torch order: the channel pair comes last)
        pad_ok = not isinstance(op, Pad) or len(op.torch_pads) // 2 < len(in_shape) or all(
            p == 0 for p in op.torch_pads[-2:])
        if pad_ok and cu is not None and ct is not None and bool((cu == ct).all()) \
                and factor_holds(node, in_shape, claimed):
            return "channel"
    if isinstance(op, (Reshape, Transpose, Slice)):
        with torch.no_grad():
            moved = op.apply(s_u[None].expand((1,) + in_shape))[0]
        if moved.shape == s_t.shape and bool((moved == s_t).all()) and claimed >= 1.0:
            return "permute"
    ratio = _coarse(s_t, s_u)
    if factor_holds(node, in_shape, claimed / up(ratio * (1 + 2 * EPS))):
        return "generic"
    fail(f"layerwise: the scaled factor {claimed!r} claimed for {label(node)} is not verified")


def _check_run(graph: Graph, names: list[str], full: dict[str, torch.Tensor]) -> list[tuple[float, float]]:
    """``names`` must be a run of dense layers joined by exactly one activation (and shifts) each, each
    link used only inside the run, with equal scalings along each link; returns the slopes."""
    slopes = []
    for name in names:
        if name not in {n.name for n in graph.nodes} or not isinstance(graph.node(name).op, Dense):
            fail(f"layerwise: loop run {names}: {name} is not a dense node")
        if _features(full[name]) is None or _features(full[graph.node(name).inputs[0]]) is None:
            fail(f"layerwise: loop run {names}: the scalings around {name} vary along the axes the dense map "
                 "does not act on")
    for prev_name, name in zip(names[:-1], names[1:]):
        node = graph.node(name)
        cur, act = node.inputs[0], None
        while cur != prev_name:
            if cur == graph.input_name:
                fail(f"layerwise: loop run {names}: {name} does not follow {prev_name}")
            link = graph.node(cur)
            if len(graph.consumers(cur)) != 1 or link.is_merge:
                fail(f"layerwise: loop run {names}: {cur} is used elsewhere")
            if isinstance(link.op, Activation) and act is None and tuple(link.out_shape) == tuple(graph.in_shape(link)):
                act = link.op
            elif not (isinstance(link.op, Shift) and tuple(link.out_shape) == tuple(graph.in_shape(link))):
                fail(f"layerwise: loop run {names}: {cur} is neither a shift nor the one activation")
            if not bool((full[cur] == full[link.inputs[0]]).all()):
                fail(f"layerwise: loop run {names}: the scaling changes across {cur}")
            cur = link.inputs[0]
        if len(graph.consumers(prev_name)) != 1:
            fail(f"layerwise: loop run {names}: {prev_name} is used elsewhere")
        if act is None:
            fail(f"layerwise: loop run {names}: no activation between {prev_name} and {name}")
        slopes.append(tuple(float(x) for x in act.slopes))
    return slopes


def _product_error(s_out: torch.Tensor, s_in: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Bound on ||S_out (fl(W_j ... W_i) - W_j ... W_i) S_in^{-1}||_2 for the float64 product
    (Higham Thm 3.5 per product, first order doubled): 2 (k-1) gamma_n prod ||W||_F max S_out max 1/S_in."""
    if len(weights) < 2:
        return 0.0
    n = max(max(w.shape) for w in weights)
    fro = math.prod(float(torch.linalg.matrix_norm(w.to(torch.float64), ord="fro")) for w in weights)
    g = n * EPS / (1 - n * EPS)
    return 2.0 * (len(weights) - 1) * g * fro * _coarse(s_out, s_in) * 1.01


def _loop_recursion(slopes, norms, p_before, p_in) -> float:
    """Q(j, j) of the loop transformation (see bounds/layerwise.py), rounded up:
    Q(first) = ||M_first|| P_in; Q_i = min(kappa ||M_i|| P_{i-1}, |c| Q_{i-1} + d ||M_i|| P_{i-1})."""
    q = mul_up(norms[0], p_in)
    for i in range(1, len(norms)):
        a, b = slopes[i - 1]
        c, d = abs(a + b) / 2.0, (b - a) / 2.0
        c, d, kappa = up(c), up(d), max(abs(a), abs(b))
        plain = mul_up(mul_up(kappa, norms[i]), p_before[i])
        loop = add_up([mul_up(c, q), mul_up(mul_up(d, norms[i]), p_before[i])])
        q = min(plain, loop)
    return q


def verify_layerwise(graph: Graph, value: float, witness: dict) -> str:
    only_keys(witness, {"scalings", "tensors", "factors", "loops"}, "layerwise")
    full = _rebuild_scalings(graph, witness)
    factors, loops = witness.get("factors"), witness.get("loops", {})
    if not isinstance(factors, dict) or not isinstance(loops, dict):
        fail("layerwise: the witness has no factors / loops")
    bound: dict[str, float] = {graph.input_name: 1.0}
    rules: dict[str, int] = {}
    for node in graph.nodes:
        s_t = full[node.name]
        if node.is_merge:
            terms = []
            for i in node.inputs:
                s_i = full[i]
                same = isinstance(node.op, (Add, Sub)) and s_i.shape == s_t.shape
                r = _max_ratio(s_t, s_i) if same else _coarse(s_t, s_i)
                terms.append(mul_up(r, bound[i]))
            bound[node.name] = merge_bound(node, terms)
            continue
        u = node.inputs[0]
        if node.name not in factors:
            fail(f"layerwise: no factor for {label(node)}")
        claimed = claim(factors[node.name], f"layerwise: the factor of {label(node)}")
        rule = _check_node(graph, node, full[u], s_t, claimed)
        rules[rule] = rules.get(rule, 0) + 1
        bound[node.name] = mul_up(claimed, bound[u])
        if node.name in loops:
            entry = loops[node.name]
            names = entry.get("run") if isinstance(entry, dict) else None
            if isinstance(entry, dict):
                only_keys(entry, {"run", "norms"}, f"layerwise loop at {node.name}")
            if not isinstance(names, list) or len(names) < 2 or names[-1] != node.name:
                fail(f"layerwise: the loop run for {node.name} is malformed or does not end there")
            slopes = _check_run(graph, names, full)
            raw = entry.get("norms")
            if not isinstance(raw, list) or len(raw) != len(names):
                fail(f"layerwise: loop run for {node.name}: norms do not match the run")
            norms = [claim(x, f"layerwise: loop norm {k} at {node.name}") for k, x in enumerate(raw)]
            weights = [graph.node(n).op.weight.to(torch.float64) for n in names]
            s_j = _features(full[node.name])
            for k in range(len(names)):
                prod = weights[-1]
                for wk in reversed(weights[k:-1]):
                    prod = prod @ wk
                s_in = _features(full[graph.node(names[k]).inputs[0]])
                m = s_j[:, None] * prod / s_in[None, :]
                err = _product_error(s_j, s_in, weights[k:]) + 3 * EPS * float(torch.linalg.matrix_norm(m, ord="fro"))
                if not norm_at_most(m, norms[k] - err):
                    fail(f"layerwise: loop norm {norms[k]!r} of the product ending at {node.name} is not verified")
            p_before = [math.nan] + [bound[n] for n in names[:-1]]
            p_in = bound[graph.node(names[0]).inputs[0]]
            bound[node.name] = min(bound[node.name], _loop_recursion(slopes, norms, p_before, p_in))
            rules["loop"] = rules.get("loop", 0) + 1
    at_least(value, bound[graph.output], "layerwise")
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(rules.items()))
    return bound[graph.output], (f"scalings rebuilt (positive, I at input/output); each scaled factor re-checked ({summary}) by "
            "Cholesky / per-frequency Cholesky / closed forms; propagation recomputed rounding up")
