"""The lower-bound engine: search with any proposal generator, report only what the file computes.

Every reported value is a difference quotient of the user's file,

    q(x, y) = (||f32(x) - f32(y)|| - t(x) - t(y)) / ||x - y||,

with f32 the file's outputs (float32 inputs, outputs converted to float64 before differencing), t a
bound on their float32 rounding (``rounding.py``), and the pair (x, y) stored in the certificate. So q
is a lower bound on the Lipschitz constant of the exact function the certificate is about, whatever
the search did, and a q above a certified bound is a real soundness failure (exit 3).

The search (all of it deterministic: the work is a function of the model's size and the options):
1. random pairs at many scales, measured on the file directly;
2. a pool of points screened by power iteration on J^T J of the extracted graph (float64 autodiff);
3. multi-start gradient ascent of the pair quotient on the graph from the best of them and from data;
4. restarts around the best points (nearby activation patterns), screened and ascended again;
5. the same ascent on the user's torch module (float64 copy) when the source is torch;
6. every proposal measured on the file as pairs along its direction over a ladder of widths, and
   pairs along the top singular directions at the best points;
7. gradient-free refinement of the best pairs on the file itself (random perturbations of the
   midpoint, the direction and the width, kept when the file's quotient improves);
8. the best pairs recomputed one sample per call (batch size 1) and together (batch size 2).
"""

from __future__ import annotations

import base64
import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lipverify.attack.evaluate import Budget, BudgetExhausted, FileModel
from lipverify.graph.rounding import OutputTolerance
from lipverify.attack.search import STEP_SCALES, bshape, pair_ascent, top_singular, top_singular_block, unit
from lipverify.graph.ir import Graph

LADDER = (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)  # pair widths on the file, relative to |x|
SCALES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1000.0)  # random points: Gaussian at these multiples of the data scale
WORK = 2e10  # values computed at effort 1 (model_size x forward passes): seconds on a small model
SEARCH_THREADS = 1  # torch threads during the search: reductions split across threads round differently


@dataclass
class Plan:
    """How much work the search does: a function of the model's size, ``effort`` and ``starts`` only."""

    pool: int  # random points screened by power iteration on the graph
    starts: int  # gradient-ascent starts
    steps: int  # ascent steps per start
    power_iters: int
    restarts: int  # rounds of restarts around the best points
    random_pairs: int  # random pairs measured on the file
    candidates: int  # proposals measured on the file over the ladder of widths
    refine_rounds: int  # gradient-free rounds on the file
    refine_batch: int  # perturbations per round
    singular_k: int  # top singular directions tried at the best points
    chunk: int  # points per batched call of the graph (fixed: rounding must not depend on the count)

    @classmethod
    def for_model(cls, graph: Graph, effort: float = 1.0, starts: int | None = None) -> "Plan":
        """Counts from a work allowance of WORK / model_size forward passes: a small model gets the
        full search (64 starts of 150 steps), a large one fewer and shorter starts and fewer file
        evaluations (a ResNet-18 at 224x224: 4 starts of about 30 steps). ``effort`` multiplies every
        count except the steps per start; ``starts`` overrides the number of starts."""
        room = WORK / max(model_size(graph), 1)  # forward passes allowed at effort 1

        def clamp(v: float, lo: int, hi: int) -> int:
            return int(min(hi, max(lo, round(v))))

        base = starts if starts is not None else clamp(room / 2000, 4, 64)
        e = float(effort)

        def n(count: int, minimum: int = 1) -> int:
            return max(minimum, int(round(count * e)))

        return cls(pool=n(clamp(room / 40, 16, 16 * base)), starts=n(base), steps=clamp(room / (9 * base), 10, 150),
                   power_iters=8, restarts=2, random_pairs=n(clamp(room / 20, 16, min(4096, 100 * base))),
                   candidates=n(clamp(room / 200, 4, 2 * base)), refine_rounds=n(clamp(room / 400, 2, 24)),
                   refine_batch=16, singular_k=4, chunk=chunk_for(graph))

    def as_dict(self) -> dict:
        return dict(vars(self))


def chunk_for(graph: Graph) -> int:
    """Points per batched call: large batches for small models (per-call overhead dominates), about
    8M values per call for large ones; a power of two in [1, 256]."""
    chunk = 256
    while chunk > 1 and chunk * model_size(graph) > 8_000_000:
        chunk //= 2
    return chunk


