"""Independent verifiers for the ``rslmi`` and ``layerwise`` certificates.

Importing this module registers both into ``lipverify.verify.VERIFIERS``. Neither re-runs the
method: they read the witness and re-check every certified number with a different algorithm.

* ``rslmi``: the witness holds the certified tau_k per node. Each sqrt(tau_k) is re-checked by
  ``lipverify.verify.check_factor`` (Cholesky of tau I - W^T W for dense and small linear maps,
  frequency-by-frequency Cholesky on a direct DFT for large convolutions, closed forms for
  activations, pools and shape ops); each residual block claim ||I ± L|| by a Cholesky on the
  unrolled block, after re-checking that the branch really is a chain of linear maps; then the
  graph propagation is recomputed. The sketched tau_hat are never used.
* ``layerwise``: the scalings S_t of every tensor are rebuilt from the witness's class vectors
  (positive, finite; input and output exactly I). Each node's claim
  ||S_t (n(x) - n(y))|| <= c ||S_u (x - y)|| is re-checked by a rule chosen from the op type and
  the actual scalings (not from the witness's rule names): Cholesky of c^2 I - A^T A with
  A = S_t W S_u^{-1} (dense), ``verify_conv_bound`` on the channel-rescaled kernel (conv; the
  scalings must be constant over space), equality of scalings plus the op's closed-form factor
  (activations, shifts, per-channel pools), S_t = P(S_u) for permutations and projections, or the
  coarse max(S_t) ||op|| max(1/S_u) otherwise. Loop-transformation claims are re-checked by
  Cholesky on the recomputed scaled products and the recursion is recomputed with the slopes read
  from the ops. Finally the propagation is recomputed.
"""

from __future__ import annotations

import math

import torch

from lipverify.bounds.base import BoundResult
from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph, Node
from lipverify.ops.activation import Activation
from lipverify.ops.base import LinearOp
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense, Scale, Shift
from lipverify.ops.merge import Add, Sub
from lipverify.ops.pool import AvgPool, MaxPool, Reduce
from lipverify.ops.shape import Pad, Reshape, Slice, Transpose
from lipverify.verify import VERIFIERS, check_factor, gram_is_below

SLACK = 1e-12  # relative slack when comparing a recomputed total with the claimed one


def _fail(msg: str) -> None:
    raise SoundnessError(f"certificate check failed: {msg}")


def _label(node: Node) -> str:
    return f"{node.source or node.name} ({node.op.describe()})"


# ----------------------------------------------------------------------------------------------
# rslmi
# ----------------------------------------------------------------------------------------------


def _check_linear_branch(graph: Graph, merge: Node, skip: str, chain: list[str]) -> None:
    """The claimed branch must be skip -> chain[0] -> ... -> chain[-1] -> merge, linear/shift only."""
    if not isinstance(merge.op, (Add, Sub)) or sorted([skip, chain[-1] if chain else ""]) != sorted(merge.inputs):
        _fail(f"residual block at {merge.name}: inputs do not match the claimed skip/branch")
    prev = skip
    for name in chain:
        node = graph.node(name)
        if node.inputs != [prev] or not isinstance(node.op, (LinearOp, Shift)):
            _fail(f"residual block at {merge.name}: {name} is not a linear step of the branch")
        if [c.name for c in graph.consumers(name)] != [chain[chain.index(name) + 1] if name != chain[-1] else merge.name]:
            _fail(f"residual block at {merge.name}: {name} is used outside the branch")
        prev = name


def _block_unrolled(graph: Graph, merge: Node, skip: str, chain: list[str]) -> torch.Tensor:
    shape = tuple(graph.shape_of(skip))
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape((n,) + shape)
    y = basis
    with torch.no_grad():
        for name in chain:
            op = graph.node(name).op
            y = op.apply(y) if isinstance(op, LinearOp) else y  # a Shift's linear part is I
    sign = -1.0 if isinstance(merge.op, Sub) else 1.0
    return (basis + sign * y).reshape(n, n)


