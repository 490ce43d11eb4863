"""The LMIs of whole-graph LipSDP certificates, re-derived from the graph (trusted; see
docs/conv-lipsdp.md for the derivation).

A certificate cuts the graph into a chain of single-entry single-exit *segments* joined at
tensors b_0 = input, b_1, ..., b_S = output, each boundary with a weight w_b >= 0 per channel
(axis 0). Segment j claims  sum_c w_out[c] |dy_c|^2 <= sum_c w_in[c] |dx_c|^2  for any two inputs.

* ``freq``: convolutions (any stride/padding/dilation/groups), per-channel scales, shifts,
  residual Add/Sub and elementwise activations on spatial tensors, optionally ending in a global
  mean. Activation outputs (and the entry) are the *states*; every other tensor must be a sum of
  at most-one-convolution paths from states. With multipliers constant per channel the LMI is
  translation invariant on a periodic coarse grid (strided tensors as polyphase components), so it
  holds iff the matrix A(w) of every grid frequency w is PSD (half the grid: A(-w) = conj A(w)).
  Zero-padded positions act like an activation of slope 0, so activation slopes are widened to the
  hull of [alpha, beta] and {0}.
* ``dense``: any linear ops (unrolled), shifts, Add/Sub and activations; one real matrix, with
  multipliers per neuron or per channel.

Each LMI is stored in *pair form*: A = sum over groups g of x_g * U_g G_g U_g^H, where a group is
one multiplier's term: an activation row (columns: the conjugated pre-activation row l and the unit
vector of the state, G = [[2ab, -(a+b)], [-(a+b), 2]]), an entry coordinate (G = [[1]]) or an exit
row (G = [[-1]]). The bound methods use the same columns to optimize the multipliers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lipverify.graph.ir import Graph, Node
from lipverify.ops.activation import Activation
from lipverify.ops.base import LinearOp
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense, Scale, Shift
from lipverify.ops.merge import Add, Sub
from lipverify.ops.pool import AvgPool, Reduce
from lipverify.ops.shape import Reshape, Slice, Transpose
from lipverify.verifier.conv import coarse_kernel
from lipverify.verifier.linalg import SAFETY, gamma
from lipverify.verifier.numbers import EPS, fail

DENSE_MAX_DIM = 8192  # largest dense LMI the checker factors
DENSE_LINEAR = (Dense, Conv, Scale, Reshape, Transpose, Slice, AvgPool, Reduce)


# ----------------------------------------------------------------------------------------------
# Segments
# ----------------------------------------------------------------------------------------------


def segment_nodes(graph: Graph, entry: str, exit_: str) -> list[Node]:
    """The nodes on paths from ``entry`` to ``exit_``; fails unless they form a single-entry
    single-exit piece (only ``exit_`` is read outside it, every input comes from inside or ``entry``)."""
    names = [n.name for n in graph.nodes]
    if exit_ not in names or (entry != graph.input_name and entry not in names):
        fail(f"segment {entry} -> {exit_}: unknown tensor")
    reach = {entry}
    for n in graph.nodes:
        if any(i in reach for i in n.inputs):
            reach.add(n.name)
    back = {exit_}
    for n in reversed(graph.nodes):
        if n.name in back:
            back.update(n.inputs)
    inside = [n for n in graph.nodes if n.name in reach and n.name in back and n.name != entry]
    own = {n.name for n in inside}
    if exit_ not in own:
        fail(f"segment {entry} -> {exit_}: the exit does not depend on the entry")
    for n in inside:
        if any(i != entry and i not in own for i in n.inputs):
            fail(f"segment {entry} -> {exit_}: {n.name} reads a tensor from outside the segment")
        if n.name != exit_ and any(c.name not in own for c in graph.consumers(n.name)):
            fail(f"segment {entry} -> {exit_}: {n.name} is read outside the segment")
    if any(c.name not in own for c in graph.consumers(entry)):
        fail(f"segment {entry} -> {exit_}: the entry is also read outside the segment")
    return inside


def relaxed_slopes(op: Activation, padded: bool) -> tuple[float, float]:
    """The activation's slope interval; for a lifted (padded) tensor its hull with 0."""
    a, b = (float(s) for s in op.slopes)
    if not (math.isfinite(a) and math.isfinite(b) and a <= b):
        fail(f"slope interval [{a}, {b}] of {op.describe()} is not valid")
    return (min(a, 0.0), max(b, 0.0)) if padded else (a, b)