def model_size(graph: Graph) -> int:
    """Values per sample: the input, every intermediate tensor and every weight (a cost proxy)."""
    values = math.prod(graph.input_shape) + sum(math.prod(n.out_shape) for n in graph.nodes)
    weights = sum(t.numel() for n in graph.nodes for t in vars(n.op).values() if isinstance(t, torch.Tensor))
    return int(values + weights)


@dataclass
class LowerBound:
    value: float  # the reported lower bound (0.0 when no pair rose above the rounding allowance)
    x: np.ndarray | None  # the pair, float32, exactly as the file was called
    y: np.ndarray | None
    evaluations: int  # calls of the file, counted per sample
    cut_by_budget: str | None  # the stage the user's --lower-budget-s cut, or None
    raw_quotient: float = 0.0  # ||f32(x) - f32(y)|| / ||x - y|| before the rounding allowance
    tolerance: tuple[float, float] = (0.0, 0.0)  # t(x), t(y)
    batch_size: int = 1  # how the reported pair was evaluated (1: one call per sample; 2: [x, y])
    found_by: str = ""
    seconds: float = 0.0
    plan: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)  # best quotient per stage, for the record
    stage_seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"value": self.value, "raw_quotient": self.raw_quotient, "tolerance": list(self.tolerance),
             "batch_size": self.batch_size, "found_by": self.found_by, "evaluations": self.evaluations,
             "cut_by_budget": self.cut_by_budget, "seconds": self.seconds, "plan": self.plan,
             "stages": self.stages, "stage_seconds": self.stage_seconds}
        if self.x is not None:
            d["pair"] = {"x": encode(self.x), "y": encode(self.y)}
        return d


def encode(a: np.ndarray) -> dict:
    """A float32 array as JSON, exactly (little-endian bytes in base64)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["base64"]), dtype="<f4").reshape(d["shape"]).copy()


class _Best:
    """The best pairs seen on the file (kept sorted; a few are recomputed at the end)."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self.items: list[tuple[float, np.ndarray, np.ndarray, str]] = []
        self.stages: dict[str, float] = {}

    def add(self, q: np.ndarray, x: np.ndarray, y: np.ndarray, stage: str) -> None:
        if not len(q):
            return
        q = np.nan_to_num(q, nan=-1.0, posinf=-1.0)
        self.stages[stage] = max(self.stages.get(stage, 0.0), float(q.max()))
        for i in np.argsort(-q, kind="stable")[: self.keep]:
            self.items.append((float(q[i]), x[i].copy(), y[i].copy(), stage))
        self.items.sort(key=lambda t: -t[0])
        del self.items[self.keep:]

    @property
    def value(self) -> float:
        return self.items[0][0] if self.items else 0.0