def verify_rslmi(graph: Graph, result: BoundResult) -> str:
    taus = result.witness.get("tau", {})
    factors = {}
    for node in graph.nodes:
        if node.is_merge:
            continue
        if node.name not in taus:
            _fail(f"no certified tau for {_label(node)}")
        tau = float(taus[node.name])
        if not (math.isfinite(tau) and tau >= 0):
            _fail(f"tau {tau} for {_label(node)} is not a finite non-negative number")
        factor = math.sqrt(tau)
        if not check_factor(node, graph.in_shape(node), factor):
            _fail(f"tau = {tau!r} claimed for {_label(node)} is not a verified bound on its squared norm")
        factors[node.name] = factor
    bound = {graph.input_name: 1.0}
    blocks = result.witness.get("blocks", {})
    for node in graph.nodes:
        if node.is_merge:
            value = node.op.combine([bound[i] for i in node.inputs])
            if node.name in blocks:
                blk = blocks[node.name]
                _check_linear_branch(graph, node, blk["skip"], list(blk["chain"]))
                m = _block_unrolled(graph, node, blk["skip"], list(blk["chain"]))
                if not gram_is_below(m, float(blk["factor"])):
                    _fail(f"||I ± L|| = {blk['factor']} claimed for the residual block at {node.name} does not hold")
                value = min(value, float(blk["factor"]) * bound[blk["skip"]])
            bound[node.name] = value
        else:
            bound[node.name] = factors[node.name] * bound[node.inputs[0]]
    recomputed = bound[graph.output]
    if not recomputed <= result.value / (1 + SLACK):
        _fail(f"certified taus give {recomputed}, certificate claims {result.value}")
    return (f"{len(factors)} certified tau_k re-checked (Cholesky of tau I - W^T W / per-frequency Cholesky), "
            f"{len(blocks)} residual block(s) by Cholesky, propagation recomputed; sketched tau_hat not used")


# ----------------------------------------------------------------------------------------------
# layerwise
# ----------------------------------------------------------------------------------------------


def _rebuild_scalings(graph: Graph, witness: dict) -> dict[str, torch.Tensor]:
    vectors = {}
    for key, values in witness["scalings"].items():
        v = torch.tensor(values, dtype=torch.float64)
        if not bool(torch.isfinite(v).all()) or not bool((v > 0).all()):
            _fail(f"scaling class {key} has non-positive or non-finite entries")
        vectors[int(key)] = v
    spec = witness["tensors"]
    full: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name in full:
            return full[name]
        if name not in spec:
            _fail(f"no scaling for tensor {name}")
        entry = spec[name]
        shape = tuple(graph.shape_of(name))
        kind = entry["kind"]
        if kind == "same":
            out = get(entry["parent"])
            if tuple(out.shape) != shape:
                _fail(f"scaling of {name} copies one of another shape")
        elif kind == "derived":
            node = graph.node(name)
            if node.inputs != [entry["parent"]] or not isinstance(node.op, (Reshape, Transpose, Slice)):
                _fail(f"scaling of {name} is derived through a node that is not a permutation/projection")
            with torch.no_grad():
                out = node.op.apply(get(entry["parent"])[None])[0]
        else:
            v = vectors[int(entry["class"])]
            view = (-1,) + (1,) * (len(shape) - 1) if kind == "channel" else (1,) * (len(shape) - 1) + (-1,)
            out = v.reshape(view).expand(shape).contiguous()
        if tuple(out.shape) != shape:
            _fail(f"scaling of {name} has shape {tuple(out.shape)}, tensor has {shape}")
        full[name] = out
        return out

    for name in [graph.input_name] + [n.name for n in graph.nodes]:
        get(name)
    for end in (graph.input_name, graph.output):
        if not bool((full[end] == 1.0).all()):
            _fail(f"the scaling of the network {'input' if end == graph.input_name else 'output'} is not the identity")
    return full