def sector_matrix(a: float, b: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """G with [v; x]^H G [v; x] = 2 (x - a v)(x - b v) <= 0 whenever x / v lies in [a, b]."""
    return ((2.0 * a * b, -(a + b)), (-(a + b), 2.0))


@dataclass
class Group:
    key: tuple  # ("t", activation node, index) | ("in", channel) | ("out", channel)
    cols: tuple[int, ...]
    G: tuple[tuple[float, ...], ...]


@dataclass
class PairForm:
    """Static description of one segment's LMI columns (the frequency-dependent values come from
    ``columns``)."""

    dim: int
    groups: list[Group] = field(default_factory=list)
    n_cols: int = 0
    col_delta: torch.Tensor | None = None  # (R,) bound on ||U_computed[:, a] - U_exact[:, a]||_2

    def add(self, key, n: int, G) -> tuple[int, ...]:
        cols = tuple(range(self.n_cols, self.n_cols + n))
        self.groups.append(Group(key, cols, G))
        self.n_cols += n
        return cols


# ----------------------------------------------------------------------------------------------
# Frequency segments
# ----------------------------------------------------------------------------------------------


@dataclass
class Path:
    """One linear path from a state: sign * post . conv(pre . state) (conv may be None)."""

    state: str
    conv: Node | None
    pre: torch.Tensor  # per-channel scale on the state's channels
    post: torch.Tensor | None  # per-channel scale on the conv's output channels
    sign: float = 1.0


def _channel_scale(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The per-channel vector of a Scale that varies only along axis 0, else fail."""
    t = scale.to(torch.float64)
    if t.dim() > len(shape):
        fail("a scale broadcasts its input to a larger shape")
    t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape))
    if any(s != 1 for s in t.shape[1:]) or t.shape[0] not in (1, shape[0]):
        fail("a scale inside a frequency segment must be constant over space (one value per channel)")
    return t.reshape(-1).expand(shape[0]).clone()


@dataclass
class FreqSegment:
    graph: Graph
    entry: str
    exit: str
    nodes: list[Node]
    states: list[str] = field(default_factory=list)
    phase: dict[str, tuple[int, ...]] = field(default_factory=dict)  # polyphase factor per tensor
    extent: dict[str, tuple[int, ...]] = field(default_factory=dict)  # coarse extent per tensor
    offset: dict[str, int] = field(default_factory=dict)  # first block coordinate of each state
    acts: list[tuple[Node, tuple[float, float], list[Path]]] = field(default_factory=list)
    exit_paths: list[Path] = field(default_factory=list)
    exit_mean: int | None = None  # number of averaged positions when the exit is a global mean
    required_grid: tuple[int, ...] = ()
    dim: int = 0

    def rows(self, name: str) -> int:
        return self.graph.shape_of(name)[0] * math.prod(self.phase[name])


def freq_segment(graph: Graph, entry: str, exit_: str, mean_exit: bool = True) -> FreqSegment:
    nodes = segment_nodes(graph, entry, exit_)
    seg = FreqSegment(graph, entry, exit_, nodes)
    shape0 = tuple(graph.shape_of(entry))
    if len(shape0) < 2:
        fail(f"frequency segment at {entry}: the entry is not a spatial tensor")
    nd = len(shape0) - 1
    step = {entry: (1,) * nd}
    expr: dict[str, list[Path]] = {entry: [Path(entry, None, torch.ones(shape0[0], dtype=torch.float64), None)]}
    seg.states.append(entry)
    for n in nodes:
        op, out = n.op, tuple(n.out_shape)
        ins = [tuple(graph.shape_of(i)) for i in n.inputs]
        if isinstance(op, Reduce) and n.name == exit_ and mean_exit:
            if set(op.axes) != set(range(1, nd + 1)) or not op.mean or out[0] != ins[0][0]:
                fail(f"frequency segment: {n.name} is not a global mean over space")
            seg.exit_mean = math.prod(ins[0][1:])
            continue
        if len(out) != nd + 1:
            fail(f"frequency segment: {n.name} ({op.describe()}) is not a spatial tensor of the segment's rank")
        if isinstance(op, Activation):
            if out != ins[0]:
                fail(f"frequency segment: activation {n.name} changes the shape")
            step[n.name] = step[n.inputs[0]]
            seg.acts.append((n, relaxed_slopes(op, padded=True), expr[n.inputs[0]]))
            seg.states.append(n.name)
            expr[n.name] = [Path(n.name, None, torch.ones(out[0], dtype=torch.float64), None)]
        elif isinstance(op, Conv):
            src = expr[n.inputs[0]]
            if any(p.conv is not None for p in src):
                fail(f"frequency segment: {n.name} follows another convolution without an activation between them")
            step[n.name] = tuple(a * s for a, s in zip(step[n.inputs[0]], op.stride))
            expr[n.name] = [Path(p.state, n, p.pre, None, p.sign) for p in src]
        elif isinstance(op, Scale):
            if out != ins[0]:
                fail(f"frequency segment: scale {n.name} changes the shape")
            v = _channel_scale(op.scale, out)
            step[n.name] = step[n.inputs[0]]
            expr[n.name] = [Path(p.state, p.conv, p.pre * v if p.conv is None else p.pre,
                                 (v if p.post is None else p.post * v) if p.conv is not None else None, p.sign)
                            for p in expr[n.inputs[0]]]
        elif isinstance(op, Shift):
            if out != ins[0]:
                fail(f"frequency segment: shift {n.name} changes the shape")
            step[n.name] = step[n.inputs[0]]
            expr[n.name] = list(expr[n.inputs[0]])
        elif isinstance(op, (Add, Sub)) and len(n.inputs) == 2:
            if ins[0] != out or ins[1] != out or step[n.inputs[0]] != step[n.inputs[1]]:
                fail(f"frequency segment: {n.name} adds tensors of different shapes or resolutions")
            step[n.name] = step[n.inputs[0]]
            second = expr[n.inputs[1]]
            if isinstance(op, Sub):
                second = [Path(p.state, p.conv, p.pre, p.post, -p.sign) for p in second]
            expr[n.name] = expr[n.inputs[0]] + second
        else:
            fail(f"frequency segment: {n.name} ({op.describe()}) cannot be part of a frequency segment")
    coarse = tuple(max(s[i] for s in step.values()) for i in range(nd))
    for name, s in step.items():
        if any(c % a for c, a in zip(coarse, s)):
            fail(f"frequency segment: the resolution of {name} does not divide the coarsest one")
        seg.phase[name] = tuple(c // a for c, a in zip(coarse, s))
        spatial = tuple(graph.shape_of(name)[1:])
        seg.extent[name] = tuple(-(-n // p) for n, p in zip(spatial, seg.phase[name]))
    if seg.exit_mean is None:
        if exit_ not in expr:
            fail(f"frequency segment: no expression for the exit {exit_}")
        seg.exit_paths = expr[exit_]
    else:
        red = graph.node(exit_)
        if red.inputs[0] not in seg.states:
            # the lifted tensor must vanish off the real positions, which holds for states only
            # (a lifted convolution output does not), or the mean would count padded positions
            fail(f"frequency segment: the global mean {exit_} must read an activation output or the entry")
        seg.exit_paths = expr[red.inputs[0]]
        seg.phase[exit_] = seg.phase[red.inputs[0]]
        seg.extent[exit_] = seg.extent[red.inputs[0]]
    offset = 0
    for s in seg.states:
        seg.offset[s] = offset
        offset += seg.rows(s)
    seg.dim = offset
    seg.required_grid = _required_grid(seg)
    return seg


def _path_kernel(seg: FreqSegment, path: Path, target: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Coarse kernel (rows of ``target``, columns of ``path.state``, *taps) and its lowest tap offset."""
    p_in, p_out = seg.phase[path.state], seg.phase[target]
    pin, pout = math.prod(p_in), math.prod(p_out)
    nd = len(p_in)
    if path.conv is None:
        if p_in != p_out:
            fail("an identity path joins tensors of different resolutions")
        k = torch.diag(path.pre.repeat_interleave(pin)).reshape((len(path.pre) * pin,) * 2 + (1,) * nd)
        return path.sign * k, (0,) * nd
    op = path.conv.op
    try:
        k, lo = coarse_kernel(op.weight, op.groups, op.stride, op.pads, op.dilation, p_in, p_out)
    except ValueError as exc:
        fail(f"convolution {path.conv.name}: {exc}")
    view = (1, -1) + (1,) * nd
    k = k * path.pre.repeat_interleave(pin).reshape(view)
    if path.post is not None:
        k = k * path.post.repeat_interleave(pout).reshape((-1, 1) + (1,) * nd)
    return path.sign * k, lo


def _required_grid(seg: FreqSegment) -> tuple[int, ...]:
    """The smallest periodic grid on which no tap of a kept output wraps onto a real input."""
    nd = len(next(iter(seg.phase.values())))
    need = [max(max(e[i] for e in seg.extent.values()), 1) for i in range(nd)]
    targets = [(a.inputs[0], paths) for a, _, paths in seg.acts] + [(seg.exit, seg.exit_paths)]
    for target, paths in targets:
        for p in paths:
            k, lo = _path_kernel(seg, p, target)
            for i in range(nd):
                hi = lo[i] + k.shape[2 + i] - 1
                need[i] = max(need[i], seg.extent[p.state][i] + max(0, -lo[i]), seg.extent[target][i] + max(0, hi))
    return tuple(need)


def half_grid(grid: tuple[int, ...]) -> torch.Tensor:
    """(F, d) integer frequencies: all of the grid but the last axis, which runs over 0..N//2."""
    axes = [torch.arange(n) for n in grid[:-1]] + [torch.arange(grid[-1] // 2 + 1)]
    return torch.cartesian_prod(*axes).reshape(-1, len(grid))


def _phasors(freqs: torch.Tensor, grid, lo, taps) -> torch.Tensor:
    """(F, *taps) complex: prod_i exp(-2 pi i w_i (lo_i + a_i) / N_i), angles reduced mod N in integers."""
    out = None
    for i, n in enumerate(grid):
        a = torch.arange(taps[i]) + lo[i]
        angle = (-2.0 * math.pi / n) * ((freqs[:, i:i + 1] * a[None, :]) % n).to(torch.float64)
        ph = torch.polar(torch.ones_like(angle), angle)
        shape = (len(freqs),) + (1,) * i + (taps[i],) + (1,) * (len(grid) - i - 1)
        ph = ph.reshape(shape)
        out = ph if out is None else out * ph
    return out


@dataclass
class FreqTerms:
    """Per target tensor: list of (state, kernel, lo, |kernel| tap sum, number of taps)."""

    terms: dict[str, list[tuple[str, torch.Tensor, tuple[int, ...], torch.Tensor, int]]]


def freq_terms(seg: FreqSegment) -> FreqTerms:
    out: dict[str, list] = {}
    targets = [(a.inputs[0], paths) for a, _, paths in seg.acts] + [(seg.exit, seg.exit_paths)]
    for target, paths in targets:
        lst = out.setdefault(target, [])
        if lst:  # the same tensor feeds two things (e.g. exit = an activation's input)
            continue
        for p in paths:
            k, lo = _path_kernel(seg, p, target)
            nd = len(lo)
            absum = k.abs().sum(tuple(range(2, 2 + nd)))
            lst.append((p.state, k, lo, absum, math.prod(k.shape[2:])))
    return FreqTerms(out)


def _target_rows(seg: FreqSegment, terms: FreqTerms, target: str, freqs: torch.Tensor, grid) -> torch.Tensor:
    """(F, rows(target), dim) complex: the map from the block's coordinates to the target at each frequency."""
    rows = seg.graph.shape_of(target)[0] * math.prod(seg.phase[target])
    out = torch.zeros((len(freqs), rows, seg.dim), dtype=torch.complex128)
    for state, k, lo, _, _ in terms.terms[target]:
        nd = len(lo)
        ph = _phasors(freqs, grid, lo, tuple(k.shape[2:]))  # (F, *taps)
        sym = torch.einsum("oc" + "xyzw"[:nd] + ",f" + "xyzw"[:nd] + "->foc", k.to(torch.complex128), ph)
        o = seg.offset[state]
        out[:, :, o:o + k.shape[1]] += sym
    return out


def _row_abs(terms: FreqTerms, target: str) -> torch.Tensor:
    """(rows,) bound on the 2-norm of each row of the target map at any frequency (triangle inequality)."""
    total = None
    for _, _, _, absum, _ in terms.terms[target]:
        r = (absum ** 2).sum(1).sqrt()
        total = r if total is None else total + r
    return total


def _target_delta(terms: FreqTerms, target: str) -> torch.Tensor:
    """(rows,) bound on the 2-norm error of each computed row of ``_target_rows`` (any frequency):
    per term, every entry is a sum of n_taps products of a kernel entry (itself a product of up to
    three stored numbers) and a phasor (each angle 2 pi k / N accurate to a few ulps, times one
    ulp for cos/sin, per dimension); terms landing on the same entries add one rounding each."""
    err = None
    for _, _, lo, absum, n_taps in terms.terms[target]:
        g = SAFETY * gamma(n_taps + 24 * len(lo) + 12, True)
        e = g * (absum ** 2).sum(1).sqrt()
        err = e if err is None else err + e
    n_terms = len(terms.terms[target])
    return err + SAFETY * gamma(n_terms + 1, True) * _row_abs(terms, target)


def freq_pair_form(seg: FreqSegment, grid: tuple[int, ...]) -> tuple[PairForm, FreqTerms]:
    """The static column layout of a frequency segment's LMI and the kernels behind it."""
    if len(grid) != len(seg.required_grid) or any(g < r for g, r in zip(grid, seg.required_grid)):
        fail(f"frequency segment {seg.entry} -> {seg.exit}: grid {tuple(grid)} is smaller than the "
             f"no-wrap grid {seg.required_grid}")
    terms = freq_terms(seg)
    form = PairForm(seg.dim)
    deltas = []
    for node, (a, b), _ in seg.acts:
        G = sector_matrix(a, b)
        p = math.prod(seg.phase[node.name])
        d_rows = _target_delta(terms, node.inputs[0])
        for c in range(seg.graph.shape_of(node.name)[0]):
            for r in range(p):
                form.add(("t", node.name, c), 2, G)
                deltas += [float(d_rows[c * p + r]), 0.0]
    for c in range(seg.graph.shape_of(seg.entry)[0]):
        for _ in range(math.prod(seg.phase[seg.entry])):
            form.add(("in", c), 1, ((1.0,),))
            deltas.append(0.0)
    d_exit = _target_delta(terms, seg.exit)
    p_exit = math.prod(seg.phase[seg.exit])
    if seg.exit_mean is not None:
        # the column is scale * (sum of the channel's phase rows): add the sum's and scaling's rounding
        scale = math.sqrt(math.prod(grid)) / seg.exit_mean
        absrow = _row_abs(terms, seg.exit)
    for c in range(seg.graph.shape_of(seg.exit)[0]):
        rows = slice(c * p_exit, (c + 1) * p_exit)
        if seg.exit_mean is None:
            for r in range(p_exit):
                form.add(("out", c), 1, ((-1.0,),))
                deltas.append(float(d_exit[c * p_exit + r]))
        else:
            form.add(("out", c), 1, ((-1.0,),))
            deltas.append(scale * (float(d_exit[rows].sum()) + SAFETY * gamma(p_exit + 6, True)
                                   * float(absrow[rows].sum())))
    form.col_delta = torch.tensor(deltas, dtype=torch.float64)
    return form, terms


def freq_columns(seg: FreqSegment, terms: FreqTerms, form: PairForm, freqs: torch.Tensor, grid) -> torch.Tensor:
    """(F, dim, R) complex: the columns U at the given frequencies (same order as ``form.groups``)."""
    F = len(freqs)
    U = torch.zeros((F, seg.dim, form.n_cols), dtype=torch.complex128)
    col = 0
    for node, _, _ in seg.acts:
        pre = _target_rows(seg, terms, node.inputs[0], freqs, grid)  # (F, rows, dim)
        rows = pre.shape[1]
        o = seg.offset[node.name]
        a_cols = torch.arange(col, col + 2 * rows, 2)
        U[:, :, a_cols] = pre.conj().transpose(1, 2)
        U[:, o + torch.arange(rows), a_cols + 1] = 1.0
        col += 2 * rows
    n_in = seg.rows(seg.entry)
    U[:, seg.offset[seg.entry] + torch.arange(n_in), col + torch.arange(n_in)] = 1.0
    col += n_in
    ex = _target_rows(seg, terms, seg.exit, freqs, grid)
    if seg.exit_mean is None:
        U[:, :, col:col + ex.shape[1]] = ex.conj().transpose(1, 2)
    else:
        p_exit = math.prod(seg.phase[seg.exit])
        channels = ex.shape[1] // p_exit
        summed = ex.reshape(F, channels, p_exit, seg.dim).sum(2)
        scale = math.sqrt(math.prod(grid)) / seg.exit_mean
        dc = (freqs == 0).all(1)
        U[dc, :, col:col + channels] = (scale * summed[dc]).conj().transpose(1, 2)
    return U


# ----------------------------------------------------------------------------------------------
# Dense segments (unrolled)
# ----------------------------------------------------------------------------------------------


def _abs_op(op):
    """The same op with entrywise absolute weights (for rounding bounds), or the op if nonnegative."""
    if isinstance(op, Dense):
        return Dense(op.weight.abs())
    if isinstance(op, Conv):
        return Conv(op.weight.abs(), None, op.stride, op.pads, op.dilation, op.groups)
    if isinstance(op, Scale):
        return Scale(op.scale.abs())
    return op


def _unroll(op, m: torch.Tensor, in_shape, out_numel: int) -> torch.Tensor:
    """op applied to every column of m (numel(in) x k): (numel(out) x k)."""
    k = m.shape[1]
    with torch.no_grad():
        y = op.apply(m.T.reshape((k,) + tuple(in_shape)))
    return y.reshape(k, out_numel).T


@dataclass
class DenseSegment:
    graph: Graph
    entry: str
    exit: str
    nodes: list[Node]
    states: list[str] = field(default_factory=list)
    offset: dict[str, int] = field(default_factory=dict)
    acts: list[tuple[Node, tuple[float, float]]] = field(default_factory=list)
    # per tensor: {state: (M, |M| bound, inner)}
    expr: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, int]]] = field(default_factory=dict)
    dim: int = 0


def dense_size(graph: Graph, entry: str, nodes: list[Node]) -> int:
    """Coordinates of a dense segment's LMI: the entry and every activation output."""
    return math.prod(graph.shape_of(entry)) + sum(math.prod(n.out_shape) for n in nodes
                                                   if isinstance(n.op, Activation))


def dense_segment(graph: Graph, entry: str, exit_: str, max_dim: int = DENSE_MAX_DIM) -> DenseSegment:
    nodes = segment_nodes(graph, entry, exit_)
    seg = DenseSegment(graph, entry, exit_, nodes)
    numel = lambda name: math.prod(graph.shape_of(name))  # noqa: E731
    size = dense_size(graph, entry, nodes)
    if size > max_dim:
        fail(f"dense segment {entry} -> {exit_}: {size} coordinates exceed the limit {max_dim}")
    eye = lambda k: torch.eye(k, dtype=torch.float64)  # noqa: E731
    seg.expr[entry] = {entry: (eye(numel(entry)), eye(numel(entry)), 1)}
    seg.states.append(entry)
    for n in nodes:
        op, out = n.op, tuple(n.out_shape)
        if isinstance(op, Activation):
            if out != tuple(graph.in_shape(n)):
                fail(f"dense segment: activation {n.name} changes the shape")
            seg.acts.append((n, relaxed_slopes(op, padded=False)))
            seg.states.append(n.name)
            seg.expr[n.name] = {n.name: (eye(numel(n.name)), eye(numel(n.name)), 1)}
        elif isinstance(op, Shift):
            if out != tuple(graph.in_shape(n)):
                fail(f"dense segment: shift {n.name} changes the shape")
            seg.expr[n.name] = seg.expr[n.inputs[0]]
        elif isinstance(op, DENSE_LINEAR):
            in_shape = tuple(graph.in_shape(n))
            absop = _abs_op(op)
            seg.expr[n.name] = {s: (_unroll(op, m, in_shape, numel(n.name)), _unroll(absop, a, in_shape, numel(n.name)),
                                    inner + numel(n.inputs[0]))
                                for s, (m, a, inner) in seg.expr[n.inputs[0]].items()}
        elif isinstance(op, (Add, Sub)) and len(n.inputs) == 2:
            if any(tuple(graph.shape_of(i)) != out for i in n.inputs):
                fail(f"dense segment: {n.name} broadcasts")
            sign = -1.0 if isinstance(op, Sub) else 1.0
            merged = dict(seg.expr[n.inputs[0]])
            for s, (m, a, inner) in seg.expr[n.inputs[1]].items():
                if s in merged:
                    m0, a0, i0 = merged[s]
                    merged[s] = (m0 + sign * m, a0 + a, max(i0, inner) + 1)
                else:
                    merged[s] = (sign * m, a, inner)
            seg.expr[n.name] = merged
        else:
            fail(f"dense segment: {n.name} ({op.describe()}) cannot be part of a dense segment")
    if exit_ not in seg.expr:
        fail(f"dense segment: no expression for the exit {exit_}")
    offset = 0
    for s in seg.states:
        seg.offset[s] = offset
        offset += numel(s)
    seg.dim = offset
    return seg


def _dense_rows(seg: DenseSegment, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, dim) map from the block's coordinates to ``target``, and a per-row 2-norm error bound."""
    rows = math.prod(seg.graph.shape_of(target))
    out = torch.zeros((rows, seg.dim), dtype=torch.float64)
    err2 = torch.zeros(rows, dtype=torch.float64)
    for s, (m, a, inner) in seg.expr[target].items():
        o = seg.offset[s]
        out[:, o:o + m.shape[1]] = m
        err2 = err2 + ((SAFETY * gamma(inner + 4) * a) ** 2).sum(1)
    return out, err2.sqrt()


def dense_pair_form(seg: DenseSegment, granularity: dict[str, str]) -> tuple[PairForm, torch.Tensor]:
    """Static columns of a dense segment (real, one "frequency"): (form, U of shape (1, dim, R)).
    ``granularity[act]`` is "neuron" (one multiplier per entry) or "channel" (per axis-0 index)."""
    form = PairForm(seg.dim)
    cols, deltas = [], []
    for node, (a, b) in seg.acts:
        G = sector_matrix(a, b)
        pre, d = _dense_rows(seg, node.inputs[0])
        shape = seg.graph.shape_of(node.name)
        per = math.prod(shape) // shape[0]
        mode = granularity.get(node.name, "neuron")
        if mode not in ("neuron", "channel"):
            fail(f"dense segment: unknown multiplier granularity {mode!r}")
        o = seg.offset[node.name]
        for j in range(pre.shape[0]):
            form.add(("t", node.name, j if mode == "neuron" else j // per), 2, G)
            unit = torch.zeros(seg.dim, dtype=torch.float64)
            unit[o + j] = 1.0
            cols += [pre[j], unit]
            deltas += [float(d[j]), 0.0]
    shape_in = seg.graph.shape_of(seg.entry)
    per_in = math.prod(shape_in) // shape_in[0]
    for j in range(math.prod(shape_in)):
        form.add(("in", j // per_in), 1, ((1.0,),))
        unit = torch.zeros(seg.dim, dtype=torch.float64)
        unit[seg.offset[seg.entry] + j] = 1.0
        cols.append(unit)
        deltas.append(0.0)
    ex, d = _dense_rows(seg, seg.exit)
    shape_out = seg.graph.shape_of(seg.exit)
    per_out = math.prod(shape_out) // shape_out[0]
    for j in range(ex.shape[0]):
        form.add(("out", j // per_out), 1, ((-1.0,),))
        cols.append(ex[j])
        deltas.append(float(d[j]))
    form.col_delta = torch.tensor(deltas, dtype=torch.float64)
    U = torch.stack(cols, 1)[None] if cols else torch.zeros((1, seg.dim, 0), dtype=torch.float64)
    return form, U


# ----------------------------------------------------------------------------------------------
# Assembly with rounding bounds
# ----------------------------------------------------------------------------------------------


def group_arrays(form: PairForm, values: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column a: (partner index, Gamma[a, a], Gamma[a, partner], |multiplier|) with
    Gamma = blkdiag(x_g G_g). ``values[key]`` is the multiplier of each group key."""
    R = form.n_cols
    partner = torch.arange(R)
    g_self = torch.zeros(R, dtype=torch.float64)
    g_pair = torch.zeros(R, dtype=torch.float64)
    for grp in form.groups:
        x = values[grp.key]
        for i, a in enumerate(grp.cols):
            g_self[a] = x * grp.G[i][i]
            if len(grp.cols) == 2:
                partner[a] = grp.cols[1 - i]
                g_pair[a] = x * grp.G[i][1 - i]
    return partner, g_self, g_pair, g_self.abs() + g_pair.abs()


def assemble(U: torch.Tensor, partner, g_self, g_pair) -> torch.Tensor:
    """A = U Gamma U^H for the columns' group coefficients (batched over frequencies)."""
    V = U * g_self.to(U.dtype) + U[..., partner] * g_pair.to(U.dtype)
    return V @ U.mH


def assembly_error(U: torch.Tensor, form: PairForm, partner, g_self, g_pair, g_abs) -> torch.Tensor:
    """Per matrix, a bound on ||A_computed - A_exact||_2 (see docs/conv-lipsdp.md, "rounding"):
    the product V U^H, forming V, the columns' own errors (col_delta) and the rounding of G."""
    cplx = U.is_complex()
    norms = torch.linalg.vector_norm(U, dim=-2)  # (F, R)
    delta = form.col_delta.to(norms.dtype)
    # ||V_a|| <= |g_self| ||U_a|| + |g_pair| ||U_partner||
    v_norm = g_self.abs() * norms + g_pair.abs() * norms[..., partner]
    R = U.shape[-1]
    err = gamma(R + 2, cplx) * torch.sqrt((v_norm ** 2).sum(-1) * (norms ** 2).sum(-1))
    err = err + gamma(3, cplx) * (g_abs * norms * (norms + norms[..., partner])).sum(-1)
    # exact columns differ by delta: ||x G|| (2 ||U_g|| d_g + d_g^2) per group, with ||x G|| <= sum |Gamma|
    err = err + (g_abs * (2 * (norms + delta) * delta + delta * delta)).sum(-1)
    err = err + (g_abs * (norms + delta) * (norms + delta)).sum(-1) * 4 * EPS  # G's own rounding
    return SAFETY * err


def group_values(form: PairForm, mults: dict, w_in: torch.Tensor, w_out: torch.Tensor) -> dict:
    """Map each group key to its multiplier from the claimed vectors."""
    values = {}
    for grp in form.groups:
        kind = grp.key[0]
        if kind == "t":
            values[grp.key] = float(mults[grp.key[1]][grp.key[2]])
        elif kind == "in":
            values[grp.key] = float(w_in[grp.key[1]])
        else:
            values[grp.key] = float(w_out[grp.key[1]])
    return values
