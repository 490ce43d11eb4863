"""One *run* of consecutive LMI / tied segments of ``lipsdp-graph``: variables, start, solve, certify.

A run from tensor a to tensor b claims  sum_c s_b[c]^2 |dy_c|^2 <= mu sum_c s_a[c]^2 |dx_c|^2  with
the per-channel shapes s_a, s_b fixed (the identity at the network's input and output, layerwise's
scalings next to a layerwise stage) and mu minimized; boundaries inside the run carry free weights
per channel (a tied segment passes its input weights on, divided by its factor squared). The
solver (``sdp_barrier.solve_pd``) returns candidates; the trusted checker
(``lipverify.verifier.lipsdp_graph.check_segments``) decides what is certified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lipverify.bounds.sdp_barrier import Family, solve_pd
from lipverify.bounds.sdp_plan import SegmentPlan
from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph
from lipverify.verifier.lipsdp_graph import check_segments
from lipverify.verifier.sdp_graph import (assemble, dense_pair_form, freq_columns, freq_pair_form, group_arrays,
                                          group_values, half_grid)

SOLVER_CHUNK = 2_000_000  # complex entries of U per cached chunk
TIED_SLACK = 1 + 1e-12  # tied factors are rounded up once more so that the checker's rounding passes
BACKOFF = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)
OPT_MAX_FREQS = 32  # frequency segments are optimized on a sub-grid of about this many frequencies first
ADD_FREQS = 16  # frequencies added per cutting-plane round
CUT_ROUNDS = 6
GOOD_BACKOFF = 1e-5  # a certificate this close to the optimum ends the cutting-plane rounds


@dataclass
class Variables:
    count: int = 1  # variable 0 is mu (the run's objective)
    boundary: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # per channel (var | -1, coef)
    mults: dict[str, list[int]] = field(default_factory=dict)  # activation -> variable per multiplier

    def fresh(self, k: int) -> list[int]:
        out = list(range(self.count, self.count + k))
        self.count += k
        return out


def make_variables(graph: Graph, plans: list[SegmentPlan], entry_shape: list[float],
                   exit_weights: list[float]) -> Variables:
    """Entry weights mu * entry_shape, exit weights constant; free weights in between."""
    v = Variables()
    channels = lambda name: graph.shape_of(name)[0]  # noqa: E731
    last_lmi = max(k for k, p in enumerate(plans) if p.is_lmi)
    first, last = plans[0].entry, plans[-1].exit
    v.boundary[last] = [(-1, float(w)) for w in exit_weights]
    for p in reversed(plans[last_lmi + 1:]):  # constants behind the last LMI: times f^2 backwards
        f2 = (p.factor * TIED_SLACK) ** 2
        v.boundary[p.entry] = [(-1, coef * f2) for _, coef in v.boundary[p.exit]]
    v.boundary[first] = [(0, float(s)) for s in entry_shape]
    for k, p in enumerate(plans[:last_lmi + 1]):
        if p.kind == "tied":
            f2 = (p.factor * TIED_SLACK) ** 2
            v.boundary[p.exit] = [(var, coef / f2) for var, coef in v.boundary[p.entry]]
        elif k < last_lmi:
            v.boundary[p.exit] = [(var, 1.0) for var in v.fresh(channels(p.exit))]
        if p.is_lmi:
            for node, *_ in p.structure.acts:
                per_channel = p.kind == "freq" or p.granularity == "channel"
                v.mults[node.name] = v.fresh(channels(node.name) if per_channel else
                                             math.prod(graph.shape_of(node.name)))
    return v


def _family(form, U_chunks, plan: SegmentPlan, variables: Variables) -> Family:
    R = form.n_cols
    partner = torch.arange(R)
    g_self = torch.zeros(R, dtype=torch.float64)
    g_pair = torch.zeros(R, dtype=torch.float64)
    var = torch.full((R,), -1, dtype=torch.long)
    for grp in form.groups:
        kind = grp.key[0]
        if kind == "t":
            v, coef = variables.mults[grp.key[1]][grp.key[2]], 1.0
        else:
            v, coef = variables.boundary[plan.entry if kind == "in" else plan.exit][grp.key[1]]
        for i, a in enumerate(grp.cols):
            g_self[a] = coef * grp.G[i][i]
            var[a] = v
            if len(grp.cols) == 2:
                partner[a] = grp.cols[1 - i]
                g_pair[a] = coef * grp.G[i][1 - i]
    return Family(list(U_chunks), partner, g_self, g_pair, var)


def freq_subset(grid: tuple[int, ...], max_count: int) -> torch.Tensor:
    """Half-grid frequencies on a coarser sub-grid (every k-th per axis, 0 included), k the smallest
    stride that leaves at most ``max_count`` of them: where the optimization starts."""
    freqs = half_grid(tuple(grid))
    k = 1
    while True:
        keep = freqs[(freqs % k == 0).all(1)]
        if len(keep) <= max_count or k > max(grid):
            return keep
        k += 1


def _chunks(seg, terms, form, freqs):
    per = max(1, SOLVER_CHUNK // max(1, seg.dim * form.n_cols))
    for start in range(0, len(freqs), per):
        yield freq_columns(seg, terms, form, freqs[start:start + per], seg.required_grid)


def build_families(plans: list[SegmentPlan], variables: Variables, freqs: dict[str, torch.Tensor]) -> list[Family]:
    """One family per LMI segment; ``freqs[entry]``: the frequencies a frequency segment is solved on."""
    families = []
    for p in plans:
        if p.kind == "freq":
            form, terms = freq_pair_form(p.structure, p.structure.required_grid)
            chunks = list(_chunks(p.structure, terms, form, freqs[p.entry]))
        elif p.kind == "dense":
            form, U = dense_pair_form(p.structure, p.granularity_map())
            chunks = [U]
        else:
            continue
        families.append(_family(form, chunks, p, variables))
    return families


def worst_frequencies(plan: SegmentPlan, segment: dict, w_in, w_out, count: int) -> torch.Tensor:
    """The ``count`` frequencies of a frequency segment with the most negative lambda_min at the
    candidate (plain eigenvalues: this only chooses where to tighten; the checker certifies)."""
    seg = plan.structure
    form, terms = freq_pair_form(seg, seg.required_grid)
    mults = {k: torch.tensor(v, dtype=torch.float64) for k, v in segment["t"].items()}
    partner, gs, gp, _ = group_arrays(form, group_values(form, mults, torch.tensor(w_in, dtype=torch.float64),
                                                         torch.tensor(w_out, dtype=torch.float64)))
    freqs = half_grid(seg.required_grid)
    lams = []
    for U in _chunks(seg, terms, form, freqs):
        A = assemble(U, partner, gs, gp)
        lams.append(torch.linalg.eigvalsh((A + A.mH) / 2)[..., 0] / torch.diagonal(A, dim1=-2, dim2=-1).real.abs().amax(-1).clamp_min(1e-300))
    lam = torch.cat(lams)
    order = torch.argsort(lam)[:count]
    return freqs[order[lam[order] < 1e-9]]


# ----------------------------------------------------------------------------------------------
# A strictly feasible start
# ----------------------------------------------------------------------------------------------


def _state_coords(plan: SegmentPlan, graph: Graph) -> list[torch.Tensor]:
    seg = plan.structure
    out = []
    for name in seg.states:
        rows = seg.rows(name) if plan.kind == "freq" else math.prod(graph.shape_of(name))
        out.append(torch.arange(seg.offset[name], seg.offset[name] + rows))
    return out


def _min_schur_eig(A: torch.Tensor, block: torch.Tensor, trailing: torch.Tensor) -> float:
    """min over the batch of lambda_min(A_bb - A_bt A_tt^{-1} A_tb)."""
    Abb = A[:, block][:, :, block]
    if len(trailing):
        L = torch.linalg.cholesky(A[:, trailing][:, :, trailing])
        Y = torch.linalg.solve_triangular(L, A[:, block][:, :, trailing].mH, upper=False)
        Abb = Abb - Y.mH @ Y
    return float(torch.linalg.eigvalsh((Abb + Abb.mH) / 2)[..., 0].min())


def _assemble(U, gs, gp, partner):
    V = U * gs.to(U.dtype) + U[..., partner] * gp.to(U.dtype)
    A = V @ U.mH
    return (A + A.mH) / 2


def initial_point(graph: Graph, plans: list[SegmentPlan], variables: Variables, families: list[Family]) -> torch.Tensor:
    """Backward elimination: from the run's exit back to its entry, give each activation a uniform
    multiplier making its state's Schur complement positive definite (the trailing states already
    are), then the entry weight likewise: a strictly feasible point for every matrix (the
    generalization of lipsdp_core's start to any graph of states)."""
    x = torch.zeros(variables.count, dtype=torch.float64)
    last = plans[-1].exit
    numeric = {last: [coef for _, coef in variables.boundary[last]]}
    fam_iter = iter(reversed(families))
    for p in reversed(plans):
        if p.kind == "tied":
            f2 = (p.factor * TIED_SLACK) ** 2
            numeric[p.entry] = [w * f2 for w in numeric[p.exit]]
            continue
        fam = next(fam_iter)
        for (var, coef), w in zip(variables.boundary[p.exit], numeric[p.exit]):
            if var >= 0:
                x[var] = w / coef
        coords = _state_coords(p, graph)
        states = p.structure.states
        for k in range(len(coords) - 1, -1, -1):
            trailing = torch.cat(coords[k + 1:]) if k + 1 < len(coords) else coords[k][:0]
            if k > 0:
                x[variables.mults[states[k]]] = 0.0
            else:
                for var, _ in variables.boundary[p.entry]:
                    if var >= 0:
                        x[var] = 0.0
            lam, scale = math.inf, 0.0
            gs, gp = fam.coeffs(x)
            for U in fam.chunks:
                A = _assemble(U, gs, gp, fam.partner)
                lam = min(lam, _min_schur_eig(A, coords[k], trailing))
                scale = max(scale, float(torch.diagonal(A, dim1=-2, dim2=-1).real.abs().max()))
            need = max(-lam, 0.0) * 1.5 + 1e-3 * max(scale, abs(lam), 1e-12)
            if k > 0:  # the state's own term adds 2 t I on its block
                x[variables.mults[states[k]]] = need / 2.0
            else:  # entry weights w * coef with w = need / min coef
                coefs = [coef for _, coef in variables.boundary[p.entry]]
                numeric[p.entry] = [need * c / min(coefs) for c in coefs]
    first = next(p for p in plans if p.is_lmi)
    x[0] = max(w / coef for (_, coef), w in zip(variables.boundary[first.entry], numeric[first.entry]))
    return x


# ----------------------------------------------------------------------------------------------
# Solve and certify
# ----------------------------------------------------------------------------------------------


def segments_at(plans: list[SegmentPlan], variables: Variables, x: torch.Tensor) -> tuple[list, dict]:
    """The witness entries (segments, boundary weights) of a run at the point x."""
    xs = x.tolist()
    segments = []
    for p in plans:
        entry = {"kind": p.kind, "entry": p.entry, "exit": p.exit}
        if p.kind == "tied":
            entry["factor"] = p.factor
        else:
            entry["t"] = {node.name: [max(xs[v], 0.0) for v in variables.mults[node.name]]
                          for node, *_ in p.structure.acts}
            if p.kind == "freq":
                entry["grid"] = list(p.structure.required_grid)
            else:
                entry["granularity"] = p.granularity_map()
        segments.append(entry)
    weights = {b: [max(coef * (xs[v] if v >= 0 else 1.0), 0.0) for v, coef in e]
               for b, e in variables.boundary.items()}
    return segments, weights


@dataclass
class RunResult:
    segments: list
    weights: dict
    factor: float  # certified: sum s_b^2 |dy|^2 <= factor^2 * (entry weights' sum)
    info: dict


def solve_run(graph: Graph, plans: list[SegmentPlan], entry_shape: list[float], exit_weights: list[float],
              tol: float = 1e-8, max_freqs: int = OPT_MAX_FREQS, rounds: int = CUT_ROUNDS) -> RunResult:
    """Minimize mu for the run; certify the first back-off point that the checker accepts.

    Frequency segments with more than ``max_freqs`` frequencies are optimized on a sub-grid; where
    the candidate fails, the ``ADD_FREQS`` worst frequencies join and the run is solved again
    (at most ``rounds`` times). The certificate always covers every frequency."""
    variables = make_variables(graph, plans, entry_shape, exit_weights)
    freqs = {p.entry: freq_subset(p.structure.required_grid, max_freqs) for p in plans if p.kind == "freq"}
    info = {"iterations": 0, "rounds": 0}
    best = None
    for round_ in range(rounds + 1):
        families = build_families(plans, variables, freqs)
        x0 = initial_point(graph, plans, variables, families)
        result = solve_pd(families, variables.count, 0, x0, tol=tol)
        info["iterations"] += result.info["iterations"]
        info["rounds"] = round_ + 1
        info["frequencies"] = {k: len(v) for k, v in freqs.items()}
        cert = _certify(graph, plans, variables, result, x0, entry_shape, info)
        if cert is not None and (best is None or cert.factor < best.factor):
            best = cert
        if cert is not None and cert.info["backoff"] <= GOOD_BACKOFF:
            break
        if not _add_worst(plans, variables, result.x, freqs):
            break
    if best is None:
        raise SoundnessError("lipsdp-graph: no point of the solver's path passed the certificate check")
    return best


def _certify(graph, plans, variables, result, x0, entry_shape, info) -> RunResult | None:
    """The first point (1 - theta) x_last + theta x_anchor (theta in BACKOFF) the checker accepts:
    the last iterate sits on the boundary of the binding matrices, and the LMIs are affine in x,
    so mixing in the first (well-centred) iterate buys a margin above the checker's rounding bounds."""
    anchor = _anchor(result, x0)
    for theta in BACKOFF:
        x = (1.0 - theta) * result.x + theta * anchor
        segments, weights = segments_at(plans, variables, x)
        try:
            check_segments(graph, segments, weights)
        except SoundnessError:
            continue
        mu = max(w / s for w, s in zip(weights[plans[0].entry], entry_shape))
        return RunResult(segments, weights, math.sqrt(mu), dict(info, backoff=theta))
    return None


def _anchor(result, x0) -> torch.Tensor:
    """A well-centred iterate close to the optimum: the first with objective within 1e-3 of the last."""
    last = float(result.x[0])
    for x in result.history:
        if float(x[0]) <= last * (1 + 1e-3):
            return x
    return result.history[0] if result.history else x0


def _add_worst(plans, variables, x, freqs) -> bool:
    """Cutting planes: add the frequencies where x fails most; False when nothing new was added."""
    segments, weights = segments_at(plans, variables, x)
    grew = False
    for p, seg_w in zip(plans, segments):
        if p.kind != "freq":
            continue
        grid = p.structure.required_grid
        if len(freqs[p.entry]) >= math.prod(grid[:-1]) * (grid[-1] // 2 + 1):
            continue
        extra = worst_frequencies(p, seg_w, weights[p.entry], weights[p.exit], ADD_FREQS)
        known = {tuple(f) for f in freqs[p.entry].tolist()}
        new = [f for f in extra.tolist() if tuple(f) not in known]
        if new:
            freqs[p.entry] = torch.cat([freqs[p.entry], torch.tensor(new, dtype=torch.long)])
            grew = True
    return grew