def _per_channel(s: torch.Tensor) -> torch.Tensor | None:
    """The channel vector if ``s`` is constant over all axes but the first, else None."""
    if s.dim() < 2:
        return s
    flat = s.reshape(s.shape[0], -1)
    return flat[:, 0] if bool((flat == flat[:, :1]).all()) else None


def _check_node(graph: Graph, node: Node, s_u: torch.Tensor, s_t: torch.Tensor, claimed: float) -> str:
    """Re-check ||S_t (n(x) - n(y))|| <= claimed ||S_u (x - y)||; returns the rule that passed."""
    op, in_shape = node.op, tuple(graph.in_shape(node))
    if isinstance(op, Dense) and s_u.dim() == 1 and s_t.dim() == 1:
        a = s_t[:, None] * op.weight.to(torch.float64) / s_u[None, :]
        if gram_is_below(a, claimed):
            return "dense"
    if isinstance(op, Conv):
        cu, ct = _per_channel(s_u), _per_channel(s_t)
        if cu is not None and ct is not None:
            from lipverify.norms.conv import verify_conv_bound

            w = op.weight.to(torch.float64)
            o, c_g = w.shape[:2]
            cu_g = cu.reshape(op.groups, c_g).repeat_interleave(o // op.groups, dim=0)
            k = w * (ct[:, None] / cu_g).reshape((o, c_g) + (1,) * (w.dim() - 2))
            if verify_conv_bound(k, in_shape, op.stride, op.pads, op.dilation, op.groups, claimed):
                return "conv"
    elementwise = isinstance(op, (Activation, Shift)) or (isinstance(op, Scale) and tuple(node.out_shape) == in_shape)
    if elementwise and s_u.shape == s_t.shape and bool((s_u == s_t).all()):
        if check_factor(node, in_shape, claimed):
            return "tied"
    channelwise = isinstance(op, (MaxPool, AvgPool, Pad)) or (isinstance(op, Reduce) and 0 not in op.axes)
    if channelwise and len(in_shape) >= 2 and node.out_shape and node.out_shape[0] == in_shape[0]:
        cu, ct = _per_channel(s_u), _per_channel(s_t)
        pad_ok = not isinstance(op, Pad) or len(op.torch_pads) // 2 < len(in_shape) or all(
            p == 0 for p in op.torch_pads[-2:])
        if pad_ok and cu is not None and ct is not None and bool((cu == ct).all()) and check_factor(node, in_shape, claimed):
            return "channel"
    if isinstance(op, (Reshape, Transpose, Slice)):
        with torch.no_grad():
            moved = op.apply(s_u[None].expand((1,) + in_shape))[0]
        if moved.shape == s_t.shape and bool((moved == s_t).all()) and claimed >= 1.0:
            return "permute"
    ratio = float(s_t.max()) * float((1.0 / s_u).max())
    if ratio > 0 and check_factor(node, in_shape, claimed / (ratio * (1 + 1e-13))):
        return "generic"
    _fail(f"the scaled factor {claimed!r} claimed for {_label(node)} is not verified")
    return ""


def _check_run(graph: Graph, names: list[str], full: dict[str, torch.Tensor]) -> list[tuple[float, float]]:
    """Re-check that ``names`` is a run of dense layers joined by one activation (and shifts) each,
    with equal scalings along each link; return the activations' slopes."""
    slopes = []
    for prev_name, name in zip(names[:-1], names[1:]):
        node = graph.node(name)
        if not isinstance(node.op, Dense) or not isinstance(graph.node(prev_name).op, Dense):
            _fail(f"loop run {names}: not all dense")
        cur, act = node.inputs[0], None
        while cur != prev_name:
            if cur == graph.input_name:
                _fail(f"loop run {names}: {name} does not follow {prev_name}")
            link = graph.node(cur)
            if len(graph.consumers(cur)) != 1 or link.is_merge:
                _fail(f"loop run {names}: {cur} is used elsewhere")
            if isinstance(link.op, Activation) and act is None:
                act = link.op
            elif not isinstance(link.op, Shift):
                _fail(f"loop run {names}: {cur} is neither a shift nor the one activation")
            if not bool((full[cur] == full[link.inputs[0]]).all()):
                _fail(f"loop run {names}: scaling changes across {cur}")
            cur = link.inputs[0]
        if act is None:
            _fail(f"loop run {names}: no activation between {prev_name} and {name}")
        slopes.append(tuple(float(x) for x in act.slopes))
    return slopes