class _Search:
    def __init__(self, file: FileModel, tol: OutputTolerance, shape, gen: torch.Generator, rng: np.random.Generator):
        self.file, self.tol, self.shape, self.gen, self.rng = file, tol, tuple(shape), gen, rng
        self.best = _Best()
        self.track = None
        self.seconds: dict[str, float] = {}  # wall time per stage, for the record (never for decisions)
        self._current, self._since = None, time.perf_counter()

    def stage(self, label: str | None) -> None:
        """Start stage ``label`` (None: the end): note the time of the previous one, show progress."""
        now = time.perf_counter()
        if self._current is not None:
            self.seconds[self._current] = self.seconds.get(self._current, 0.0) + now - self._since
        self._current, self._since = label, now
        if label is not None and self.track is not None:
            for _ in self.track([label], f"lower bound: {label}", 1):
                pass

    def tick(self) -> None:
        """Raise BudgetExhausted when the user's time cap has run out (no-op without a cap)."""
        if self.file.budget is not None:
            self.file.budget.check(self._current or "search")

    def quotients(self, x: np.ndarray, y: np.ndarray, stage: str) -> np.ndarray:
        """The file's rounding-corrected quotients of pairs (x_i, y_i) (float64 in, float32 as evaluated)."""
        x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
        both = np.concatenate([x32, y32])
        out = self.file(both, stage)
        fx, fy = out.reshape(2, len(x32), -1)
        t = self.tol(both, out).reshape(2, len(x32))
        num = np.linalg.norm(fx - fy, axis=1) - t[0] - t[1]
        den = np.linalg.norm((x32.astype(np.float64) - y32.astype(np.float64)).reshape(len(x32), -1), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(den > 0, np.maximum(num, 0.0) / den, 0.0)
        self.best.add(q, x32, y32, stage)
        return q

    def ladder_pairs(self, mids: torch.Tensor, dirs: torch.Tensor, stage: str) -> np.ndarray:
        """Pairs (m - w v, m + w v) over the ladder of widths (w relative to the point's size): a
        ReLU net is linear only on a neighbourhood, and too narrow a pair measures rounding. Returns
        the best quotient per proposal."""
        mids, dirs = mids.numpy(), unit(dirs).numpy()
        size = 1.0 + np.linalg.norm(mids.reshape(len(mids), -1), axis=1) / math.sqrt(mids[0].size)
        best = np.zeros(len(mids))
        for h in LADDER:
            w = (h * size).reshape((-1,) + (1,) * (mids.ndim - 1))
            best = np.maximum(best, self.quotients(mids - w * dirs, mids + w * dirs, stage))
        return best


def _random_points(n: int, shape, scale: float, gen: torch.Generator, groups: bool = False):
    """Gaussian points at the SCALES (times the data scale) and uniform points in [0, 1]; with
    ``groups``, also which of those len(SCALES) + 1 families each point comes from."""
    table = torch.tensor(SCALES, dtype=torch.float64) * scale
    which = torch.randint(0, len(table) + 1, (n,), generator=gen)
    pick = table[which.clamp_max(len(table) - 1)].reshape((-1,) + (1,) * len(shape))
    gauss = torch.randn((n,) + tuple(shape), generator=gen, dtype=torch.float64) * pick
    uniform = torch.rand((n,) + tuple(shape), generator=gen, dtype=torch.float64)
    points = torch.where((which == len(table)).reshape(bshape(gauss)), uniform, gauss)
    return (points, which) if groups else points


def _best_per_group(score: torch.Tensor, group: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k points: the best of each group in turn, then the second best of each, ... (the
    landscape's best region can lie at any scale, and the top scores of one scale hide the others)."""
    score = torch.nan_to_num(score, nan=-1.0)
    ranked = []
    for g in torch.unique(group).tolist():
        members = torch.nonzero(group == g)[:, 0]
        ranked.append(members[torch.argsort(score[members], descending=True, stable=True)].tolist())
    picked = []
    for depth in range(max(len(r) for r in ranked)):
        picked += [r[depth] for r in ranked if depth < len(r)]
    return torch.tensor(picked[:k], dtype=torch.long)


def _torch_stand_in(module: torch.nn.Module | None, output: int | None):
    """The user's torch module in float64 (a second proposal generator; never reported)."""
    if module is None:
        return None
    try:
        net = copy.deepcopy(module).double().eval()
        for p in net.parameters():
            if p.is_leaf:  # (a cast TorchScript module's are not; gradients are taken w.r.t. x only)
                p.requires_grad_(False)
    except Exception:  # modules that cannot be copied or cast (some TorchScript): graph proposals only
        return None

    def fn(x):
        out = net(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out = out.reshape(len(x), -1)
        return out if output is None else out[:, output:output + 1]

    return fn


def lower_bound(loaded, graph: Graph, input_shape=None, *, output: int | None = None, seed: int = 0,
                effort: float = 1.0, starts: int | None = None, data: torch.Tensor | None = None,
                budget_s: float | None = None, track=None) -> LowerBound:
    """Best rounding-corrected difference quotient of the user's file (see the module docstring).

    ``graph`` is the extracted graph of what is bounded (its outputs are the file's outputs, or the
    single logit ``output``); it and the torch module only propose points. ``budget_s`` is the user's
    optional cap: when it cuts the search, ``cut_by_budget`` names the stage."""
    t0 = time.perf_counter()
    shape = tuple(input_shape or graph.input_shape)
    plan = Plan.for_model(graph, effort, starts)
    budget = Budget(budget_s)
    file = FileModel(loaded.reference, shape, output, budget=budget)
    search = _Search(file, OutputTolerance(graph), shape, torch.Generator().manual_seed(int(seed)),
                     np.random.default_rng(int(seed)))
    threads = torch.get_num_threads()
    torch.set_num_threads(SEARCH_THREADS)
    search.track = track
    try:
        _run(search, graph, loaded, output, plan, data)
    except BudgetExhausted:
        pass
    finally:
        torch.set_num_threads(threads)
        search.stage(None)
    result = _finish(search, budget)
    result.seconds = time.perf_counter() - t0
    result.plan = plan.as_dict()
    result.stage_seconds = dict(search.seconds)
    return result




def _run(s: _Search, graph: Graph, loaded, output, plan: Plan, data) -> None:
    gen, shape = s.gen, s.shape
    graph_fn = graph.forward
    scale = 1.0
    data_x = None
    if data is not None and len(data):
        data_x = torch.as_tensor(data, dtype=torch.float64).reshape((-1,) + shape)[: max(plan.starts, 1)]
        scale = float(data_x.std()) or 1.0

    # 1. random pairs on the file, at many scales and widths
    s.stage("random pairs on the file")
    x = _random_points(plan.random_pairs, shape, scale, gen)
    d = unit(torch.randn(x.shape, generator=gen, dtype=torch.float64))
    size = (1.0 + x.flatten(1).norm(dim=1) / math.sqrt(x[0].numel())).reshape(bshape(x))
    widths = torch.tensor([1e-3, 1e-2, 1e-1, 1.0], dtype=torch.float64)[
        torch.randint(0, 4, (len(x),), generator=gen)].reshape(bshape(x))
    s.quotients((x - widths * size * d).numpy(), (x + widths * size * d).numpy(), "random pairs (file)")

    # 2. screen a pool by power iteration on the graph; 3. ascend from the best and from data
    s.stage("screening points on the graph")
    pool, family = _random_points(plan.pool, shape, scale, gen, groups=True)
    sigma, v = top_singular(graph_fn, pool, plan.power_iters, gen, plan.chunk, s.tick)
    keep = _best_per_group(sigma, family, plan.starts)
    x0, v0 = pool[keep], v[keep]
    if data_x is not None:
        _, dv = top_singular(graph_fn, data_x, plan.power_iters, gen, plan.chunk, s.tick)
        x0, v0 = torch.cat([data_x, x0]), torch.cat([dv, v0])
    proposals = [(x0, v0)]
    s.stage("gradient ascent on the graph")
    xs, vs, qs = pair_ascent(graph_fn, x0, v0, plan.steps, chunk=plan.chunk, tick=s.tick)
    proposals.append((xs, vs))

    # 4. restarts around the best points (nearby activation patterns), moving with the step size of
    # the best start so far and its neighbours (chosen from the results, not from timing)
    best_scale = STEP_SCALES[int(torch.argmax(torch.nan_to_num(qs, nan=-1.0))) % len(STEP_SCALES)]
    scales = (best_scale / 2, best_scale, best_scale * 2)
    for r in range(plan.restarts):
        s.stage(f"restarts ({r + 1}/{plan.restarts})")
        order = torch.argsort(torch.nan_to_num(qs, nan=-1.0), descending=True, stable=True)
        top = xs[order[: max(1, plan.starts // 4)]]
        reps = -(-plan.pool // 4 // len(top))
        base = top.repeat((reps,) + (1,) * len(shape))
        radius = torch.tensor([0.1, 0.03, 0.01, 0.003], dtype=torch.float64)[
            torch.randint(0, 4, (len(base),), generator=gen)].reshape(bshape(base))
        size = (1.0 + base.flatten(1).norm(dim=1) / math.sqrt(base[0].numel())).reshape(bshape(base))
        cand = base + radius * size * torch.randn(base.shape, generator=gen, dtype=torch.float64)
        sigma, v = top_singular(graph_fn, cand, plan.power_iters, gen, plan.chunk, s.tick)
        keep = torch.argsort(torch.nan_to_num(sigma, nan=-1.0), descending=True, stable=True)[: max(1, plan.starts // 2)]
        xr, vr, qr = pair_ascent(graph_fn, cand[keep], v[keep], plan.steps // 2, h_start=1e-2, chunk=plan.chunk,
                                 step_scales=scales, tick=s.tick)
        proposals.append((xr, vr))
        xs, vs, qs = torch.cat([xs, xr]), torch.cat([vs, vr]), torch.cat([qs, qr])

    # 5. the user's torch module as a second proposal generator
    torch_fn = _torch_stand_in(getattr(loaded, "torch_module", None), output)
    if torch_fn is not None:
        s.stage("gradient ascent on the torch module")
        try:
            xt, vt, qt = pair_ascent(torch_fn, x0, v0, plan.steps, chunk=plan.chunk, tick=s.tick)
            proposals.append((xt, vt))
            xs, vs, qs = torch.cat([xs, xt]), torch.cat([vs, vt]), torch.cat([qs, qt])
        except BudgetExhausted:
            raise
        except Exception:  # a module the float64 copy cannot run: the graph proposals stand
            pass

    # 6. measure the proposals on the file over the ladder of widths
    s.stage("measuring proposals on the file")
    mids = torch.cat([p[0] for p in proposals])
    dirs = torch.cat([p[1] for p in proposals])
    sigma, _ = top_singular(graph_fn, mids, 2, gen, plan.chunk, s.tick)  # rank proposals by the graph's local gain
    order = torch.argsort(torch.nan_to_num(sigma, nan=-1.0), descending=True, stable=True)[: plan.candidates]
    s.ladder_pairs(mids[order], dirs[order], "gradient proposals (file)")
    for i in order[: 2].tolist():  # the top singular directions at the two best points
        V = top_singular_block(graph_fn, mids[i:i + 1], plan.singular_k, plan.power_iters, gen)
        s.ladder_pairs(mids[i:i + 1].expand_as(V).clone(), V, "singular directions (file)")

    # 7. gradient-free refinement on the file
    s.stage("refinement on the file")
    _refine(s, plan)


def _refine(s: _Search, plan: Plan) -> None:
    """(1 + lambda) search on the file over (midpoint, direction, width) of the best pairs."""
    rng = s.rng
    step = 0.3
    for _ in range(plan.refine_rounds):
        if not s.best.items:
            return
        q0, x, y, _ = s.best.items[0]
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        mid, half = (x64 + y64) / 2, (y64 - x64) / 2
        width = float(np.linalg.norm(half))
        if width == 0:
            return
        n = plan.refine_batch
        scale_mid = step * width * rng.standard_normal((n,) + mid.shape) / math.sqrt(mid.size)
        turn = half[None] + step * width * rng.standard_normal((n,) + half.shape) / math.sqrt(half.size)
        turn *= (width / np.linalg.norm(turn.reshape(n, -1), axis=1)).reshape((-1,) + (1,) * half.ndim)
        stretch = np.exp(rng.uniform(-1.0, 1.0, n)).reshape((-1,) + (1,) * half.ndim)
        mids = mid[None] + scale_mid
        halves = turn * stretch
        q = s.quotients(mids - halves, mids + halves, "refinement (file)")
        step = step * 1.3 if q.max() > q0 else max(step * 0.6, 1e-4)


def _finish(s: _Search, budget: Budget) -> LowerBound:
    """Recompute the best pairs the way anyone would (one sample per call, then [x, y] together) and
    report the best of those."""
    best = None
    f = s.file
    for _, x, y, stage in s.best.items[:4]:
        pair = np.stack([x, y])
        den = float(np.linalg.norm(x.astype(np.float64) - y.astype(np.float64)))
        if den == 0:
            continue
        for batch_size in (1, 2):
            out = f.single(pair) if batch_size == 1 else f.together(pair)
            t = s.tol(pair, out)
            raw = float(np.linalg.norm(out[0] - out[1]))
            value = max(raw - float(t[0]) - float(t[1]), 0.0) / den
            if math.isfinite(value) and (best is None or value > best.value):
                best = LowerBound(value, x, y, 0, None, raw / den, (float(t[0]), float(t[1])), batch_size, stage)
    if best is None:
        best = LowerBound(0.0, None, None, 0, None)
    best.evaluations = s.file.evaluations
    best.cut_by_budget = budget.cut_at
    best.stages = dict(s.best.stages)
    return best


def recompute(loaded, certificate_lower: dict, output: int | None = None) -> float:
    """The raw quotient ||f32(x) - f32(y)|| / ||x - y|| of a stored pair (``lower_bound_search`` of a
    certificate), recomputed on the file at the stored batch size (for tests and auditors)."""
    x, y = decode(certificate_lower["pair"]["x"]), decode(certificate_lower["pair"]["y"])
    file = FileModel(loaded.reference, x.shape, output)
    pair = np.stack([x, y])
    out = file.single(pair) if certificate_lower.get("batch_size", 1) == 1 else file.together(pair)
    return float(np.linalg.norm(out[0] - out[1]) / np.linalg.norm(x.astype(np.float64) - y.astype(np.float64)))