def _product_rounding(s_out, s_in, weights) -> float:
    from lipverify.bounds.layerwise import product_rounding

    return product_rounding(s_out, s_in, weights)


def verify_layerwise(graph: Graph, result: BoundResult) -> str:
    from lipverify.bounds.layerwise import loop_recursion

    w = result.witness
    full = _rebuild_scalings(graph, w)
    factors, loops = w["factors"], w.get("loops", {})
    bound: dict[str, float] = {graph.input_name: 1.0}
    rules: dict[str, int] = {}
    for node in graph.nodes:
        s_t = full[node.name]
        if node.is_merge:
            terms = []
            for i in node.inputs:
                s_i = full[i]
                if isinstance(node.op, (Add, Sub)) and s_i.shape == s_t.shape:
                    r = float((s_t / s_i).max())
                else:
                    r = float(s_t.max()) * float((1.0 / s_i).max())
                terms.append(r * (1 + 1e-13) * bound[i])
            bound[node.name] = node.op.combine(terms)
            continue
        u = node.inputs[0]
        claimed = float(factors.get(node.name, float("nan")))
        if not (math.isfinite(claimed) and claimed >= 0):
            _fail(f"no finite factor for {_label(node)}")
        rule = _check_node(graph, node, full[u], s_t, claimed)
        rules[rule] = rules.get(rule, 0) + 1
        bound[node.name] = claimed * bound[u]
        if node.name in loops:
            entry = loops[node.name]
            names = list(entry["run"])
            if names[-1] != node.name:
                _fail(f"loop run for {node.name} does not end there")
            slopes = _check_run(graph, names, full)
            s_j = full[node.name]
            norms = [float(x) for x in entry["norms"]]
            if len(norms) != len(names):
                _fail(f"loop run for {node.name}: {len(norms)} norms for {len(names)} layers")
            weights = [graph.node(n).op.weight.to(torch.float64) for n in names]
            for k in range(len(names)):
                prod = weights[-1]
                for wk in reversed(weights[k:-1]):
                    prod = prod @ wk
                s_in = full[graph.node(names[k]).inputs[0]]
                err = _product_rounding(s_j, s_in, weights[k:])
                m = s_j[:, None] * prod / s_in[None, :]
                if not gram_is_below(m, norms[k] - err):
                    _fail(f"loop norm {norms[k]!r} of the product ending at {node.name} is not verified")
            p_before = [float("nan")] + [bound[n] for n in names[:-1]]
            p_in = bound[graph.node(names[0]).inputs[0]]
            bound[node.name] = min(bound[node.name], loop_recursion(slopes, norms, p_before, p_in))
            rules["loop"] = rules.get("loop", 0) + 1
    recomputed = bound[graph.output]
    if not recomputed <= result.value / (1 + SLACK):
        _fail(f"scaled factors give {recomputed}, certificate claims {result.value}")
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(rules.items()))
    return (f"scalings rebuilt (positive, I at input/output); each scaled factor re-checked ({summary}) by "
            "Cholesky / per-frequency Cholesky / closed forms; propagation recomputed")


VERIFIERS["rslmi"] = verify_rslmi
VERIFIERS["layerwise"] = verify_layerwise
